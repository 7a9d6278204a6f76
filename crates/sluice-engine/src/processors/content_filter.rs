//! `content_filter`: keeps or removes members of the body by path (EIP Content Filter).
//!
//! Paths are compiled once into a tree, and the body is walked once: no jq involved, so it stays
//! cheap on large bodies.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{Map, Value};
use sluice_core::spec::{ComponentKind, ComponentSpec, FieldSpec, FieldType};
use sluice_core::{
    Body, BuildContext, BuildError, Failure, Message, Outputs, ProcessError, Processor,
};

use super::common;

/// The step's spec.
pub fn spec() -> ComponentSpec {
    ComponentSpec::new(
        "content_filter",
        ComponentKind::Processor,
        "Keep only the listed members of the body, or remove them",
    )
    .description(
        "Removes data from the JSON body by path (EIP Content Filter): with `keep`, only the listed \
members are left; with `remove`, the listed members are taken out. Give exactly one of them. \
Headers, metadata and acknowledgement are kept.\n\n\
**Paths** are dotted (`customer.name`) or jq-style (`.customer.name`, `.[\"odd key\"]`); `[]` \
stands for every element of an array: `items[].sku` (or `.items[].sku`) is the `sku` of each \
item. Array indexes and other jq are not supported: use `transform` for those.\n\n\
* `keep`: an object on a path keeps only the members the paths name below it (an empty object \
when none of them is there); an array under `[]` keeps every element, each filtered the same \
way; a path that names a missing member, or goes through a value of another type (a `sku` \
inside a string), contributes nothing. A body that is neither an object nor an array, where a \
path needs one, fails with `invalid_input`.\n\
* `remove`: each path's member is deleted where it exists; missing members are ignored. A path \
ending in `[]` (`tags[]`) empties the array but keeps it.\n\n\
A body that is not valid JSON fails with `invalid_input`.",
    )
    .field(FieldSpec::new(
        "keep",
        FieldType::List(Box::new(FieldType::String)),
        "The paths to keep; everything else is removed.",
    ))
    .field(FieldSpec::new(
        "remove",
        FieldType::List(Box::new(FieldType::String)),
        "The paths to remove; everything else is kept.",
    ))
    .example(
        "Keep what the shipping service needs",
        "keep: [id, customer.name, customer.address, 'items[].sku', 'items[].qty']\n",
    )
    .example(
        "Strip personal data before logging",
        "remove: [customer.email, customer.phone, '.payment.card']\n",
    )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    keep: Option<Vec<String>>,
    remove: Option<Vec<String>>,
}

/// One step of a path.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Segment {
    Key(String),
    Each,
}

/// The paths, merged: a node with no children is the end of a path (everything below it).
#[derive(Debug, Default)]
struct Tree {
    children: BTreeMap<Segment, Tree>,
    end: bool,
}

impl Tree {
    fn insert(&mut self, path: &[Segment]) {
        match path.split_first() {
            None => self.end = true,
            Some((first, rest)) => self.children.entry(first.clone()).or_default().insert(rest),
        }
    }
}

/// Parses `a.b[].c`, `.a.b[].c` or `.["a b"].c`.
fn parse_path(text: &str) -> Result<Vec<Segment>, String> {
    let mut segments = Vec::new();
    let mut rest = text.trim();
    if rest.is_empty() || rest == "." {
        return Err("a path must name at least one member".to_owned());
    }
    let mut first = true;
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix("[]") {
            segments.push(Segment::Each);
            rest = after;
        } else if let Some(after) = rest
            .strip_prefix("[\"")
            .or_else(|| rest.strip_prefix(".[\""))
        {
            let end = after
                .find("\"]")
                .ok_or_else(|| format!("`{text}`: a quoted key needs a closing `\"]`"))?;
            segments.push(Segment::Key(after[..end].to_owned()));
            rest = &after[end + 2..];
        } else if rest.starts_with('[') || rest.starts_with(".[") {
            return Err(format!(
                "`{text}`: only `[]` (every element) and `[\"key\"]` are supported; use `transform` for indexes"
            ));
        } else {
            let after = match rest.strip_prefix('.') {
                Some(after) => after,
                None if first => rest,
                None => return Err(format!("`{text}`: expected `.` before `{rest}`")),
            };
            let end = after.find(['.', '[']).unwrap_or(after.len());
            let key = &after[..end];
            if key.is_empty() {
                return Err(format!("`{text}`: empty member name"));
            }
            segments.push(Segment::Key(key.to_owned()));
            rest = &after[end..];
        }
        first = false;
    }
    Ok(segments)
}

/// Builds the step.
pub fn build(config: &Value, _ctx: &BuildContext<'_>) -> Result<Arc<dyn Processor>, BuildError> {
    let config: Config = common::config(config)?;
    let (field, paths, keep) = match (config.keep, config.remove) {
        (Some(paths), None) => ("keep", paths, true),
        (None, Some(paths)) => ("remove", paths, false),
        _ => {
            return Err(BuildError::new("give exactly one of `keep` and `remove`"));
        }
    };
    if paths.is_empty() {
        return Err(BuildError::field(field, "list at least one path"));
    }
    let mut tree = Tree::default();
    for (i, path) in paths.iter().enumerate() {
        let segments =
            parse_path(path).map_err(|e| BuildError::field(format!("{field}[{i}]"), e))?;
        tree.insert(&segments);
    }
    Ok(Arc::new(ContentFilter { tree, keep }))
}

struct ContentFilter {
    tree: Tree,
    keep: bool,
}

/// The parts of `value` the tree names, or `None` when it names none of it.
fn project(value: &Value, tree: &Tree) -> Option<Value> {
    if tree.end {
        return Some(value.clone());
    }
    match value {
        Value::Object(object) => {
            let mut kept = Map::new();
            for (segment, below) in &tree.children {
                if let Segment::Key(key) = segment
                    && let Some(member) = object.get(key)
                    && let Some(projected) = project(member, below)
                {
                    kept.insert(key.clone(), projected);
                }
            }
            Some(Value::Object(kept))
        }
        Value::Array(items) => {
            let below = tree.children.get(&Segment::Each)?;
            Some(Value::Array(
                items
                    .iter()
                    .filter_map(|item| project(item, below))
                    .collect(),
            ))
        }
        _ => None,
    }
}

/// Deletes what the tree names from `value`.
fn prune(value: &mut Value, tree: &Tree) {
    match value {
        Value::Object(object) => {
            for (segment, below) in &tree.children {
                let Segment::Key(key) = segment else { continue };
                if below.end {
                    object.remove(key);
                } else if let Some(member) = object.get_mut(key) {
                    prune(member, below);
                }
            }
        }
        Value::Array(items) => {
            if let Some(below) = tree.children.get(&Segment::Each) {
                if below.end {
                    items.clear();
                } else {
                    items.iter_mut().for_each(|item| prune(item, below));
                }
            }
        }
        _ => {}
    }
}

#[async_trait]
impl Processor for ContentFilter {
    async fn process(&self, msg: Message) -> Result<Outputs, Failure> {
        let (mut msg, body) = common::json_body(msg)?;
        let filtered = if self.keep {
            match project(&body, &self.tree) {
                Some(kept) => kept,
                None => {
                    let e = ProcessError::invalid_input(if body.is_array() {
                        "the body is an array: start the `keep` paths with `[]` to filter each element".to_owned()
                    } else {
                        format!(
                            "`keep` selects members of an object or elements of an array, but the body is {}",
                            common::value_kind(&body)
                        )
                    });
                    return Err(Failure::new(msg, e));
                }
            }
        } else {
            let mut body = body.as_ref().clone();
            prune(&mut body, &self.tree);
            body
        };
        msg.body = Body::from_json(filtered);
        Ok(common::one(msg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::processors::testkit::{build_one, process, try_build};
    use serde_json::json;
    use sluice_core::ErrorKind;

    fn order() -> Value {
        json!({
            "id": 7,
            "customer": {"name": "Ada", "email": "a@x", "address": {"city": "L"}},
            "items": [{"sku": "A", "qty": 1, "cost": 3}, {"sku": "B", "qty": 2}, "odd"],
            "odd key": true
        })
    }

    async fn filter(config: Value, body: Value) -> Result<Value, Failure> {
        let step = build_one("content_filter", config);
        process(&step, Message::json(body))
            .await
            .map(|out| out[0].body.json().unwrap().clone())
    }

    #[test]
    fn paths_parse_in_both_spellings() {
        let both = [
            parse_path("a.b[].c").unwrap(),
            parse_path(".a.b[].c").unwrap(),
        ];
        let expected = vec![
            Segment::Key("a".into()),
            Segment::Key("b".into()),
            Segment::Each,
            Segment::Key("c".into()),
        ];
        assert_eq!(both, [expected.clone(), expected]);
        assert_eq!(
            parse_path(".[\"odd key\"].x").unwrap(),
            vec![Segment::Key("odd key".into()), Segment::Key("x".into())]
        );
        assert!(parse_path(".a[0]").unwrap_err().contains("indexes"));
        assert!(parse_path("a..b").unwrap_err().contains("empty member"));
        assert!(parse_path(".").is_err());
    }

    #[tokio::test]
    async fn keep_leaves_only_the_listed_members() {
        let kept = filter(
            json!({"keep": ["id", "customer.name", "items[].sku", ".[\"odd key\"]", "missing.x"]}),
            order(),
        )
        .await
        .unwrap();
        assert_eq!(
            kept,
            json!({
                "id": 7,
                "customer": {"name": "Ada"},
                "items": [{"sku": "A"}, {"sku": "B"}],
                "odd key": true
            })
        );
        let kept = filter(json!({"keep": ["[].a"]}), json!([{"a": 1, "b": 2}, 3]))
            .await
            .unwrap();
        assert_eq!(kept, json!([{"a": 1}]));
        let f = filter(json!({"keep": ["a"]}), json!([{"a": 1}]))
            .await
            .unwrap_err();
        assert!(
            f.error.detail.contains("start the `keep` paths with `[]`"),
            "{}",
            f.error.detail
        );
    }

    #[tokio::test]
    async fn remove_deletes_the_listed_members() {
        let left = filter(
            json!({"remove": ["customer.email", ".items[].cost", "nope.deeper", "id"]}),
            order(),
        )
        .await
        .unwrap();
        assert_eq!(
            left,
            json!({
                "customer": {"name": "Ada", "address": {"city": "L"}},
                "items": [{"sku": "A", "qty": 1}, {"sku": "B", "qty": 2}, "odd"],
                "odd key": true
            })
        );
    }

    #[tokio::test]
    async fn removing_every_element_keeps_an_empty_array() {
        let left = filter(
            json!({"remove": ["tags[]"]}),
            json!({"tags": [1, 2], "n": 1}),
        )
        .await
        .unwrap();
        assert_eq!(left, json!({"tags": [], "n": 1}));
    }

    #[tokio::test]
    async fn scalar_bodies_and_bad_config_are_errors() {
        let f = filter(json!({"keep": ["a"]}), json!("text"))
            .await
            .unwrap_err();
        assert_eq!(f.error.kind, ErrorKind::InvalidInput);
        assert!(
            f.error.detail.contains("the body is a string"),
            "{}",
            f.error.detail
        );
        assert_eq!(
            filter(json!({"remove": ["a"]}), json!(3)).await.unwrap(),
            json!(3)
        );
        let e = try_build("content_filter", &json!({"keep": ["a"], "remove": ["b"]}))
            .err()
            .unwrap();
        assert!(e.message.contains("exactly one"));
        let e = try_build("content_filter", &json!({"keep": ["a", ".b[1]"]}))
            .err()
            .unwrap();
        assert_eq!(e.field.as_deref(), Some("keep[1]"));
    }
}
