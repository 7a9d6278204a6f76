//! Component specs: the single source of truth for a component's configuration.
//!
//! One spec drives validation of flow files (types, required fields, unknown fields, suggestions),
//! the JSON Schema for editor autocomplete (`sluice schema`) and the reference docs (`sluice docs`).

use serde_json::Value;

/// Which role a component plays in a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ComponentKind {
    /// Used under `from:`.
    Source,
    /// Used under `steps:`.
    Processor,
    /// Used under `to:`.
    Sink,
}

impl ComponentKind {
    /// The plural noun used in docs and messages.
    pub fn plural(self) -> &'static str {
        match self {
            ComponentKind::Source => "sources",
            ComponentKind::Processor => "processors",
            ComponentKind::Sink => "sinks",
        }
    }

    /// The flow-file key components of this kind appear under.
    pub fn flow_key(self) -> &'static str {
        match self {
            ComponentKind::Source => "from",
            ComponentKind::Processor => "steps",
            ComponentKind::Sink => "to",
        }
    }
}

/// The type of a configuration field.
#[derive(Debug, Clone, PartialEq)]
pub enum FieldType {
    /// Any string.
    String,
    /// A whole number, optionally bounded (inclusive).
    Integer {
        /// Smallest allowed value.
        min: Option<i64>,
        /// Largest allowed value.
        max: Option<i64>,
    },
    /// A number.
    Float,
    /// `true` or `false`.
    Bool,
    /// A duration such as `250ms`, `5s`, `1m30s`.
    Duration,
    /// A size in bytes: a number, or a string such as `512KiB`, `10MiB`.
    ByteSize,
    /// One of a fixed set of strings.
    Enum(Vec<&'static str>),
    /// A jq expression, compiled (and so checked) when the flow loads.
    Jq,
    /// A minijinja template, compiled when the flow loads.
    Template,
    /// A list of values of one type.
    List(Box<FieldType>),
    /// A map from strings to values of one type.
    Map(Box<FieldType>),
    /// A nested object with its own fields.
    Object(Vec<FieldSpec>),
    /// A nested list of steps (for composite processors such as `choice`).
    Steps,
    /// Either of several types (e.g. a string or a list of strings).
    OneOf(Vec<FieldType>),
    /// Any JSON-compatible value.
    Any,
}

impl FieldType {
    /// A short human name for messages ("a duration", "a list of strings").
    pub fn describe(&self) -> String {
        match self {
            FieldType::String => "a string".into(),
            FieldType::Integer { min, max } => match (min, max) {
                (Some(a), Some(b)) => format!("a whole number from {a} to {b}"),
                (Some(a), None) => format!("a whole number of at least {a}"),
                (None, Some(b)) => format!("a whole number of at most {b}"),
                (None, None) => "a whole number".into(),
            },
            FieldType::Float => "a number".into(),
            FieldType::Bool => "true or false".into(),
            FieldType::Duration => "a duration such as `500ms` or `5s`".into(),
            FieldType::ByteSize => "a size such as `1MiB` or a number of bytes".into(),
            FieldType::Enum(values) => format!(
                "one of {}",
                values
                    .iter()
                    .map(|v| format!("`{v}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            FieldType::Jq => "a jq expression (a string)".into(),
            FieldType::Template => "a template (a string)".into(),
            FieldType::List(inner) => format!("a list of {}", strip_article(&inner.describe())),
            FieldType::Map(inner) => {
                format!("a map of names to {}", strip_article(&inner.describe()))
            }
            FieldType::Object(_) => "an object".into(),
            FieldType::Steps => "a list of steps".into(),
            FieldType::OneOf(types) => types
                .iter()
                .map(FieldType::describe)
                .collect::<Vec<_>>()
                .join(" or "),
            FieldType::Any => "any value".into(),
        }
    }
}

fn strip_article(s: &str) -> String {
    let s = s
        .strip_prefix("a ")
        .or_else(|| s.strip_prefix("an "))
        .unwrap_or(s);
    if s.ends_with('s') || s.contains(' ') {
        s.to_owned()
    } else {
        format!("{s}s")
    }
}

/// One configuration field of a component.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldSpec {
    /// The key in the flow file.
    pub name: &'static str,
    /// Its type.
    pub ty: FieldType,
    /// Whether the flow must set it.
    pub required: bool,
    /// The value used when it is absent.
    pub default: Option<Value>,
    /// What it means, one or two sentences.
    pub doc: &'static str,
    /// Whether its value is a secret: never echoed in errors, logs or docs examples.
    pub secret: bool,
}

impl FieldSpec {
    /// An optional field without default.
    pub fn new(name: &'static str, ty: FieldType, doc: &'static str) -> Self {
        FieldSpec {
            name,
            ty,
            required: false,
            default: None,
            doc,
            secret: false,
        }
    }

    /// Marks the field required.
    #[must_use]
    pub fn required(mut self) -> Self {
        self.required = true;
        self
    }

    /// Sets the default value.
    #[must_use]
    pub fn default_value(mut self, value: impl Into<Value>) -> Self {
        self.default = Some(value.into());
        self
    }

    /// Marks the field as holding a secret.
    #[must_use]
    pub fn secret(mut self) -> Self {
        self.secret = true;
        self
    }
}

/// A runnable example of a component, shown in its docs and checked by tests.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// One line saying what it shows.
    pub title: &'static str,
    /// The component's configuration, as YAML (the part under the component's key).
    pub yaml: &'static str,
}

/// Everything the runtime, the linter and the docs know about one component.
#[derive(Debug, Clone, PartialEq)]
pub struct ComponentSpec {
    /// The key in flow files (`http`, `transform`, `recipient_list`).
    pub name: &'static str,
    /// Source, processor or sink.
    pub kind: ComponentKind,
    /// One line.
    pub summary: &'static str,
    /// Longer Markdown description: behaviour, delivery guarantee, limits.
    pub description: &'static str,
    /// Configuration fields.
    pub fields: Vec<FieldSpec>,
    /// The field a scalar shorthand sets: `filter: '.ok'` means `filter: {condition: '.ok'}`.
    pub shorthand: Option<&'static str>,
    /// Examples.
    pub examples: Vec<Example>,
}

impl ComponentSpec {
    /// A new spec with no fields.
    pub fn new(name: &'static str, kind: ComponentKind, summary: &'static str) -> Self {
        ComponentSpec {
            name,
            kind,
            summary,
            description: "",
            fields: Vec::new(),
            shorthand: None,
            examples: Vec::new(),
        }
    }

    /// Sets the long description.
    #[must_use]
    pub fn description(mut self, text: &'static str) -> Self {
        self.description = text;
        self
    }

    /// Adds a field.
    #[must_use]
    pub fn field(mut self, field: FieldSpec) -> Self {
        self.fields.push(field);
        self
    }

    /// Names the field set by a scalar shorthand.
    #[must_use]
    pub fn shorthand(mut self, field: &'static str) -> Self {
        self.shorthand = Some(field);
        self
    }

    /// Adds an example.
    #[must_use]
    pub fn example(mut self, title: &'static str, yaml: &'static str) -> Self {
        self.examples.push(Example { title, yaml });
        self
    }

    /// The field called `name`.
    pub fn get(&self, name: &str) -> Option<&FieldSpec> {
        self.fields.iter().find(|f| f.name == name)
    }
}
