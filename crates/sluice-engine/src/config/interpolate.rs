//! `${env:NAME}` and `${file:path}` in flow files, for secrets and per-environment values.
//!
//! Interpolated values are marked secret on their node: validation messages never echo them, and
//! nothing logs configuration values. `$${` writes a literal `${`.

use std::path::Path;

use super::diag::Reporter;
use super::node::{Node, Value};

/// Where values come from; tests substitute their own environment.
pub trait Lookup {
    /// The environment variable `name`.
    fn env(&self, name: &str) -> Option<String>;
}

/// The process environment.
#[derive(Debug, Default)]
pub struct ProcessEnv;

impl Lookup for ProcessEnv {
    fn env(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

/// Replaces every `${env:..}`/`${file:..}` in string values below `node`; `base` is the folder
/// of the flow file (relative `file:` paths start there).
pub fn interpolate(
    node: &mut Node,
    path: &str,
    base: &Path,
    lookup: &dyn Lookup,
    report: &mut Reporter,
) {
    match &mut node.value {
        Value::Str(s) if s.contains("${") => match expand(s, base, lookup) {
            Ok(Some(expanded)) => {
                *s = expanded;
                node.secret = true;
            }
            Ok(None) => {}
            Err((message, help)) => report.error(node.loc, path, message, Some(help)),
        },
        Value::Seq(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                interpolate(item, &format!("{path}[{i}]"), base, lookup, report);
            }
        }
        Value::Map(entries) => {
            for (key, value) in entries.iter_mut() {
                let child = if path.is_empty() {
                    key.name.clone()
                } else {
                    format!("{path}.{}", key.name)
                };
                interpolate(value, &child, base, lookup, report);
            }
        }
        _ => {}
    }
}

/// `Ok(None)`: nothing to replace (only escapes, or `${` that is not ours, e.g. in a jq string).
fn expand(
    text: &str,
    base: &Path,
    lookup: &dyn Lookup,
) -> Result<Option<String>, (String, String)> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut replaced = false;
    while let Some(start) = rest.find("${") {
        if rest[..start].ends_with('$') {
            // `$${` escapes: keep one `$` and the `{`.
            out.push_str(&rest[..start]);
            out.push('{');
            rest = &rest[start + 2..];
            replaced = true;
            continue;
        }
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            out.push_str("${");
            rest = after;
            continue;
        };
        let inner = &after[..end];
        if let Some(name) = inner.strip_prefix("env:") {
            let value = lookup.env(name).ok_or_else(|| {
                (
                    format!("environment variable `{name}` is not set"),
                    format!("set {name} before starting sluice, or remove the `${{env:{name}}}` reference"),
                )
            })?;
            out.push_str(&value);
            replaced = true;
        } else if let Some(file) = inner.strip_prefix("file:") {
            let full = base.join(file);
            let value = std::fs::read_to_string(&full).map_err(|e| {
                (
                    format!("cannot read `{}` for `${{file:{file}}}`: {e}", full.display()),
                    "the path is relative to the flow file's folder; check it exists and is readable".to_owned(),
                )
            })?;
            out.push_str(value.trim_end_matches(['\n', '\r']));
            replaced = true;
        } else {
            // Not an interpolation of ours (jq and templates may contain `${`): leave it.
            out.push_str("${");
            out.push_str(inner);
            out.push('}');
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(replaced.then_some(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::Arc;

    struct Fake(HashMap<&'static str, &'static str>);
    impl Lookup for Fake {
        fn env(&self, name: &str) -> Option<String> {
            self.0.get(name).map(|s| (*s).to_owned())
        }
    }

    fn run(yaml: &str, dir: &Path) -> (Node, Vec<String>) {
        let mut node = super::super::node::parse(yaml).unwrap();
        let mut report = Reporter::new(Arc::from("f.yaml"));
        let env = Fake(HashMap::from([("TOKEN", "s3cret"), ("PORT", "9000")]));
        interpolate(&mut node, "", dir, &env, &mut report);
        (
            node,
            report.finish().into_iter().map(|d| d.to_string()).collect(),
        )
    }

    #[test]
    fn env_and_file_values_are_substituted_and_marked_secret() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pw.txt"), "hunter2\n").unwrap();
        let (node, errors) = run(
            "a: \"Bearer ${env:TOKEN}\"\nb: ${file:pw.txt}\nc: plain\n",
            dir.path(),
        );
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(node.get("a").unwrap().as_str(), Some("Bearer s3cret"));
        assert!(node.get("a").unwrap().secret);
        assert_eq!(node.get("b").unwrap().as_str(), Some("hunter2"));
        assert!(!node.get("c").unwrap().secret);
    }

    #[test]
    fn missing_values_are_located_errors_that_do_not_leak() {
        let dir = tempfile::tempdir().unwrap();
        let (_, errors) = run(
            "x:\n  y: ${env:NOPE}\n  z: ${file:missing.txt}\n",
            dir.path(),
        );
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(
            errors[0].starts_with("f.yaml:2:6: error: environment variable `NOPE` is not set"),
            "{}",
            errors[0]
        );
        assert!(errors[1].contains("missing.txt"), "{}", errors[1]);
    }

    #[test]
    fn escapes_and_foreign_braces_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (node, errors) = run("a: \"$${env:TOKEN}\"\nb: \"${other}\"\n", dir.path());
        assert!(errors.is_empty());
        assert_eq!(node.get("a").unwrap().as_str(), Some("${env:TOKEN}"));
        assert_eq!(node.get("b").unwrap().as_str(), Some("${other}"));
    }
}
