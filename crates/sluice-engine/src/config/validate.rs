//! Checks a component's configuration node against its spec: unknown fields (with suggestions),
//! types, bounds, required fields; fills defaults; hands expressions and nested steps to a
//! [`Checker`]. Every problem is reported; checking goes on after the first.

use serde_json::Value as Json;
use sluice_core::spec::{ComponentSpec, FieldSpec, FieldType};

use super::diag::{Reporter, suggest};
use super::node::{Node, Value};

/// Checks what the spec alone cannot: expressions compile, nested steps are valid.
pub trait Checker {
    /// Compiles a jq expression; reports at `node` if it does not compile.
    fn check_jq(&self, code: &str, node: &Node, path: &str, report: &mut Reporter);
    /// Compiles a template; reports at `node` if it does not compile.
    fn check_template(&self, source: &str, node: &Node, path: &str, report: &mut Reporter);
    /// Validates a nested list of steps.
    fn check_steps(&self, node: &Node, path: &str, report: &mut Reporter);
}

/// Validates `node` (the value under the component's key) against `spec`. Returns the
/// configuration as JSON with defaults filled, or `None` if any problem was found.
pub fn component(
    spec: &ComponentSpec,
    node: &Node,
    path: &str,
    checker: &dyn Checker,
    report: &mut Reporter,
) -> Option<Json> {
    let before = report.count();
    // `filter: '.ok'` is shorthand for `filter: {condition: '.ok'}`.
    let expanded;
    let node = match (&node.value, spec.shorthand) {
        (Value::Map(_), _) => node,
        (Value::Null, _) => {
            expanded = Node {
                value: Value::Map(Vec::new()),
                ..node.clone()
            };
            &expanded
        }
        (_, Some(field)) => {
            expanded = Node {
                value: Value::Map(vec![(
                    super::node::Key {
                        name: field.to_owned(),
                        loc: node.loc,
                    },
                    node.clone(),
                )]),
                ..node.clone()
            };
            &expanded
        }
        (_, None) => {
            report.error(
                node.loc,
                path,
                format!(
                    "`{}` takes a map of fields, found {}",
                    spec.name,
                    node.shape()
                ),
                Some(field_list(&spec.fields)),
            );
            return None;
        }
    };
    let out = object(&spec.fields, node, path, spec.name, checker, report);
    (report.count() == before).then_some(out)
}

fn field_list(fields: &[FieldSpec]) -> String {
    if fields.is_empty() {
        return "this component takes no fields".to_owned();
    }
    format!(
        "fields: {}",
        fields.iter().map(|f| f.name).collect::<Vec<_>>().join(", ")
    )
}

pub(crate) fn object(
    fields: &[FieldSpec],
    node: &Node,
    path: &str,
    owner: &str,
    checker: &dyn Checker,
    report: &mut Reporter,
) -> Json {
    let mut out = serde_json::Map::new();
    let Value::Map(entries) = &node.value else {
        report.error(
            node.loc,
            path,
            format!("expected a map, found {}", node.shape()),
            None,
        );
        return Json::Object(out);
    };
    for (key, value) in entries {
        let child = format!("{path}.{}", key.name);
        match fields.iter().find(|f| f.name == key.name) {
            Some(field) => {
                if let Some(v) = typed(&field.ty, value, &child, field.secret, checker, report) {
                    out.insert(key.name.clone(), v);
                }
            }
            None => {
                let help = suggest(&key.name, fields.iter().map(|f| f.name)).map_or_else(
                    || field_list(fields),
                    |s| format!("{s} ({})", field_list(fields)),
                );
                report.error(
                    key.loc,
                    &child,
                    format!("unknown field `{}` in `{owner}`", key.name),
                    Some(help),
                );
            }
        }
    }
    for field in fields {
        if out.contains_key(field.name) {
            continue;
        }
        if field.required {
            report.error(
                node.loc,
                path,
                format!("missing required field `{}` in `{owner}`", field.name),
                Some(format!(
                    "`{}`: {} ({})",
                    field.name,
                    field.doc,
                    field.ty.describe()
                )),
            );
        } else if let Some(default) = &field.default {
            out.insert(field.name.to_owned(), default.clone());
        }
    }
    Json::Object(out)
}

fn mismatch(ty: &FieldType, node: &Node, path: &str, secret: bool, report: &mut Reporter) {
    let found = if secret || node.secret {
        node.shape().to_owned()
    } else {
        match &node.value {
            Value::Str(s) if s.len() <= 40 => format!("`{s}`"),
            Value::Int(i) => format!("`{i}`"),
            Value::Float(f) => format!("`{f}`"),
            Value::Bool(b) => format!("`{b}`"),
            _ => node.shape().to_owned(),
        }
    };
    report.error(
        node.loc,
        path,
        format!("expected {}, found {found}", ty.describe()),
        None,
    );
}

pub(crate) fn typed(
    ty: &FieldType,
    node: &Node,
    path: &str,
    secret: bool,
    checker: &dyn Checker,
    report: &mut Reporter,
) -> Option<Json> {
    let json = match (ty, &node.value) {
        (FieldType::Any, _) => node.to_json(),
        (FieldType::String, Value::Str(_)) => node.to_json(),
        // Numbers and booleans where a string is expected: YAML users write `port: 8080`
        // meaning text as often as not, so accept the scalar's text.
        (FieldType::String, Value::Int(i)) => Json::String(i.to_string()),
        (FieldType::String, Value::Float(f)) => Json::String(f.to_string()),
        (FieldType::String, Value::Bool(b)) => Json::String(b.to_string()),
        (FieldType::Integer { min, max }, Value::Int(i)) => {
            if min.is_some_and(|m| *i < m) || max.is_some_and(|m| *i > m) {
                mismatch(ty, node, path, secret, report);
                return None;
            }
            Json::from(*i)
        }
        (FieldType::Float, Value::Int(i)) => Json::from(*i),
        (FieldType::Float, Value::Float(_)) => node.to_json(),
        (FieldType::Bool, Value::Bool(b)) => Json::Bool(*b),
        (FieldType::Duration, Value::Str(s)) => {
            let parsed = sluice_core::duration::parse(s).map_err(|e| e.to_string());
            parsed_scalar(parsed, ty, node, path, secret, report)?
        }
        (FieldType::ByteSize, Value::Int(i)) if *i >= 0 => node.to_json(),
        (FieldType::ByteSize, Value::Str(s)) => {
            let parsed = sluice_core::bytesize::parse(s).map_err(|e| e.to_string());
            parsed_scalar(parsed, ty, node, path, secret, report)?
        }
        (FieldType::Enum(values), Value::Str(s)) => {
            if !values.contains(&s.as_str()) {
                if secret || node.secret {
                    report.error(node.loc, path, hidden(ty), None);
                    return None;
                }
                let help = suggest(s, values.iter().copied());
                report.error(
                    node.loc,
                    path,
                    format!("expected {}, found `{s}`", ty.describe()),
                    help,
                );
                return None;
            }
            node.to_json()
        }
        (FieldType::Jq, Value::Str(code)) => {
            checker.check_jq(code, node, path, report);
            node.to_json()
        }
        (FieldType::Template, Value::Str(source)) => {
            checker.check_template(source, node, path, report);
            node.to_json()
        }
        (FieldType::List(inner), Value::Seq(items)) => Json::Array(
            items
                .iter()
                .enumerate()
                .filter_map(|(i, item)| {
                    typed(
                        inner,
                        item,
                        &format!("{path}[{i}]"),
                        secret,
                        checker,
                        report,
                    )
                })
                .collect(),
        ),
        (FieldType::Map(inner), Value::Map(entries)) => Json::Object(
            entries
                .iter()
                .filter_map(|(k, v)| {
                    typed(
                        inner,
                        v,
                        &format!("{path}.{}", k.name),
                        secret,
                        checker,
                        report,
                    )
                    .map(|v| (k.name.clone(), v))
                })
                .collect(),
        ),
        (FieldType::Object(fields), Value::Map(_)) => {
            let owner = path.rsplit('.').next().unwrap_or(path).to_owned();
            object(fields, node, path, &owner, checker, report)
        }
        (FieldType::Steps, Value::Seq(_)) => {
            checker.check_steps(node, path, report);
            node.to_json()
        }
        (FieldType::OneOf(types), _) => {
            // Take the first alternative that accepts the node without problems.
            for alt in types {
                let mut scratch = Reporter::new(report.file().clone());
                if let Some(v) = typed(alt, node, path, secret, checker, &mut scratch)
                    && scratch.count() == 0
                {
                    return Some(v);
                }
            }
            mismatch(ty, node, path, secret, report);
            return None;
        }
        _ => {
            mismatch(ty, node, path, secret, report);
            return None;
        }
    };
    Some(json)
}

/// The node's JSON when its text parsed as `ty`; otherwise reports the parser's message (or, for a
/// secret, what was expected without the value).
fn parsed_scalar<T>(
    parsed: Result<T, String>,
    ty: &FieldType,
    node: &Node,
    path: &str,
    secret: bool,
    report: &mut Reporter,
) -> Option<Json> {
    match parsed {
        Ok(_) => Some(node.to_json()),
        Err(message) => {
            let message = if secret || node.secret {
                hidden(ty)
            } else {
                message
            };
            report.error(node.loc, path, message, None);
            None
        }
    }
}

/// The message for a secret value of the wrong form: says what is expected, never what was found.
fn hidden(ty: &FieldType) -> String {
    format!(
        "expected {}; the value comes from `${{env:..}}` or `${{file:..}}` and is not shown",
        ty.describe()
    )
}
