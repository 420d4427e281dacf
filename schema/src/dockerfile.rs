//! A Dockerfile as a template build: [`parse`] turns Dockerfile text into
//! the [`BuildStart`] that `POST /v2/templates/{id}/builds/{buildID}`
//! takes, plus the COPY sources the client must hash and upload.
//!
//! The mapping is the one of E2B's own converter (Python SDK 2.63,
//! `e2b/template/dockerfile_parser.py` and `Template.from_dockerfile`):
//!
//! - `FROM image [AS name]` is `fromImage` (always an image: the node
//!   decides what a name such as `base` means). A second FROM (a
//!   multi-stage build) and `COPY --from` are refused.
//! - Before the steps, `USER root` and `WORKDIR /` (Docker's defaults);
//!   after them `USER user` and `WORKDIR /home/user` (E2B's), each only
//!   when the Dockerfile set none of its own.
//! - `RUN cmd` is `RUN [cmd]` as written (continuation lines joined);
//!   `RUN ["a", "b"]` is the words quoted for `sh` and joined (Python's
//!   `shlex.quote`). `--mount`, `--network`, `--security` and `--device`
//!   are ignored with a warning. Heredocs (`RUN <<EOF`) are refused.
//! - `COPY`/`ADD [--chown=u[:g]] [--chmod=0755] src... dest` is one
//!   `COPY [src, dest, chown or "", mode as 4 octal digits or ""]` step per
//!   source. Sources must be relative paths that stay in the context. ADD
//!   of a URL is refused; ADD of a local archive copies it unpacked (with a
//!   warning).
//! - `ENV k v` and `ENV k=v k2="v 2"` are one `ENV [k, v, ...]` step;
//!   `ARG name[=default]` likewise (the SDK sets ARGs as build envs).
//! - `WORKDIR` and `USER` are their steps.
//! - `CMD`/`ENTRYPOINT` combine by Docker's rules into `startCmd` (shell
//!   form as written, exec form quoted and joined), with the SDK's
//!   `readyCmd` of `sleep 20`.
//! - `HEALTHCHECK [--interval…] CMD cmd` is the `readyCmd` (the command
//!   that says the start command is ready; `--ready-cmd` of the CLI wins).
//!   E2B's converter ignores HEALTHCHECK; reading it lets a Dockerfile say
//!   all of a template. `HEALTHCHECK NONE` is nothing.
//! - `EXPOSE`, `LABEL`, `MAINTAINER`, `VOLUME`, `SHELL`, `STOPSIGNAL` and
//!   `ONBUILD` are ignored with a warning; any other word is an error.
//!
//! Variables: an `ARG` or `ENV` declared earlier in the file is substituted
//! (`$NAME`, `${NAME}`, `${NAME:-word}`, `${NAME:+word}`, `${NAME-word}`,
//! `${NAME+word}`) in the arguments of FROM, COPY/ADD, ENV, ARG, WORKDIR
//! and USER, as Docker does; a reference to a variable the file does not
//! declare (the image's `$PATH`, `$HOME`) is kept as written for the node
//! to resolve. RUN and CMD text is passed as written: the shell expands it,
//! with the ARG and ENV steps in its environment. (The SDK keeps every
//! reference as written; substituting the ones the file defines is what
//! Docker does and what a COPY source needs to be found locally.)
//!
//! The parser is hand-written: the Rust Dockerfile crates are either
//! unmaintained (`dockerfile-parser` 0.9: pest, snafu 0.6, no heredocs, no
//! `# escape=` directive, no line numbers in its errors) or parse only a
//! subset. This one follows BuildKit's lexing: parser directives
//! (`# escape=`), comment and empty lines dropped (also inside
//! continuations), a line ending in the escape character continues, and
//! instruction names are case-insensitive. Every error names the 1-based
//! line where its instruction starts.

use std::collections::HashMap;

use crate::template::{BuildStart, Step, StepKind};

/// Docker's default user and working directory, set before the steps.
const DOCKER_USER: &str = "root";
const DOCKER_WORKDIR: &str = "/";
/// E2B's, set after the steps unless the Dockerfile set its own.
const E2B_USER: &str = "user";
const E2B_WORKDIR: &str = "/home/user";
/// The SDK's ready command for a Dockerfile's CMD (`wait_for_timeout(20_000)`).
pub const READY_CMD: &str = "sleep 20";
/// How deeply `${a:-${b:-...}}` may nest.
const MAX_NESTING: usize = 8;

/// A Dockerfile converted to a template build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dockerfile {
    /// The build, with no `filesHash` on its COPY steps yet (the client
    /// computes them from the context) and `force: false`.
    pub start: BuildStart,
    /// One per COPY step, in step order.
    pub copies: Vec<CopySource>,
    /// What was ignored, each `line N: ...`.
    pub warnings: Vec<String>,
}

/// The local source of a COPY step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopySource {
    /// Index of its step in [`BuildStart::steps`].
    pub step: usize,
    /// The Dockerfile line of its instruction (1-based).
    pub line: usize,
    /// Relative to the context; may be a glob (`*.py`, `src/**`).
    pub src: String,
    pub dest: String,
}

/// A Dockerfile that cannot be built: `line 7: unknown instruction "FOOBAR"`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct Error {
    /// 1-based.
    pub line: usize,
    pub message: String,
}

/// One instruction, continuation lines joined.
struct Instruction {
    line: usize,
    /// Upper case.
    name: String,
    /// Everything after the name, flags included.
    rest: String,
}

/// Parse Dockerfile text.
pub fn parse(text: &str) -> Result<Dockerfile, Error> {
    let (instructions, escape) = lex(text)?;
    Converter::new(escape).convert(&instructions, text)
}

/// Split into instructions (BuildKit's `parser.Parse`, less heredocs).
fn lex(text: &str) -> Result<(Vec<Instruction>, char), Error> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut escape = '\\';
    let mut lines = text.lines().enumerate().peekable();
    // Parser directives: `# key=value` lines at the very top.
    let mut seen = Vec::new();
    while let Some((i, line)) = lines.peek() {
        let Some((key, value)) = directive(line) else {
            break;
        };
        let line_no = i + 1;
        if seen.contains(&key) {
            return Err(Error {
                line: line_no,
                message: format!("only one {key} parser directive can be used"),
            });
        }
        if key == "escape" {
            escape = match value.as_str() {
                "\\" => '\\',
                "`" => '`',
                v => {
                    return Err(Error {
                        line: line_no,
                        message: format!("invalid escape token {v:?}: it must be ` or \\"),
                    });
                }
            };
        }
        seen.push(key);
        lines.next();
    }
    let mut out = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (i, line) in lines {
        let trimmed = line.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            // Empty and comment lines are dropped, also inside a
            // continuation.
            continue;
        }
        let (start, mut joined) = current.take().unwrap_or((i + 1, String::new()));
        let end = line.trim_end();
        if let Some(body) = end.strip_suffix(escape) {
            joined.push_str(body);
            current = Some((start, joined));
        } else {
            joined.push_str(end);
            out.push(instruction(start, &joined)?);
        }
    }
    if let Some((start, joined)) = current {
        out.push(instruction(start, &joined)?);
    }
    Ok((out, escape))
}

/// `# escape=`` ` `` -> ("escape", "`"); lower-cased key.
fn directive(line: &str) -> Option<(String, String)> {
    let body = line.trim().strip_prefix('#')?.trim_start();
    let (key, value) = body.split_once('=')?;
    let key = key.trim();
    if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric()) {
        return None;
    }
    let key = key.to_ascii_lowercase();
    matches!(key.as_str(), "escape" | "syntax" | "check").then(|| (key, value.trim().to_owned()))
}

fn instruction(line: usize, joined: &str) -> Result<Instruction, Error> {
    let joined = joined.trim();
    let (name, rest) = joined
        .split_once(char::is_whitespace)
        .unwrap_or((joined, ""));
    Ok(Instruction {
        line,
        name: name.to_ascii_uppercase(),
        rest: rest.trim().to_owned(),
    })
}

/// Which flags an instruction takes, and whether each is only warned about.
type FlagSpecs = &'static [(&'static str, FlagKind)];

#[derive(Clone, Copy, PartialEq, Eq)]
enum FlagKind {
    String,
    IgnoredString,
    IgnoredBool,
}

const RUN_FLAGS: FlagSpecs = &[
    ("mount", FlagKind::IgnoredString),
    ("network", FlagKind::IgnoredString),
    ("security", FlagKind::IgnoredString),
    ("device", FlagKind::IgnoredString),
];
const COPY_FLAGS: FlagSpecs = &[
    ("chown", FlagKind::String),
    ("chmod", FlagKind::String),
    ("from", FlagKind::String),
    ("link", FlagKind::IgnoredBool),
    ("exclude", FlagKind::IgnoredString),
    ("parents", FlagKind::IgnoredBool),
];
const ADD_FLAGS: FlagSpecs = &[
    ("chown", FlagKind::String),
    ("chmod", FlagKind::String),
    ("from", FlagKind::String),
    ("link", FlagKind::IgnoredBool),
    ("exclude", FlagKind::IgnoredString),
    ("parents", FlagKind::IgnoredBool),
    ("keep-git-dir", FlagKind::IgnoredBool),
    ("checksum", FlagKind::IgnoredString),
    ("unpack", FlagKind::IgnoredBool),
];
const FROM_FLAGS: FlagSpecs = &[("platform", FlagKind::IgnoredString)];
const HEALTHCHECK_FLAGS: FlagSpecs = &[
    ("interval", FlagKind::IgnoredString),
    ("timeout", FlagKind::IgnoredString),
    ("start-period", FlagKind::IgnoredString),
    ("start-interval", FlagKind::IgnoredString),
    ("retries", FlagKind::IgnoredString),
];

/// Docker instructions a template has no use for.
const IGNORED: &[&str] = &[
    "EXPOSE",
    "LABEL",
    "MAINTAINER",
    "VOLUME",
    "SHELL",
    "STOPSIGNAL",
    "ONBUILD",
];

/// CMD or ENTRYPOINT as written.
struct StartCommand {
    json: bool,
    args: Vec<String>,
}

struct Converter {
    escape: char,
    /// ARG and ENV values declared so far.
    vars: HashMap<String, String>,
    steps: Vec<Step>,
    copies: Vec<CopySource>,
    warnings: Vec<String>,
    user_changed: bool,
    workdir_changed: bool,
    from_image: Option<String>,
    cmd: Option<StartCommand>,
    entrypoint: Option<StartCommand>,
    /// HEALTHCHECK's command: the ready command.
    healthcheck: Option<String>,
}

impl Converter {
    fn new(escape: char) -> Self {
        Self {
            escape,
            vars: HashMap::new(),
            steps: Vec::new(),
            copies: Vec::new(),
            warnings: Vec::new(),
            user_changed: false,
            workdir_changed: false,
            from_image: None,
            cmd: None,
            entrypoint: None,
            healthcheck: None,
        }
    }

    fn convert(mut self, instructions: &[Instruction], text: &str) -> Result<Dockerfile, Error> {
        self.step(StepKind::User, vec![DOCKER_USER.into()]);
        self.step(StepKind::Workdir, vec![DOCKER_WORKDIR.into()]);
        for ins in instructions {
            if self.from_image.is_none() && !matches!(ins.name.as_str(), "FROM" | "ARG") {
                let known = ins.name == "RUN"
                    || matches!(
                        ins.name.as_str(),
                        "COPY"
                            | "ADD"
                            | "ENV"
                            | "WORKDIR"
                            | "USER"
                            | "CMD"
                            | "ENTRYPOINT"
                            | "HEALTHCHECK"
                    )
                    || IGNORED.contains(&ins.name.as_str());
                if known {
                    return Err(err(
                        ins,
                        format!(
                            "{} must come after a FROM instruction (a Dockerfile starts with FROM)",
                            ins.name
                        ),
                    ));
                }
            }
            self.instruction(ins)?;
        }
        let Some(from_image) = self.from_image.take() else {
            let line = instructions
                .last()
                .map_or(text.lines().count().max(1), |i| i.line);
            return Err(Error {
                line,
                message: "the Dockerfile has no FROM instruction".into(),
            });
        };
        let start_cmd = self.start_cmd();
        if !self.user_changed {
            self.step(StepKind::User, vec![E2B_USER.into()]);
        }
        if !self.workdir_changed {
            self.step(StepKind::Workdir, vec![E2B_WORKDIR.into()]);
        }
        Ok(Dockerfile {
            start: BuildStart {
                from_image: Some(from_image),
                ready_cmd: match (&start_cmd, self.healthcheck.take()) {
                    (Some(_), Some(check)) => Some(check),
                    (Some(_), None) => Some(READY_CMD.to_owned()),
                    (None, _) => None,
                },
                start_cmd,
                steps: self.steps,
                ..Default::default()
            },
            copies: self.copies,
            warnings: self.warnings,
        })
    }

    fn step(&mut self, kind: StepKind, args: Vec<String>) {
        self.steps.push(Step {
            kind: kind.name().into(),
            args,
            files_hash: None,
            force: false,
            force_upload: None,
        });
    }

    fn warn(&mut self, ins: &Instruction, message: impl std::fmt::Display) {
        self.warnings.push(format!("line {}: {message}", ins.line));
    }

    fn instruction(&mut self, ins: &Instruction) -> Result<(), Error> {
        match ins.name.as_str() {
            "FROM" => self.from(ins),
            "RUN" => self.run(ins),
            "COPY" => self.copy(ins, COPY_FLAGS),
            "ADD" => self.copy(ins, ADD_FLAGS),
            "ENV" => self.env(ins),
            "ARG" => self.arg(ins),
            "WORKDIR" => {
                let dir = self.single(ins)?;
                self.step(StepKind::Workdir, vec![dir]);
                self.workdir_changed = true;
                Ok(())
            }
            "USER" => {
                let user = self.single(ins)?;
                self.step(StepKind::User, vec![user]);
                self.user_changed = true;
                Ok(())
            }
            "CMD" | "ENTRYPOINT" => {
                let (_, rest) = self.flags(ins, &[])?;
                let cmd = if let Some(words) = json_array(ins, &rest)? {
                    StartCommand {
                        json: true,
                        args: words,
                    }
                } else {
                    StartCommand {
                        json: false,
                        args: if rest.is_empty() { vec![] } else { vec![rest] },
                    }
                };
                if ins.name == "CMD" {
                    self.cmd = Some(cmd);
                } else {
                    self.entrypoint = Some(cmd);
                }
                Ok(())
            }
            "HEALTHCHECK" => {
                let (_, rest) = self.flags(ins, HEALTHCHECK_FLAGS)?;
                if rest.eq_ignore_ascii_case("none") {
                    self.healthcheck = None;
                    return Ok(());
                }
                let Some(command) = rest
                    .split_once(char::is_whitespace)
                    .filter(|(word, _)| word.eq_ignore_ascii_case("cmd"))
                    .map(|(_, command)| command.trim())
                    .filter(|command| !command.is_empty())
                else {
                    return Err(err(ins, "HEALTHCHECK takes CMD <command> or NONE"));
                };
                self.healthcheck = Some(match json_array(ins, command)? {
                    Some(words) => shell_join(&words),
                    None => command.to_owned(),
                });
                Ok(())
            }
            name if IGNORED.contains(&name) => {
                self.warn(
                    ins,
                    format_args!("{name} is ignored: a template has no use for it"),
                );
                Ok(())
            }
            _ => Err(err(ins, format!("unknown instruction {:?}", ins.name))),
        }
    }

    /// Leading `--name[=value]` words, checked against `specs`; returns the
    /// kept flags and the text after them.
    fn flags(
        &mut self,
        ins: &Instruction,
        specs: FlagSpecs,
    ) -> Result<(HashMap<&'static str, String>, String), Error> {
        let mut values = HashMap::new();
        let mut seen = Vec::new();
        let mut rest = ins.rest.as_str();
        while let Some(body) = rest.strip_prefix("--") {
            let (word, after) = body.split_once(char::is_whitespace).unwrap_or((body, ""));
            rest = after.trim_start();
            if word.is_empty() {
                // A bare `--` ends the flags.
                break;
            }
            let (name, value) = match word.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (word, None),
            };
            let Some(&(spec_name, kind)) = specs.iter().find(|(n, _)| *n == name) else {
                return Err(err(ins, format!("unknown flag --{name} for {}", ins.name)));
            };
            if seen.contains(&spec_name) {
                return Err(err(ins, format!("duplicate flag --{name}")));
            }
            seen.push(spec_name);
            let value = match kind {
                FlagKind::IgnoredBool => match value {
                    None | Some("" | "true") => "true".to_owned(),
                    Some("false") => "false".to_owned(),
                    Some(v) => {
                        return Err(err(
                            ins,
                            format!("expecting a boolean for flag --{name}, not {v:?}"),
                        ));
                    }
                },
                FlagKind::String | FlagKind::IgnoredString => match value {
                    Some(v) => v.to_owned(),
                    None => return Err(err(ins, format!("missing a value on flag --{name}"))),
                },
            };
            if matches!(kind, FlagKind::IgnoredBool | FlagKind::IgnoredString) {
                self.warn(ins, format_args!("{} --{name} is ignored", ins.name));
                continue;
            }
            values.insert(spec_name, value);
        }
        Ok((values, rest.to_owned()))
    }

    fn from(&mut self, ins: &Instruction) -> Result<(), Error> {
        if self.from_image.is_some() {
            return Err(err(
                ins,
                "multi-stage builds are not supported: a Dockerfile has one FROM",
            ));
        }
        let (_, rest) = self.flags(ins, FROM_FLAGS)?;
        let words = self.words(ins, &rest)?;
        let image = match words.as_slice() {
            [image] => image,
            [image, as_, _] if as_.eq_ignore_ascii_case("as") => image,
            [] => return Err(err(ins, "FROM needs an image")),
            _ => return Err(err(ins, "FROM takes an image and optionally AS name")),
        };
        if image.is_empty() {
            return Err(err(ins, "FROM needs an image"));
        }
        self.from_image = Some(image.clone());
        Ok(())
    }

    fn run(&mut self, ins: &Instruction) -> Result<(), Error> {
        let (_, rest) = self.flags(ins, RUN_FLAGS)?;
        let command = match json_array(ins, &rest)? {
            Some(words) if words.is_empty() => {
                return Err(err(ins, "RUN needs a command"));
            }
            Some(words) => shell_join(&words),
            None => {
                if rest.is_empty() {
                    return Err(err(ins, "RUN needs a command"));
                }
                refuse_heredoc(ins, &rest)?;
                rest
            }
        };
        self.step(StepKind::Run, vec![command]);
        Ok(())
    }

    fn copy(&mut self, ins: &Instruction, specs: FlagSpecs) -> Result<(), Error> {
        let (flags, rest) = self.flags(ins, specs)?;
        if flags.contains_key("from") {
            return Err(err(
                ins,
                format!(
                    "{} --from is not supported (multi-stage builds are not supported)",
                    ins.name
                ),
            ));
        }
        let words = match json_array(ins, &rest)? {
            // The exec form's strings are already unquoted: variables
            // alone are substituted.
            Some(words) => words
                .iter()
                .map(|w| {
                    let mut lexer = Lexer::new(w, self.escape, &self.vars, 0);
                    lexer.literal_quotes = true;
                    lexer.run(false).map(|mut w| w.pop().unwrap_or_default())
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(|m| err(ins, m))?,
            None => {
                refuse_heredoc(ins, &rest)?;
                self.words(ins, &rest)?
            }
        };
        let Some((dest, srcs)) = words.split_last().filter(|(_, srcs)| !srcs.is_empty()) else {
            return Err(err(
                ins,
                format!("{} needs at least a source and a destination", ins.name),
            ));
        };
        let user = match flags.get("chown") {
            Some(v) => self.word(ins, v)?,
            None => String::new(),
        };
        let mode = match flags.get("chmod") {
            Some(v) => {
                let resolved = self.word(ins, v)?;
                let ok = (3..=4).contains(&resolved.len())
                    && resolved.bytes().all(|b| (b'0'..=b'7').contains(&b));
                if !ok {
                    return Err(err(
                        ins,
                        format!("invalid --chmod {resolved:?}: want an octal mode such as 0755"),
                    ));
                }
                let mode = u32::from_str_radix(&resolved, 8).expect("checked octal");
                format!("{mode:04o}")
            }
            None => String::new(),
        };
        for src in srcs {
            if ins.name == "ADD" && is_remote(src) {
                return Err(err(
                    ins,
                    format!("ADD from a URL is not supported: {src} (download it in a RUN step)"),
                ));
            }
            check_source(src).map_err(|m| err(ins, m))?;
            if ins.name == "ADD" && is_archive(src) {
                self.warn(
                    ins,
                    format_args!("ADD copies {src} as it is: it is not unpacked as Docker would"),
                );
            }
            self.copies.push(CopySource {
                step: self.steps.len(),
                line: ins.line,
                src: src.clone(),
                dest: dest.clone(),
            });
            self.step(
                StepKind::Copy,
                vec![src.clone(), dest.clone(), user.clone(), mode.clone()],
            );
        }
        Ok(())
    }

    fn env(&mut self, ins: &Instruction) -> Result<(), Error> {
        let (_, rest) = self.flags(ins, &[])?;
        if rest.is_empty() {
            return Err(err(ins, "ENV needs a name and a value"));
        }
        let first = rest.split(char::is_whitespace).next().unwrap_or("");
        let mut pairs: Vec<(String, String)> = Vec::new();
        if first.contains('=') {
            for w in self.words(ins, &rest)? {
                let Some((k, v)) = w.split_once('=') else {
                    return Err(err(
                        ins,
                        format!("ENV {w:?} has no '=': write ENV name=value ..."),
                    ));
                };
                pairs.push((k.to_owned(), v.to_owned()));
            }
        } else {
            // The legacy `ENV name value with spaces`.
            let (key, value) = rest
                .split_once(char::is_whitespace)
                .ok_or_else(|| err(ins, format!("ENV {rest} needs a value")))?;
            let key = self.word(ins, key)?;
            let value = self.word(ins, value.trim())?;
            pairs.push((key, value));
        }
        self.set_vars(ins, pairs, "ENV")
    }

    fn arg(&mut self, ins: &Instruction) -> Result<(), Error> {
        let (_, rest) = self.flags(ins, &[])?;
        let words = self.words(ins, &rest)?;
        if words.is_empty() {
            return Err(err(ins, "ARG needs a name"));
        }
        let pairs = words
            .into_iter()
            .map(|w| match w.split_once('=') {
                Some((k, v)) => (k.to_owned(), v.to_owned()),
                None => (w, String::new()),
            })
            .collect();
        self.set_vars(ins, pairs, "ARG")
    }

    fn set_vars(
        &mut self,
        ins: &Instruction,
        pairs: Vec<(String, String)>,
        what: &str,
    ) -> Result<(), Error> {
        let mut args = Vec::new();
        for (k, v) in pairs {
            if k.is_empty() {
                return Err(err(ins, format!("{what} names can not be blank")));
            }
            self.vars.insert(k.clone(), v.clone());
            // The SDK sets a dict: a name given twice keeps its last value
            // at its first place.
            if let Some(i) = args.chunks(2).position(|c: &[String]| c[0] == k) {
                args[2 * i + 1] = v;
            } else {
                args.push(k);
                args.push(v);
            }
        }
        self.step(StepKind::Env, args);
        Ok(())
    }

    /// WORKDIR or USER: the whole text as one word.
    fn single(&mut self, ins: &Instruction) -> Result<String, Error> {
        let (_, rest) = self.flags(ins, &[])?;
        if rest.is_empty() {
            return Err(err(ins, format!("{} needs exactly one argument", ins.name)));
        }
        let w = self.word(ins, &rest)?;
        if w.is_empty() {
            return Err(err(ins, format!("{} needs exactly one argument", ins.name)));
        }
        Ok(w)
    }

    fn words(&self, ins: &Instruction, text: &str) -> Result<Vec<String>, Error> {
        Lexer::new(text, self.escape, &self.vars, 0)
            .run(true)
            .map_err(|m| err(ins, m))
    }

    fn word(&self, ins: &Instruction, text: &str) -> Result<String, Error> {
        Lexer::new(text, self.escape, &self.vars, 0)
            .run(false)
            .map(|mut w| w.pop().unwrap_or_default())
            .map_err(|m| err(ins, m))
    }

    /// Docker's rules: an exec-form ENTRYPOINT gets CMD appended (a shell
    /// CMD as `/bin/sh -c cmd`), a shell-form one ignores CMD, and without
    /// ENTRYPOINT the CMD is the command.
    fn start_cmd(&self) -> Option<String> {
        let command = match (&self.entrypoint, &self.cmd) {
            (Some(e), cmd) if e.json => {
                let mut words = e.args.clone();
                match cmd {
                    Some(c) if c.json => words.extend(c.args.iter().cloned()),
                    Some(c) if !c.args.is_empty() => {
                        words.extend(["/bin/sh".into(), "-c".into(), c.args[0].clone()])
                    }
                    _ => {}
                }
                (!words.is_empty()).then(|| shell_join(&words))
            }
            (Some(e), _) => e.args.first().cloned(),
            (None, Some(c)) if c.json => (!c.args.is_empty()).then(|| shell_join(&c.args)),
            (None, Some(c)) => c.args.first().cloned(),
            (None, None) => None,
        };
        command.filter(|c| !c.trim().is_empty())
    }
}

fn err(ins: &Instruction, message: impl Into<String>) -> Error {
    Error {
        line: ins.line,
        message: message.into(),
    }
}

/// The exec form: `Some(words)` when the text is a JSON array of strings.
/// Text that starts like one (`["` or `[]`) but does not parse is an error;
/// other text starting with `[` is shell (`RUN [ -d x ] || mkdir x`), as
/// in Docker.
fn json_array(ins: &Instruction, text: &str) -> Result<Option<Vec<String>>, Error> {
    let Some(after) = text.strip_prefix('[') else {
        return Ok(None);
    };
    if !matches!(after.trim_start().chars().next(), Some('"' | ']')) {
        return Ok(None);
    }
    serde_json::from_str::<Vec<String>>(text)
        .map(Some)
        .map_err(|e| err(ins, format!("{} has a malformed JSON array: {e}", ins.name)))
}

/// Heredocs (`<<EOF`, `<<-"EOF"`) outside quotes.
fn refuse_heredoc(ins: &Instruction, text: &str) -> Result<(), Error> {
    let b = text.as_bytes();
    let mut quote = None;
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == b'\'' || c == b'"' => quote = Some(c),
            None if c == b'<' && b.get(i + 1) == Some(&b'<') && b.get(i + 2) != Some(&b'<') => {
                let mut j = i + 2;
                if b.get(j) == Some(&b'-') {
                    j += 1;
                }
                if matches!(b.get(j), Some(b'\'' | b'"')) {
                    j += 1;
                }
                if b.get(j)
                    .is_some_and(|c| c.is_ascii_alphabetic() || *c == b'_')
                {
                    return Err(err(
                        ins,
                        format!(
                            "heredocs ({}) are not supported: put the text in a file and COPY it",
                            &text[i..].split_whitespace().next().unwrap_or("<<")
                        ),
                    ));
                }
                i += 1;
            }
            None => {}
        }
        i += 1;
    }
    Ok(())
}

/// `http://`, `https://`, `git@host:...`: what Docker's ADD fetches.
fn is_remote(src: &str) -> bool {
    let scheme = src.split_once("://").map(|(s, _)| s);
    let url = scheme.is_some_and(|s| {
        s.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '.' | '-'))
    });
    url || src.starts_with("git@")
}

fn is_archive(src: &str) -> bool {
    let s = src.to_ascii_lowercase();
    [
        ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst",
    ]
    .iter()
    .any(|ext| s.ends_with(ext))
}

/// A COPY source must be relative and stay inside the context (the SDK's
/// `validate_relative_path`): `a/../b` is fine, `a/../../b` is not.
pub fn check_source(src: &str) -> Result<(), String> {
    if src.is_empty() {
        return Err("an empty COPY source".into());
    }
    if src.starts_with('/') {
        return Err(format!(
            "COPY source {src:?} is an absolute path: sources are relative to the build context"
        ));
    }
    let mut depth = 0usize;
    for part in src.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                depth = depth
                    .checked_sub(1)
                    .ok_or_else(|| format!("COPY source {src:?} is outside the build context"))?;
            }
            _ => depth += 1,
        }
    }
    Ok(())
}

/// Python's `shlex.quote` of each word, joined by spaces (the SDK's
/// `_shell_join`).
pub fn shell_join(words: &[String]) -> String {
    words
        .iter()
        .map(|w| shell_quote(w))
        .collect::<Vec<_>>()
        .join(" ")
}

fn shell_quote(w: &str) -> String {
    if w.is_empty() {
        return "''".into();
    }
    let safe = w
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "_@%+=:,./-".contains(c));
    if safe {
        w.to_owned()
    } else {
        format!("'{}'", w.replace('\'', "'\"'\"'"))
    }
}

/// Quote removal and substitution of the declared variables (BuildKit's
/// `ShellLex.ProcessWord(s)`, less pattern modifiers).
struct Lexer<'a> {
    chars: Vec<char>,
    i: usize,
    escape: char,
    vars: &'a HashMap<String, String>,
    depth: usize,
    /// Quotes and the escape character are plain characters (the strings
    /// of a JSON array).
    literal_quotes: bool,
}

impl<'a> Lexer<'a> {
    fn new(text: &str, escape: char, vars: &'a HashMap<String, String>, depth: usize) -> Self {
        Self {
            chars: text.chars().collect(),
            i: 0,
            escape,
            vars,
            depth,
            literal_quotes: false,
        }
    }

    /// `split`: whitespace separates words; else the text is one word.
    fn run(mut self, split: bool) -> Result<Vec<String>, String> {
        if self.depth > MAX_NESTING {
            return Err("variable substitutions nest too deeply".into());
        }
        let mut words = Vec::new();
        let mut cur = String::new();
        let mut in_word = false;
        while let Some(&c) = self.chars.get(self.i) {
            if split && c.is_whitespace() {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
                self.i += 1;
                continue;
            }
            in_word = true;
            if self.literal_quotes && c != '$' {
                cur.push(c);
                self.i += 1;
            } else if c == '\'' {
                let start = self.i + 1;
                let end = self.chars[start..]
                    .iter()
                    .position(|&c| c == '\'')
                    .ok_or("unterminated single quote")?;
                cur.extend(&self.chars[start..start + end]);
                self.i = start + end + 1;
            } else if c == '"' {
                self.i += 1;
                loop {
                    let Some(&ch) = self.chars.get(self.i) else {
                        return Err("unterminated double quote".into());
                    };
                    if ch == '"' {
                        self.i += 1;
                        break;
                    }
                    let next = self.chars.get(self.i + 1).copied();
                    if ch == self.escape
                        && next.is_some_and(|n| n == '"' || n == '$' || n == self.escape)
                    {
                        cur.push(next.expect("checked"));
                        self.i += 2;
                    } else if ch == '$' {
                        self.dollar(&mut cur)?;
                    } else {
                        cur.push(ch);
                        self.i += 1;
                    }
                }
            } else if c == self.escape {
                if let Some(&n) = self.chars.get(self.i + 1) {
                    cur.push(n);
                }
                self.i += 2;
            } else if c == '$' {
                self.dollar(&mut cur)?;
            } else {
                cur.push(c);
                self.i += 1;
            }
        }
        if in_word || !split {
            words.push(cur);
        }
        Ok(words)
    }

    /// At a `$`: substitute a declared variable, keep anything else as
    /// written.
    fn dollar(&mut self, out: &mut String) -> Result<(), String> {
        let start = self.i;
        self.i += 1;
        match self.chars.get(self.i) {
            Some('{') => {
                let mut depth = 1;
                let mut j = self.i + 1;
                while depth > 0 {
                    match self.chars.get(j) {
                        None => return Err("missing '}' in ${...}".into()),
                        Some('{') => depth += 1,
                        Some('}') => depth -= 1,
                        Some(_) => {}
                    }
                    j += 1;
                }
                // chars[self.i+1 .. j-1] is the inside of the braces.
                let inner: String = self.chars[self.i + 1..j - 1].iter().collect();
                let written: String = self.chars[start..j].iter().collect();
                self.i = j;
                let name_len = inner
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(inner.len());
                let (name, modifier) = inner.split_at(name_len);
                if name.is_empty() {
                    return Err(format!("bad substitution {written}"));
                }
                let value = self.vars.get(name);
                if modifier.is_empty() {
                    out.push_str(value.map_or(written.as_str(), |v| v.as_str()));
                    return Ok(());
                }
                let (op, word) = [":-", ":+", ":?", "-", "+", "?"]
                    .iter()
                    .find_map(|op| modifier.strip_prefix(op).map(|w| (*op, w)))
                    .ok_or_else(|| format!("unsupported substitution {written}"))?;
                let Some(value) = value else {
                    out.push_str(&written);
                    return Ok(());
                };
                let word = || {
                    Lexer::new(word, self.escape, self.vars, self.depth + 1)
                        .run(false)
                        .map(|mut w| w.pop().unwrap_or_default())
                };
                match op {
                    ":-" if value.is_empty() => out.push_str(&word()?),
                    ":+" if !value.is_empty() => out.push_str(&word()?),
                    "+" => out.push_str(&word()?),
                    ":?" if value.is_empty() => {
                        return Err(format!("{name}: {}", word()?));
                    }
                    ":+" => {}
                    _ => out.push_str(value),
                }
            }
            Some(c) if c.is_ascii_alphabetic() || *c == '_' => {
                let len = self.chars[self.i..]
                    .iter()
                    .position(|c| !(c.is_ascii_alphanumeric() || *c == '_'))
                    .unwrap_or(self.chars.len() - self.i);
                let name: String = self.chars[self.i..self.i + len].iter().collect();
                self.i += len;
                match self.vars.get(&name) {
                    Some(v) => out.push_str(v),
                    None => {
                        out.push('$');
                        out.push_str(&name);
                    }
                }
            }
            _ => out.push('$'),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn steps(d: &Dockerfile) -> Vec<(String, Vec<String>)> {
        d.start
            .steps
            .iter()
            .map(|s| (s.kind.clone(), s.args.clone()))
            .collect()
    }

    fn s(kind: &str, args: &[&str]) -> (String, Vec<String>) {
        (kind.into(), args.iter().map(|a| a.to_string()).collect())
    }

    fn error(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn healthcheck_is_the_ready_command() {
        let d = parse(
            "FROM base\nCMD server\nHEALTHCHECK --interval=1s --retries=3 CMD curl -sf http://127.0.0.1/health\n",
        )
        .unwrap();
        assert_eq!(
            d.start.ready_cmd.as_deref(),
            Some("curl -sf http://127.0.0.1/health")
        );
        let d =
            parse("FROM base\nCMD server\nHEALTHCHECK CMD [\"test\", \"-e\", \"/ok\"]\n").unwrap();
        assert_eq!(d.start.ready_cmd.as_deref(), Some("test -e /ok"));
        let d = parse("FROM base\nCMD server\nHEALTHCHECK NONE\n").unwrap();
        assert_eq!(d.start.ready_cmd.as_deref(), Some(READY_CMD));
        let d = parse("FROM base\nHEALTHCHECK CMD true\n").unwrap();
        assert_eq!(
            d.start.ready_cmd, None,
            "no start command, nothing to be ready"
        );
        assert!(error("FROM base\nHEALTHCHECK curl x\n").contains("line 2: HEALTHCHECK takes CMD"));
        assert!(error("FROM base\nHEALTHCHECK --bogus=1 CMD x\n").contains("unknown flag --bogus"));
    }

    #[test]
    fn a_simple_dockerfile_maps_as_the_sdk_does() {
        let d = parse(
            "# a comment\nFROM python:3.12-slim\n\nRUN apt-get update && \\\n    apt-get install -y curl\n\
             COPY --chown=app:app --chmod=755 app.py lib/ /app/\nENV A=1 B=\"two words\"\n\
             WORKDIR /app\nCMD [\"python\", \"app.py\", \"it's\"]\nEXPOSE 8000\n",
        )
        .unwrap();
        assert_eq!(d.start.from_image.as_deref(), Some("python:3.12-slim"));
        assert_eq!(d.start.from_template, None);
        assert_eq!(
            steps(&d),
            vec![
                s("USER", &["root"]),
                s("WORKDIR", &["/"]),
                s("RUN", &["apt-get update &&     apt-get install -y curl"]),
                s("COPY", &["app.py", "/app/", "app:app", "0755"]),
                s("COPY", &["lib/", "/app/", "app:app", "0755"]),
                s("ENV", &["A", "1", "B", "two words"]),
                s("WORKDIR", &["/app"]),
                s("USER", &["user"]),
            ]
        );
        assert_eq!(
            d.start.start_cmd.as_deref(),
            Some("python app.py 'it'\"'\"'s'")
        );
        assert_eq!(d.start.ready_cmd.as_deref(), Some(READY_CMD));
        assert!(!d.start.force);
        assert_eq!(d.copies.len(), 2);
        assert_eq!((d.copies[0].step, d.copies[0].line), (3, 6));
        assert_eq!(d.copies[1].src, "lib/");
        assert_eq!(
            d.warnings,
            vec!["line 10: EXPOSE is ignored: a template has no use for it"]
        );
        // The steps serialize as the SDK sends them.
        let json = serde_json::to_value(&d.start).unwrap();
        assert_eq!(json["fromImage"], "python:3.12-slim");
        assert_eq!(json["steps"][3]["type"], "COPY");
    }

    #[test]
    fn defaults_wrap_the_steps_unless_set() {
        let d = parse("FROM base\n").unwrap();
        assert_eq!(
            steps(&d),
            vec![
                s("USER", &["root"]),
                s("WORKDIR", &["/"]),
                s("USER", &["user"]),
                s("WORKDIR", &["/home/user"]),
            ]
        );
        assert_eq!(d.start.from_image.as_deref(), Some("base"));
        assert_eq!(d.start.start_cmd, None);
        assert_eq!(d.start.ready_cmd, None);
        let d = parse("from ubuntu AS build\nuser app\n").unwrap();
        assert_eq!(
            steps(&d),
            vec![
                s("USER", &["root"]),
                s("WORKDIR", &["/"]),
                s("USER", &["app"]),
                s("WORKDIR", &["/home/user"]),
            ]
        );
    }

    #[test]
    fn run_forms() {
        let d = parse("FROM x\nRUN [\"echo\", \"a b\", \"\"]\nRUN [ -d /x ] || mkdir /x\nRUN --mount=type=cache,target=/c make\n").unwrap();
        assert_eq!(d.start.steps[2].args, vec!["echo 'a b' ''"]);
        assert_eq!(d.start.steps[3].args, vec!["[ -d /x ] || mkdir /x"]);
        assert_eq!(d.start.steps[4].args, vec!["make"]);
        assert_eq!(d.warnings, vec!["line 4: RUN --mount is ignored"]);
        // The escape directive, and comments inside a continuation.
        let d = parse("# escape=`\nFROM x\nRUN echo a `\n# note\n  b\n").unwrap();
        assert_eq!(d.start.steps[2].args, vec!["echo a   b"]);
        // RUN text is passed as written: the shell expands it.
        let d = parse("FROM x\nARG V=1\nRUN echo $V ${V}\n").unwrap();
        assert_eq!(d.start.steps[3].args, vec!["echo $V ${V}"]);
    }

    #[test]
    fn env_and_arg_forms_and_substitution() {
        let d = parse(
            "ARG TAG=3.12\nFROM python:${TAG}\nARG DIR=/srv NAME\nENV APP $DIR/app\n\
             ENV X=${NAME:-dflt} Y=${DIR:+set} Z='$DIR' P=$PATH:/x\nWORKDIR $APP\nCOPY src ${APP}/\n",
        )
        .unwrap();
        assert_eq!(d.start.from_image.as_deref(), Some("python:3.12"));
        assert_eq!(
            steps(&d),
            vec![
                s("USER", &["root"]),
                s("WORKDIR", &["/"]),
                s("ENV", &["TAG", "3.12"]),
                s("ENV", &["DIR", "/srv", "NAME", ""]),
                s("ENV", &["APP", "/srv/app"]),
                s(
                    "ENV",
                    &["X", "dflt", "Y", "set", "Z", "$DIR", "P", "$PATH:/x"]
                ),
                s("WORKDIR", &["/srv/app"]),
                s("COPY", &["src", "/srv/app/", "", ""]),
                s("USER", &["user"]),
            ]
        );
    }

    #[test]
    fn entrypoint_and_cmd_combine_as_in_docker() {
        let start = |t: &str| parse(t).unwrap().start.start_cmd;
        assert_eq!(
            start("FROM x\nCMD npm start\n").as_deref(),
            Some("npm start")
        );
        assert_eq!(
            start("FROM x\nENTRYPOINT [\"/bin/app\"]\nCMD [\"--port\", \"80\"]\n").as_deref(),
            Some("/bin/app --port 80")
        );
        assert_eq!(
            start("FROM x\nENTRYPOINT [\"/e\"]\nCMD run it\n").as_deref(),
            Some("/e /bin/sh -c 'run it'")
        );
        assert_eq!(
            start("FROM x\nENTRYPOINT /e a\nCMD [\"b\"]\n").as_deref(),
            Some("/e a")
        );
        assert_eq!(start("FROM x\nCMD []\n"), None);
    }

    #[test]
    fn copy_and_add() {
        let d = parse(
            "FROM x\nADD [\"a b.txt\", \"/d/\"]\nADD data.tar.gz /d\nCOPY --link ./x/../y /y\n",
        )
        .unwrap();
        assert_eq!(d.start.steps[2].args, vec!["a b.txt", "/d/", "", ""]);
        assert_eq!(d.copies[2].src, "./x/../y");
        assert_eq!(d.warnings.len(), 2, "{:?}", d.warnings);
        assert!(d.warnings[0].starts_with("line 3: ADD copies data.tar.gz"));
        assert_eq!(d.warnings[1], "line 4: COPY --link is ignored");
        // Exec-form strings are taken as they are, variables substituted.
        let d = parse(
            r#"FROM x
ARG D=/d
COPY ["it's \"q\".txt", "$D/"]
"#,
        )
        .unwrap();
        assert_eq!(d.start.steps[3].args, vec!["it's \"q\".txt", "/d/", "", ""]);
    }

    #[test]
    fn malformed_input_is_refused_with_its_line() {
        assert_eq!(
            error("FROM x\nRUN true\n\nFOOBAR baz\n"),
            "line 4: unknown instruction \"FOOBAR\""
        );
        assert!(
            error("FROM x\nCMD [\"a\", \"b\"\n")
                .starts_with("line 2: CMD has a malformed JSON array"),
            "{}",
            error("FROM x\nCMD [\"a\", \"b\"\n")
        );
        assert_eq!(error("FROM x\nRUN\n"), "line 2: RUN needs a command");
        assert_eq!(
            error("FROM x\nWORKDIR\n"),
            "line 2: WORKDIR needs exactly one argument"
        );
        assert_eq!(
            error("FROM x\nCOPY onlyone\n"),
            "line 2: COPY needs at least a source and a destination"
        );
        assert_eq!(
            error("FROM x\nENV\n"),
            "line 2: ENV needs a name and a value"
        );
        // Found by the fuzzer: no arguments at all.
        assert_eq!(
            error("FROM x\nCOPY\n"),
            "line 2: COPY needs at least a source and a destination"
        );
        assert_eq!(
            error("FROM x\nADD []\n"),
            "line 2: ADD needs at least a source and a destination"
        );
        assert_eq!(error("FROM\n"), "line 1: FROM needs an image");
        assert_eq!(
            error("# hi\nRUN true\n"),
            "line 2: RUN must come after a FROM instruction (a Dockerfile starts with FROM)"
        );
        assert_eq!(
            error("ARG A=1\n"),
            "line 1: the Dockerfile has no FROM instruction"
        );
        assert_eq!(error(""), "line 1: the Dockerfile has no FROM instruction");
        assert_eq!(
            error("FROM x\nCOPY ../secret /s\n"),
            "line 2: COPY source \"../secret\" is outside the build context"
        );
        assert_eq!(
            error("FROM x\nCOPY a/../../b /s\n"),
            "line 2: COPY source \"a/../../b\" is outside the build context"
        );
        assert!(
            error("FROM x\nCOPY /etc/passwd /s\n")
                .starts_with("line 2: COPY source \"/etc/passwd\" is an absolute path")
        );
        assert_eq!(
            error("FROM a AS b\nRUN x\nFROM c\n"),
            "line 3: multi-stage builds are not supported: a Dockerfile has one FROM"
        );
        assert!(
            error("FROM a\nCOPY --from=b /x /y\n")
                .starts_with("line 2: COPY --from is not supported")
        );
        assert!(
            error("FROM a\nADD https://x.org/f /f\n")
                .starts_with("line 2: ADD from a URL is not supported")
        );
        assert!(
            error("FROM a\nRUN <<EOF\necho\nEOF\n")
                .starts_with("line 2: heredocs (<<EOF) are not supported")
        );
        assert!(error("FROM a\nCOPY <<-\"EOF\" /f\n").starts_with("line 2: heredocs"));
        assert_eq!(
            error("FROM a\nRUN --nope x\n"),
            "line 2: unknown flag --nope for RUN"
        );
        assert_eq!(
            error("FROM a\nCOPY --chown a b\n"),
            "line 2: missing a value on flag --chown"
        );
        assert!(
            error("FROM a\nCOPY --chmod=999 a b\n").starts_with("line 2: invalid --chmod \"999\"")
        );
        assert_eq!(
            error("FROM a\nENV A=\"x\n"),
            "line 2: unterminated double quote"
        );
        assert_eq!(
            error("FROM a\nENV A=1 B\n"),
            "line 2: ENV \"B\" has no '=': write ENV name=value ..."
        );
        assert_eq!(
            error("FROM a\nWORKDIR ${\n"),
            "line 2: missing '}' in ${...}"
        );
        assert_eq!(
            error("# escape=x\nFROM a\n"),
            "line 1: invalid escape token \"x\": it must be ` or \\"
        );
        // Not heredocs: a here-string, a shift, quoted text.
        assert!(parse("FROM a\nRUN cat <<<\"$x\"; echo $((1<<2)) '<<E'\n").is_ok());
    }

    #[test]
    fn continuation_runs_to_the_end_and_bom_is_skipped() {
        let d = parse("\u{feff}FROM a\nRUN echo \\\n").unwrap();
        assert_eq!(d.start.steps[2].args, vec!["echo"]);
        let d = parse("FROM a\r\nRUN x \\\r\n  y\r\n").unwrap();
        assert_eq!(d.start.steps[2].args, vec!["x   y"]);
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let mut t = String::from("FROM a\nARG A=1\nENV B=");
        for _ in 0..50 {
            t.push_str("${A:+");
        }
        for _ in 0..50 {
            t.push('}');
        }
        assert_eq!(error(&t), "line 3: variable substitutions nest too deeply");
    }
}
