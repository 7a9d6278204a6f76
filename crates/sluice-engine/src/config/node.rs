//! A YAML document as a tree of nodes that remember where they were written.
//!
//! serde-saphyr parses (with its budget against alias bombs and deep nesting) into `Spanned`
//! values; this module turns them into [`Node`]s so every later error can name file:line:column.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::Spanned;

/// Where a node starts in its file (1-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Loc {
    /// Line, from 1.
    pub line: u32,
    /// Column, from 1.
    pub column: u32,
}

/// A YAML value with its location.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// The value.
    pub value: Value,
    /// Where it was written.
    pub loc: Loc,
    /// Whether it came from `${env:..}`/`${file:..}` interpolation: never echo it in messages.
    pub secret: bool,
}

/// A mapping key with its location.
#[derive(Debug, Clone, PartialEq)]
pub struct Key {
    /// The key text.
    pub name: String,
    /// Where it was written.
    pub loc: Loc,
}

/// The shapes a YAML value can take.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `~`, `null` or nothing.
    Null,
    /// `true`/`false`.
    Bool(bool),
    /// A whole number.
    Int(i64),
    /// A number with a fraction.
    Float(f64),
    /// A string.
    Str(String),
    /// A sequence.
    Seq(Vec<Node>),
    /// A mapping, in document order.
    Map(Vec<(Key, Node)>),
}

impl Node {
    /// The entry for `key`, if this is a mapping that has it.
    pub fn get(&self, key: &str) -> Option<&Node> {
        match &self.value {
            Value::Map(entries) => entries.iter().find(|(k, _)| k.name == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// The string, if this is one.
    pub fn as_str(&self) -> Option<&str> {
        match &self.value {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// A short name of this node's shape, for messages ("a string", "a list").
    pub fn shape(&self) -> &'static str {
        match self.value {
            Value::Null => "nothing (null)",
            Value::Bool(_) => "true/false",
            Value::Int(_) => "a whole number",
            Value::Float(_) => "a number",
            Value::Str(_) => "a string",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a map",
        }
    }

    /// Converts to JSON (after validation, to hand to a component factory).
    pub fn to_json(&self) -> serde_json::Value {
        match &self.value {
            Value::Null => serde_json::Value::Null,
            Value::Bool(b) => (*b).into(),
            Value::Int(i) => (*i).into(),
            Value::Float(f) => serde_json::Number::from_f64(*f)
                .map_or(serde_json::Value::Null, serde_json::Value::Number),
            Value::Str(s) => s.clone().into(),
            Value::Seq(items) => items.iter().map(Node::to_json).collect(),
            Value::Map(entries) => entries
                .iter()
                .map(|(k, v)| (k.name.clone(), v.to_json()))
                .collect::<serde_json::Map<_, _>>()
                .into(),
        }
    }

    /// The node at a dotted path such as `when[0].steps` below this one.
    pub fn at_path(&self, path: &str) -> Option<&Node> {
        let mut node = self;
        for part in path.split('.').filter(|p| !p.is_empty()) {
            let (name, indexes) = match part.find('[') {
                Some(i) => (&part[..i], &part[i..]),
                None => (part, ""),
            };
            if !name.is_empty() {
                node = node.get(name)?;
            }
            for index in indexes.split('[').filter(|s| !s.is_empty()) {
                let i: usize = index.trim_end_matches(']').parse().ok()?;
                node = match &node.value {
                    Value::Seq(items) => items.get(i)?,
                    _ => return None,
                };
            }
        }
        Some(node)
    }
}

/// The serde-facing mirror of [`Value`] whose children carry spans.
enum RawValue {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Seq(Vec<Spanned<RawValue>>),
    Map(Vec<(Spanned<String>, Spanned<RawValue>)>),
}

fn loc_of(location: &serde_saphyr::Location) -> Loc {
    Loc {
        line: u32::try_from(location.line()).unwrap_or(u32::MAX),
        column: u32::try_from(location.column()).unwrap_or(u32::MAX),
    }
}

fn into_node(spanned: Spanned<RawValue>) -> Node {
    let loc = loc_of(&spanned.referenced);
    let value = match spanned.value {
        RawValue::Null => Value::Null,
        RawValue::Bool(b) => Value::Bool(b),
        RawValue::Int(i) => Value::Int(i),
        RawValue::Float(f) => Value::Float(f),
        RawValue::Str(s) => Value::Str(s),
        RawValue::Seq(items) => Value::Seq(items.into_iter().map(into_node).collect()),
        RawValue::Map(entries) => Value::Map(
            entries
                .into_iter()
                .map(|(k, v)| {
                    let key = Key {
                        loc: loc_of(&k.referenced),
                        name: k.value,
                    };
                    (key, into_node(v))
                })
                .collect(),
        ),
    };
    Node {
        value,
        loc,
        secret: false,
    }
}

impl<'de> Deserialize<'de> for RawValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(RawVisitor)
    }
}

struct RawVisitor;

impl<'de> Visitor<'de> for RawVisitor {
    type Value = RawValue;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }
    fn visit_unit<E>(self) -> Result<RawValue, E> {
        Ok(RawValue::Null)
    }
    fn visit_none<E>(self) -> Result<RawValue, E> {
        Ok(RawValue::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<RawValue, D::Error> {
        RawValue::deserialize(d)
    }
    fn visit_bool<E>(self, v: bool) -> Result<RawValue, E> {
        Ok(RawValue::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<RawValue, E> {
        Ok(RawValue::Int(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawValue, E> {
        i64::try_from(v).map(RawValue::Int).map_err(|_| {
            E::custom(format!(
                "{v} is too large; the largest whole number is {}",
                i64::MAX
            ))
        })
    }
    fn visit_f64<E>(self, v: f64) -> Result<RawValue, E> {
        Ok(RawValue::Float(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<RawValue, E> {
        Ok(RawValue::Str(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<RawValue, E> {
        Ok(RawValue::Str(v))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RawValue, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Spanned<RawValue>>()? {
            items.push(item);
        }
        Ok(RawValue::Seq(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawValue, A::Error> {
        let mut entries = Vec::new();
        while let Some(key) = map.next_key::<Spanned<String>>()? {
            let value = map.next_value::<Spanned<RawValue>>()?;
            entries.push((key, value));
        }
        Ok(RawValue::Map(entries))
    }
}

/// A YAML syntax or budget error, with its location when the parser knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    /// Where.
    pub loc: Option<Loc>,
    /// What.
    pub message: String,
}

/// Parses one YAML document into a [`Node`] tree, with budgets against alias bombs and deep
/// nesting (a flow file is small: these bounds are far above any real one).
pub fn parse(text: &str) -> Result<Node, ParseError> {
    let mut budget = serde_saphyr::Budget::default();
    budget.max_events = 500_000;
    budget.max_aliases = 10_000;
    budget.max_anchors = 10_000;
    budget.max_depth = 64;
    budget.max_nodes = 250_000;
    budget.max_total_scalar_bytes = 16 * 1024 * 1024;
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget);
    options.duplicate_keys = serde_saphyr::options::DuplicateKeyPolicy::Error;
    if text.trim().is_empty() {
        return Ok(Node {
            value: Value::Map(Vec::new()),
            loc: Loc { line: 1, column: 1 },
            secret: false,
        });
    }
    serde_saphyr::from_str_with_options::<Spanned<RawValue>>(text, options)
        .map(into_node)
        .map_err(|e| ParseError {
            loc: e.location().map(|l| loc_of(&l)),
            message: plain_message(&e),
        })
}

// serde-saphyr renders errors with a source snippet; diagnostics print their own location, so keep
// only the first line of its text.
fn plain_message(e: &serde_saphyr::Error) -> String {
    let text = e.to_string();
    text.lines()
        .next()
        .unwrap_or("invalid YAML")
        .trim()
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_locations_of_keys_and_values() {
        let node = parse("flows:\n  - name: a\n    from:\n      timer: {interval: 1s}\n").unwrap();
        let flow = node.at_path("flows[0]").unwrap();
        assert_eq!(flow.loc.line, 2);
        let name = flow.get("name").unwrap();
        assert_eq!((name.loc.line, name.loc.column), (2, 11));
        let interval = node.at_path("flows[0].from.timer.interval").unwrap();
        assert_eq!(interval.as_str(), Some("1s"));
        assert_eq!(interval.loc.line, 4);
    }

    #[test]
    fn scalar_types() {
        let node = parse("a: 1\nb: 1.5\nc: true\nd: ~\ne: text\n").unwrap();
        assert_eq!(node.get("a").unwrap().value, Value::Int(1));
        assert_eq!(node.get("b").unwrap().value, Value::Float(1.5));
        assert_eq!(node.get("c").unwrap().value, Value::Bool(true));
        assert_eq!(node.get("d").unwrap().value, Value::Null);
        assert_eq!(node.get("e").unwrap().as_str(), Some("text"));
    }

    #[test]
    fn syntax_errors_have_locations() {
        let err = parse("a: [1, 2\nb: 3\n").unwrap_err();
        assert!(err.loc.is_some(), "{err:?}");
    }

    #[test]
    fn duplicate_keys_are_rejected() {
        assert!(parse("a: 1\na: 2\n").is_err());
    }

    #[test]
    fn alias_bombs_are_rejected() {
        let mut doc = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..12 {
            let p = i - 1;
            doc.push_str(&format!(
                "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
            ));
        }
        assert!(parse(&doc).is_err());
    }

    #[test]
    fn deep_nesting_is_rejected() {
        let doc = format!("{}1{}", "[".repeat(200), "]".repeat(200));
        assert!(parse(&doc).is_err());
    }
}
