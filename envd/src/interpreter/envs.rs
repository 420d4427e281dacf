//! Environment variables inside a kernel: the code that sets them before a
//! call and puts them back after it, per language.
//!
//! The kernel is one long-lived process, so a call's `envs` cannot be its
//! process environment: they are set by a silent execution before the
//! call's code and undone by another after it (E2B's semantics; the values
//! of the sandbox, from envd's `/envs`, are what "undone" returns to).
//! Values are quoted for the language, never pasted in as code.

use std::collections::HashMap;

#[derive(Debug, thiserror::Error)]
#[error(
    "'{0}' is not an environment variable name (letters, digits and _, not starting with a digit)"
)]
pub struct BadName(pub String);

pub fn check_names<'a>(names: impl IntoIterator<Item = &'a String>) -> Result<(), BadName> {
    for name in names {
        let mut chars = name.chars();
        let first_ok = chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
        if !first_ok || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(BadName(name.clone()));
        }
    }
    Ok(())
}

/// Code that sets `vars` in a kernel of `language` (None: no way to).
pub fn set(language: &str, vars: &HashMap<String, String>) -> Option<String> {
    if vars.is_empty() {
        return None;
    }
    let mut sorted: Vec<(&String, &String)> = vars.iter().collect();
    sorted.sort();
    match language {
        "python" => {
            let map: serde_json::Map<String, serde_json::Value> = sorted
                .iter()
                .map(|(k, v)| ((*k).clone(), serde_json::Value::String((*v).clone())))
                .collect();
            // A JSON object of strings is a Python dict literal.
            Some(format!(
                "import os as _sandmesh_os\n_sandmesh_os.environ.update({})\ndel _sandmesh_os",
                serde_json::Value::Object(map)
            ))
        }
        "bash" => Some(
            sorted
                .iter()
                .map(|(k, v)| format!("export {k}={}", shell_quote(v)))
                .collect::<Vec<_>>()
                .join("\n"),
        ),
        "javascript" | "typescript" => Some(
            sorted
                .iter()
                .map(|(k, v)| format!("Deno.env.set({}, {});", json_str(k), json_str(v)))
                .collect::<Vec<_>>()
                .join("\n"),
        ),
        _ => None,
    }
}

/// Code that puts `vars` back after a call: the sandbox's value where it
/// has one (`global`), else unset.
pub fn restore(
    language: &str,
    vars: &HashMap<String, String>,
    global: &HashMap<String, String>,
) -> Option<String> {
    let back: HashMap<String, String> = vars
        .keys()
        .filter_map(|k| global.get(k).map(|v| (k.clone(), v.clone())))
        .collect();
    let mut gone: Vec<&String> = vars.keys().filter(|k| !global.contains_key(*k)).collect();
    gone.sort();
    let mut code: Vec<String> = set(language, &back).into_iter().collect();
    if !gone.is_empty() {
        code.push(match language {
            "python" => format!(
                "import os as _sandmesh_os\nfor _sandmesh_k in {}:\n    _sandmesh_os.environ.pop(_sandmesh_k, None)\ndel _sandmesh_os, _sandmesh_k",
                serde_json::to_string(&gone).unwrap_or_default()
            ),
            "bash" => format!(
                "unset {}",
                gone.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(" ")
            ),
            "javascript" | "typescript" => gone
                .iter()
                .map(|k| format!("Deno.env.delete({});", json_str(k)))
                .collect::<Vec<_>>()
                .join("\n"),
            _ => return None,
        });
    }
    (!code.is_empty()).then(|| code.join("\n"))
}

fn shell_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', "'\\''"))
}

fn json_str(value: &str) -> String {
    serde_json::Value::String(value.to_owned()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn names_are_checked() {
        assert!(check_names(&["A_1".to_string(), "_x".to_string()]).is_ok());
        for bad in ["1A", "A-B", "", "A B", "A;rm"] {
            assert!(check_names(&[bad.to_string()]).is_err(), "{bad}");
        }
    }

    #[test]
    fn values_are_quoted_not_pasted() {
        let v = vars(&[("A", "it's \"quoted\"\n$(rm -rf /)")]);
        let bash = set("bash", &v).unwrap();
        assert_eq!(bash, "export A='it'\\''s \"quoted\"\n$(rm -rf /)'");
        let python = set("python", &v).unwrap();
        assert!(
            python.contains(r#"{"A":"it's \"quoted\"\n$(rm -rf /)"}"#),
            "{python}"
        );
        let js = set("typescript", &v).unwrap();
        assert!(js.starts_with(r#"Deno.env.set("A", "it's"#), "{js}");
        assert_eq!(set("r", &v), None);
    }

    #[test]
    fn restore_returns_to_the_sandbox_value_or_unsets() {
        let call = vars(&[("A", "1"), ("B", "2")]);
        let global = vars(&[("A", "0")]);
        let bash = restore("bash", &call, &global).unwrap();
        assert_eq!(bash, "export A='0'\nunset B");
        let python = restore("python", &call, &global).unwrap();
        assert!(
            python.contains(r#"{"A":"0"}"#) && python.contains(r#"["B"]"#),
            "{python}"
        );
    }
}
