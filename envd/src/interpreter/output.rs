//! The lines of `POST /execute`'s answer, in E2B's shape: one JSON object
//! per line, `type` first — `stdout`/`stderr` (`text`, `timestamp`),
//! `result` (a MIME bundle spread over E2B's fields), `error` (`name`,
//! `value`, `traceback` as one string), `number_of_executions`, and a last
//! `end_of_execution`.
//!
//! [`Budget`] bounds what one execution may send: a loop printing for ever
//! must cost the sandbox (and whoever reads the answer) a bounded amount of
//! memory, so past the limit output is counted, dropped and said so once.

use serde_json::{Map, Value, json};

use super::kernel::Event;

/// MIME type to E2B's field, in the order E2B lists them.
const FIELDS: &[(&str, &str)] = &[
    ("text/html", "html"),
    ("text/markdown", "markdown"),
    ("image/svg+xml", "svg"),
    ("image/png", "png"),
    ("image/jpeg", "jpeg"),
    ("application/pdf", "pdf"),
    ("text/latex", "latex"),
    ("application/json", "json"),
    ("application/javascript", "javascript"),
    // The interpreter's IPython formatters (a DataFrame's columns, a
    // matplotlib figure's chart data), see the template's startup script.
    ("e2b/data", "data"),
    ("e2b/chart", "chart"),
];
/// The longest traceback sent whole.
const MAX_TRACEBACK: usize = 64 * 1024;

/// One line of the answer, with its newline.
pub fn line(value: &Value) -> Vec<u8> {
    let mut bytes = serde_json::to_vec(value).unwrap_or_default();
    bytes.push(b'\n');
    bytes
}

pub fn end_of_execution() -> Value {
    json!({"type": "end_of_execution"})
}

pub fn error(name: &str, value: &str, traceback: &str) -> Value {
    json!({"type": "error", "name": name, "value": value, "traceback": traceback})
}

/// An event as E2B's line.
pub fn event(event: Event) -> Value {
    match event {
        Event::Stream {
            stderr,
            text,
            timestamp,
        } => json!({
            "type": if stderr { "stderr" } else { "stdout" },
            "text": text,
            "timestamp": timestamp,
        }),
        Event::Result { main, data } => result(main, data),
        Event::Error {
            name,
            value,
            mut traceback,
        } => {
            if traceback.len() > MAX_TRACEBACK {
                let mut cut = MAX_TRACEBACK;
                while !traceback.is_char_boundary(cut) {
                    cut -= 1;
                }
                traceback.truncate(cut);
                traceback.push_str("\n[traceback truncated]");
            }
            error(&name, &value, &traceback)
        }
        Event::ExecutionCount(count) => {
            json!({"type": "number_of_executions", "execution_count": count})
        }
    }
}

/// A MIME bundle as E2B's result: `text/plain` is `text` (quotes of a
/// string's repr dropped, as E2B does), the known types their fields, the
/// rest `extra`.
fn result(main: bool, mut data: Map<String, Value>) -> Value {
    let mut out = Map::new();
    out.insert("type".into(), "result".into());
    if let Some(Value::String(text)) = data.remove("text/plain") {
        out.insert("text".into(), Value::String(unquote(text)));
    }
    for (mime, field) in FIELDS {
        if let Some(value) = data.remove(*mime) {
            out.insert((*field).into(), value);
        }
    }
    if !data.is_empty() {
        out.insert("extra".into(), Value::Object(data));
    }
    out.insert("is_main_result".into(), Value::Bool(main));
    Value::Object(out)
}

fn unquote(text: String) -> String {
    let quoted = text.len() >= 2
        && ((text.starts_with('\'') && text.ends_with('\''))
            || (text.starts_with('"') && text.ends_with('"')));
    if quoted {
        text[1..text.len() - 1].to_owned()
    } else {
        text
    }
}

/// What one execution may still send: `limit` bytes of stdout/stderr text
/// and, apart, `limit` bytes of results (so the cell's value still comes
/// after a flood of prints).
pub struct Budget {
    limit: usize,
    sent: usize,
    results_sent: usize,
    dropped: usize,
    /// Text past the limit was dropped: no more text passes.
    spent: bool,
    noticed: bool,
}

impl Budget {
    pub fn new(limit: usize) -> Self {
        Budget {
            limit,
            sent: 0,
            results_sent: 0,
            dropped: 0,
            spent: false,
            noticed: false,
        }
    }

    /// The lines to send for `event`: itself, cut or dropped once the budget
    /// is spent (with one stderr line saying so). Errors and execution
    /// counts always pass: they are small and the caller needs them.
    pub fn admit(&mut self, event: Event) -> Vec<Value> {
        match event {
            Event::Stream {
                stderr,
                mut text,
                timestamp,
            } => {
                let left = if self.spent {
                    0
                } else {
                    self.limit.saturating_sub(self.sent)
                };
                if text.len() <= left {
                    self.sent += text.len();
                    return vec![self::event(Event::Stream {
                        stderr,
                        text,
                        timestamp,
                    })];
                }
                let mut cut = left;
                while !text.is_char_boundary(cut) {
                    cut -= 1;
                }
                self.dropped += text.len() - cut;
                text.truncate(cut);
                self.sent = self.limit;
                self.spent = true;
                let mut lines = Vec::new();
                if !text.is_empty() {
                    lines.push(self::event(Event::Stream {
                        stderr,
                        text,
                        timestamp: timestamp.clone(),
                    }));
                }
                lines.extend(self.notice(&timestamp));
                lines
            }
            Event::Result { main, data } => {
                let value = result(main, data);
                let size = serde_json::to_vec(&value).map(|v| v.len()).unwrap_or(0);
                if self.results_sent + size <= self.limit {
                    self.results_sent += size;
                    vec![value]
                } else {
                    self.dropped += size;
                    let now =
                        chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
                    self.notice(&now)
                }
            }
            other => vec![self::event(other)],
        }
    }

    /// The one line that says output is being dropped (sent when the
    /// budget first runs out).
    fn notice(&mut self, timestamp: &str) -> Vec<Value> {
        if self.noticed {
            return Vec::new();
        }
        self.noticed = true;
        vec![json!({
            "type": "stderr",
            "text": format!(
                "\n[sandmesh: this execution's output passed {} MiB; the rest is dropped]\n",
                self.limit / (1024 * 1024)
            ),
            "timestamp": timestamp,
        })]
    }

    /// Bytes not sent.
    pub fn dropped(&self) -> usize {
        self.dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stdout(text: &str) -> Event {
        Event::Stream {
            stderr: false,
            text: text.into(),
            timestamp: "t".into(),
        }
    }

    #[test]
    fn a_bundle_maps_to_e2b_fields_and_the_rest_is_extra() {
        let mut data = Map::new();
        data.insert("text/plain".into(), json!("'hello'"));
        data.insert("image/png".into(), json!("iVBOR"));
        data.insert("e2b/chart".into(), json!({"type": "line"}));
        data.insert("application/x-custom".into(), json!(1));
        let line = event(Event::Result { main: true, data });
        assert_eq!(line["type"], "result");
        assert_eq!(line["text"], "hello");
        assert_eq!(line["png"], "iVBOR");
        assert_eq!(line["chart"]["type"], "line");
        assert_eq!(line["extra"]["application/x-custom"], 1);
        assert_eq!(line["is_main_result"], true);
        assert!(line.get("html").is_none());
    }

    #[test]
    fn numbers_keep_their_text_and_lone_quotes_stay() {
        assert_eq!(unquote("42".into()), "42");
        assert_eq!(unquote("'".into()), "'");
        assert_eq!(unquote("\"a\"".into()), "a");
    }

    #[test]
    fn the_budget_cuts_output_once_and_says_so_once() {
        let mut budget = Budget::new(10);
        assert_eq!(budget.admit(stdout("12345")).len(), 1);
        let lines = budget.admit(stdout("6789abcdef"));
        assert_eq!(lines[0]["text"], "6789a");
        assert!(lines[1]["text"].as_str().unwrap().contains("dropped"));
        assert!(budget.admit(stdout("more")).is_empty());
        assert_eq!(budget.dropped(), 9);
        let error = budget.admit(Event::Error {
            name: "E".into(),
            value: "v".into(),
            traceback: String::new(),
        });
        assert_eq!(error[0]["name"], "E", "errors pass a spent budget");
        let mut budget = Budget::new(64);
        assert_eq!(budget.admit(stdout(&"x".repeat(100))).len(), 2);
        let mut data = Map::new();
        data.insert("text/plain".into(), json!("'done'"));
        let result = budget.admit(Event::Result { main: true, data });
        assert_eq!(
            result[0]["text"], "done",
            "results have a budget of their own"
        );
    }

    #[test]
    fn a_cut_never_splits_a_character() {
        let mut budget = Budget::new(4);
        let lines = budget.admit(stdout("ééé"));
        assert_eq!(lines[0]["text"], "éé");
    }
}
