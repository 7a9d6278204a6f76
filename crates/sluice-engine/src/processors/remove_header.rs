//! `remove_header`: removes message headers by name or prefix.

use std::sync::Arc;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::Value;
use sluice_core::spec::{ComponentKind, ComponentSpec, FieldSpec, FieldType};
use sluice_core::{BuildContext, BuildError, Failure, Message, Outputs, Processor};

use super::common;

/// The step's spec.
pub fn spec() -> ComponentSpec {
    ComponentSpec::new(
        "remove_header",
        ComponentKind::Processor,
        "Remove message headers by name or by prefix",
    )
    .description(
        "Removes the headers named in `name` (one name or a list) and every header whose name \
starts with `prefix`. Names are compared exactly (HTTP sources store header names in lower \
case). Removing a header that is not there is not an error. Give `name`, `prefix` or both.",
    )
    .field(FieldSpec::new(
        "name",
        FieldType::OneOf(vec![
            FieldType::String,
            FieldType::List(Box::new(FieldType::String)),
        ]),
        "Header name, or list of names, to remove.",
    ))
    .field(FieldSpec::new(
        "prefix",
        FieldType::String,
        "Remove every header whose name starts with this.",
    ))
    .shorthand("name")
    .example("One header", "name: authorization\n")
    .example(
        "Internal headers",
        "name: [x-debug, x-trace]\nprefix: x-internal-\n",
    )
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Names {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    name: Option<Names>,
    prefix: Option<String>,
}

/// Builds the step.
pub fn build(config: &Value, _ctx: &BuildContext<'_>) -> Result<Arc<dyn Processor>, BuildError> {
    let config: Config = common::config(config)?;
    let names = match config.name {
        None => Vec::new(),
        Some(Names::One(n)) => vec![n],
        Some(Names::Many(ns)) => ns,
    };
    if names.is_empty() && config.prefix.is_none() {
        return Err(BuildError::new(
            "nothing to remove: give `name`, `prefix` or both",
        ));
    }
    if config.prefix.as_deref() == Some("") {
        return Err(BuildError::field(
            "prefix",
            "an empty prefix would remove every header; give a non-empty prefix",
        ));
    }
    Ok(Arc::new(RemoveHeader {
        names,
        prefix: config.prefix,
    }))
}

struct RemoveHeader {
    names: Vec<String>,
    prefix: Option<String>,
}

#[async_trait]
impl Processor for RemoveHeader {
    async fn process(&self, mut msg: Message) -> Result<Outputs, Failure> {
        for name in &self.names {
            msg.headers.remove(name);
        }
        if let Some(prefix) = &self.prefix {
            msg.headers
                .retain(|name, _| !name.starts_with(prefix.as_str()));
        }
        Ok(common::one(msg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::processors::testkit::{build_one, process, try_build};
    use serde_json::json;

    fn msg() -> Message {
        Message::json(json!(1))
            .with_header("a", "1")
            .with_header("b", "2")
            .with_header("x-int-1", "3")
            .with_header("x-int-2", "4")
    }

    async fn names_after(config: Value) -> Vec<String> {
        let out = process(&build_one("remove_header", config), msg())
            .await
            .unwrap();
        out[0].headers.keys().cloned().collect()
    }

    #[tokio::test]
    async fn removes_by_name_list_and_prefix() {
        assert_eq!(names_after(json!("a")).await, ["b", "x-int-1", "x-int-2"]);
        assert_eq!(
            names_after(json!({"name": ["a", "b", "zz"]})).await,
            ["x-int-1", "x-int-2"]
        );
        assert_eq!(names_after(json!({"prefix": "x-int-"})).await, ["a", "b"]);
        assert_eq!(
            names_after(json!({"name": "a", "prefix": "x-"})).await,
            ["b"]
        );
    }

    #[test]
    fn needs_something_to_remove() {
        assert!(try_build("remove_header", &json!({})).is_err());
        let e = try_build("remove_header", &json!({"prefix": ""}))
            .err()
            .unwrap();
        assert_eq!(e.field.as_deref(), Some("prefix"));
    }
}
