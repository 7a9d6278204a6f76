//! `validate`: checks the body (or a header) against a JSON Schema (EIP Message Validator; Camel's
//! json-validator).

use std::sync::Arc;

use async_trait::async_trait;
use jsonschema::{Draft, Validator};
use serde::Deserialize;
use serde_json::{Value, json};
use sluice_core::spec::{ComponentKind, ComponentSpec, FieldSpec, FieldType};
use sluice_core::{BuildContext, BuildError, Failure, Message, Outputs, ProcessError, Processor};

use super::common;

/// The header a failed message carries its violations in, as a JSON array. It is one of the
/// `sluice.error.*` headers, which the flow copies onto a dead letter.
pub const ERRORS_HEADER: &str = "sluice.error.violations";

/// Default for `max_errors`.
const DEFAULT_MAX_ERRORS: usize = 100;

/// The step's spec.
pub fn spec() -> ComponentSpec {
    ComponentSpec::new(
        "validate",
        ComponentKind::Processor,
        "Check the body or a header against a JSON Schema",
    )
    .description(
        "Validates the JSON body (or the value of one header) against a JSON Schema (EIP Message \
Validator). A valid message continues unchanged; an invalid one fails the step with \
`invalid_input`, listing **every** violation (up to `max_errors`) as \
`<instance JSON pointer>: <what is wrong> (schema <schema JSON pointer>)`, for example \
`/items/0/qty: -1 is less than the minimum of 1 (schema /properties/items/items/properties/qty/minimum)`. \
The root of the document is written `(root)`.\n\n\
The failed message also gets the header `sluice.error.violations`: a JSON array of \
`{\"path\": ..., \"schema_path\": ..., \"message\": ...}` objects (listed as in the error), so \
`on_error` steps and dead letters (which carry the `sluice.error.*` headers) have the violations \
in a machine-readable form.\n\n\
**Schema.** Give exactly one of:\n\
* `schema`: the schema inline, as YAML (or as a string holding JSON or YAML, which is what \
`schema: ${file:order.schema.json}` gives: `${file:..}` paths are relative to the flow file).\n\
* `schema_file`: a path to a JSON or YAML file, read once when the flow loads. A relative path \
is resolved against the **working directory** of the sluice process (steps are not told where \
their flow file is); use `schema: ${file:...}` for a path relative to the flow file.\n\n\
The schema is compiled when the flow loads: a schema that is not valid for its draft, or whose \
`$ref` cannot be resolved, is a load error naming the field. Only references inside the schema \
(`#/$defs/...`, `#/definitions/...`) and to the drafts' meta-schemas resolve: nothing is fetched \
over the network or read from disk at run time.\n\n\
**Draft.** `draft` picks the specification (`draft4`, `draft6`, `draft7`, `draft2019-09`, \
`draft2020-12`); without it the draft is taken from the schema's `$schema`, and a schema without \
`$schema` is read as 2020-12.\n\n\
**What is validated.** By default the JSON body (an empty body is `null`; a body that is not JSON \
fails with `invalid_input`). With `header: name`, the header's value is validated instead: parsed \
as JSON when it is valid JSON (`42`, `true`, `{\"a\":1}`), otherwise taken as a string. A missing \
header fails with `invalid_input`.",
    )
    .field(FieldSpec::new(
        "schema",
        FieldType::Any,
        "The JSON Schema, inline (an object or a boolean), or a string holding it as JSON or YAML.",
    ))
    .field(FieldSpec::new(
        "schema_file",
        FieldType::String,
        "Path of a JSON or YAML file holding the schema, read at load time; relative to the working directory.",
    ))
    .field(FieldSpec::new(
        "draft",
        FieldType::Enum(vec![
            "draft4",
            "draft6",
            "draft7",
            "draft2019-09",
            "draft2020-12",
        ]),
        "The JSON Schema draft; default: from the schema's `$schema`, else 2020-12.",
    ))
    .field(FieldSpec::new(
        "header",
        FieldType::String,
        "Validate this header's value (parsed as JSON when it is JSON, else a string) instead of the body.",
    ))
    .field(FieldSpec::new(
        "check_formats",
        FieldType::Bool,
        "Whether `format` (`email`, `date-time`, `uuid`, ...) is checked: default as the draft says (drafts 4, 6 and 7 check it; 2019-09 and 2020-12 treat it as an annotation).",
    ))
    .field(
        FieldSpec::new(
            "max_errors",
            FieldType::Integer {
                min: Some(1),
                max: Some(10_000),
            },
            "Most violations listed in the error and the header (1 to 10000); the rest are counted as `... and more`.",
        )
        .default_value(DEFAULT_MAX_ERRORS),
    )
    .example(
        "Orders need an id and positive quantities",
        "schema:\n  type: object\n  required: [id, items]\n  properties:\n    id: {type: string}\n    items:\n      type: array\n      minItems: 1\n      items:\n        type: object\n        required: [sku, qty]\n        properties:\n          sku: {type: string}\n          qty: {type: integer, minimum: 1}\n",
    )
    .example(
        "A header must be a positive number",
        "header: x-priority\ndraft: draft7\nschema: {type: integer, minimum: 0}\n",
    )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    schema: Option<Value>,
    schema_file: Option<String>,
    draft: Option<String>,
    header: Option<String>,
    check_formats: Option<bool>,
    max_errors: Option<usize>,
}

/// Builds the step.
pub fn build(config: &Value, _ctx: &BuildContext<'_>) -> Result<Arc<dyn Processor>, BuildError> {
    let config: Config = common::config(config)?;
    let (field, schema) = match (&config.schema, &config.schema_file) {
        (Some(schema), None) => ("schema", inline_schema(schema)?),
        (None, Some(path)) => ("schema_file", file_schema(path)?),
        (Some(_), Some(_)) => {
            return Err(BuildError::field(
                "schema_file",
                "give either `schema` or `schema_file`, not both",
            ));
        }
        (None, None) => {
            return Err(BuildError::field(
                "schema",
                "give the schema inline with `schema` or as a path with `schema_file`",
            ));
        }
    };
    let mut options = jsonschema::options();
    if let Some(draft) = &config.draft {
        options = options.with_draft(parse_draft(draft)?);
    }
    if let Some(check) = config.check_formats {
        options = options.should_validate_formats(check);
    }
    let validator = options
        .build(&schema)
        .map_err(|e| BuildError::field(field, format!("invalid JSON Schema: {e}")))?;
    Ok(Arc::new(Validate {
        validator,
        header: config.header,
        max_errors: config.max_errors.unwrap_or(DEFAULT_MAX_ERRORS).max(1),
    }))
}

/// An inline schema, or a string holding one (what `${file:..}` interpolation gives).
fn inline_schema(schema: &Value) -> Result<Value, BuildError> {
    match schema {
        Value::String(text) => serde_saphyr::from_str::<Value>(text).map_err(|e| {
            BuildError::field(
                "schema",
                format!("the schema string is neither JSON nor YAML: {e}"),
            )
        }),
        Value::Object(_) | Value::Bool(_) => Ok(schema.clone()),
        _ => Err(BuildError::field(
            "schema",
            "a JSON Schema is an object or a boolean",
        )),
    }
}

fn file_schema(path: &str) -> Result<Value, BuildError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        BuildError::field(
            "schema_file",
            format!(
                "cannot read `{path}`: {e} (relative paths start at the working directory; \
                 use `schema: ${{file:{path}}}` for a path relative to the flow file)"
            ),
        )
    })?;
    serde_saphyr::from_str::<Value>(&text).map_err(|e| {
        BuildError::field(
            "schema_file",
            format!("`{path}` is neither JSON nor YAML: {e}"),
        )
    })
}

fn parse_draft(name: &str) -> Result<Draft, BuildError> {
    Ok(match name {
        "draft4" => Draft::Draft4,
        "draft6" => Draft::Draft6,
        "draft7" => Draft::Draft7,
        "draft2019-09" => Draft::Draft201909,
        "draft2020-12" => Draft::Draft202012,
        other => {
            return Err(BuildError::field(
                "draft",
                format!("unknown draft `{other}`"),
            ));
        }
    })
}

struct Validate {
    validator: Validator,
    header: Option<String>,
    max_errors: usize,
}

/// One violation, as reported.
struct Violation {
    path: String,
    schema_path: String,
    message: String,
}

impl Violation {
    fn line(&self) -> String {
        let path = if self.path.is_empty() {
            "(root)"
        } else {
            &self.path
        };
        format!("{path}: {} (schema {})", self.message, self.schema_path)
    }

    fn json(&self) -> Value {
        json!({"path": self.path, "schema_path": self.schema_path, "message": self.message})
    }
}

impl Validate {
    /// The violations of `instance` (at most `max_errors`) and whether there were more.
    fn violations(&self, instance: &Value) -> (Vec<Violation>, bool) {
        let mut errors = self.validator.iter_errors(instance);
        let listed: Vec<Violation> = errors
            .by_ref()
            .take(self.max_errors)
            .map(|e| Violation {
                path: e.instance_path().to_string(),
                schema_path: e.schema_path().to_string(),
                message: e.to_string(),
            })
            .collect();
        let more = errors.next().is_some();
        (listed, more)
    }

    fn instance(&self, msg: &Message) -> Result<Arc<Value>, ProcessError> {
        match &self.header {
            None => msg
                .body
                .json_shared()
                .map_err(|e| ProcessError::invalid_input(e.to_string())),
            Some(name) => {
                let raw = msg.headers.get(name).ok_or_else(|| {
                    ProcessError::invalid_input(format!(
                        "header `{name}` is missing, so it cannot be validated"
                    ))
                })?;
                Ok(Arc::new(
                    serde_json::from_str(raw).unwrap_or_else(|_| Value::String(raw.clone())),
                ))
            }
        }
    }
}

#[async_trait]
impl Processor for Validate {
    async fn process(&self, mut msg: Message) -> Result<Outputs, Failure> {
        let instance = match self.instance(&msg) {
            Ok(instance) => instance,
            Err(e) => return Err(Failure::new(msg, e)),
        };
        let (violations, more) = self.violations(&instance);
        if violations.is_empty() {
            return Ok(common::one(msg));
        }
        let what = match &self.header {
            Some(name) => format!("header `{name}`"),
            None => "body".to_owned(),
        };
        let mut detail = format!("{what} does not match the schema: ");
        detail.push_str(
            &violations
                .iter()
                .map(Violation::line)
                .collect::<Vec<_>>()
                .join("; "),
        );
        if more {
            detail.push_str(&format!(
                "; ... and more (only the first {} are listed)",
                self.max_errors
            ));
        }
        let list = Value::Array(violations.iter().map(Violation::json).collect());
        msg.headers
            .insert(ERRORS_HEADER.to_owned(), list.to_string());
        Err(Failure::new(msg, ProcessError::invalid_input(detail)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::processors::testkit::{build_one, process, try_build};
    use sluice_core::{AckToken, ErrorKind, Outcome};

    fn orders() -> Arc<dyn Processor> {
        build_one(
            "validate",
            json!({"schema": {
                "type": "object",
                "required": ["id", "items"],
                "properties": {
                    "id": {"type": "string"},
                    "items": {"type": "array", "items": {
                        "type": "object",
                        "properties": {"qty": {"type": "integer", "minimum": 1}}
                    }}
                }
            }}),
        )
    }

    #[tokio::test]
    async fn valid_messages_pass_unchanged() {
        let (token, rx) = AckToken::channel();
        let msg = Message::json(json!({"id": "a", "items": [{"qty": 2}]})).with_ack(token);
        let id = msg.id();
        let out = process(&orders(), msg).await.unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].id(), id);
        assert!(!out[0].headers.contains_key(ERRORS_HEADER));
        out.into_iter().for_each(Message::ack);
        assert_eq!(rx.await.unwrap(), Outcome::Ack);
    }

    #[tokio::test]
    async fn every_violation_is_listed_with_its_paths() {
        let body = json!({"id": 7, "items": [{"qty": -1}, {"qty": 3}, {"qty": 0}]});
        let f = process(&orders(), Message::json(body.clone()))
            .await
            .unwrap_err();
        assert_eq!(f.error.kind, ErrorKind::InvalidInput);
        let detail = &f.error.detail;
        assert!(
            detail.starts_with("body does not match the schema: "),
            "{detail}"
        );
        assert!(
            detail.contains(
                "/items/0/qty: -1 is less than the minimum of 1 (schema /properties/items/items/properties/qty/minimum)"
            ),
            "{detail}"
        );
        assert!(
            detail.contains("/items/2/qty: 0 is less than the minimum of 1"),
            "{detail}"
        );
        assert!(
            detail.contains("/id: 7 is not of type \"string\""),
            "{detail}"
        );
        assert!(!detail.contains("/items/1"), "{detail}");
        let header: Value = serde_json::from_str(&f.message.headers[ERRORS_HEADER]).unwrap();
        let list = header.as_array().unwrap();
        assert_eq!(list.len(), 3);
        assert!(list.iter().any(|v| v["path"] == "/items/0/qty"
            && v["schema_path"] == "/properties/items/items/properties/qty/minimum"));
        assert_eq!(f.message.body.json().unwrap(), &body, "message handed back");
    }

    #[tokio::test]
    async fn the_root_is_named_and_the_list_is_limited() {
        let step = build_one(
            "validate",
            json!({"schema": {"required": ["a", "b", "c"]}, "max_errors": 2}),
        );
        let f = process(&step, Message::json(json!({}))).await.unwrap_err();
        assert!(
            f.error
                .detail
                .contains("(root): \"a\" is a required property"),
            "{}",
            f.error.detail
        );
        assert!(
            f.error
                .detail
                .ends_with("... and more (only the first 2 are listed)"),
            "{}",
            f.error.detail
        );
        let header: Value = serde_json::from_str(&f.message.headers[ERRORS_HEADER]).unwrap();
        assert_eq!(header.as_array().unwrap().len(), 2);
    }

    #[tokio::test]
    async fn headers_are_parsed_as_json_or_taken_as_strings() {
        let step = build_one(
            "validate",
            json!({"header": "x-n", "schema": {"type": "integer", "minimum": 0}}),
        );
        let ok = Message::json(json!(null)).with_header("x-n", "5");
        assert_eq!(process(&step, ok).await.unwrap().len(), 1);
        let f = process(&step, Message::json(json!(null)).with_header("x-n", "-5"))
            .await
            .unwrap_err();
        assert!(
            f.error.detail.starts_with("header `x-n` does not match"),
            "{}",
            f.error.detail
        );
        let f = process(&step, Message::json(json!(null)).with_header("x-n", "five"))
            .await
            .unwrap_err();
        assert!(
            f.error
                .detail
                .contains("\"five\" is not of type \"integer\""),
            "{}",
            f.error.detail
        );
        let f = process(&step, Message::json(json!(null)))
            .await
            .unwrap_err();
        assert!(f.error.detail.contains("header `x-n` is missing"));
        // A header is validated even when the body is not JSON.
        let text = Message::bytes(&b"not json"[..]).with_header("x-n", "1");
        assert_eq!(process(&step, text).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_body_that_is_not_json_is_invalid_input() {
        let f = process(&orders(), Message::bytes(&b"{oops"[..]))
            .await
            .unwrap_err();
        assert_eq!(f.error.kind, ErrorKind::InvalidInput);
        assert!(f.error.detail.contains("not valid JSON"));
    }

    #[tokio::test]
    async fn the_draft_is_chosen_explicitly_or_by_schema_keyword() {
        // `exclusiveMinimum: true` is draft 4 syntax; in draft 7 it must be a number.
        let draft4 = json!({"minimum": 1, "exclusiveMinimum": true});
        let step = build_one("validate", json!({"draft": "draft4", "schema": draft4}));
        assert!(process(&step, Message::json(json!(1))).await.is_err());
        assert!(process(&step, Message::json(json!(2))).await.is_ok());
        let by_keyword = json!({
            "$schema": "http://json-schema.org/draft-04/schema#",
            "minimum": 1, "exclusiveMinimum": true
        });
        let step = build_one("validate", json!({"schema": by_keyword}));
        assert!(process(&step, Message::json(json!(1))).await.is_err());
        let e = try_build("validate", &json!({"draft": "draft7", "schema": draft4}))
            .err()
            .unwrap();
        assert_eq!(e.field.as_deref(), Some("schema"));
        assert!(e.message.contains("invalid JSON Schema"), "{e}");
    }

    #[tokio::test]
    async fn formats_are_checked_on_request() {
        let schema = json!({"type": "string", "format": "email"});
        let lenient = build_one("validate", json!({"schema": schema}));
        assert!(
            process(&lenient, Message::json(json!("nope")))
                .await
                .is_ok()
        );
        let strict = build_one("validate", json!({"schema": schema, "check_formats": true}));
        let f = process(&strict, Message::json(json!("nope")))
            .await
            .unwrap_err();
        assert!(
            f.error.detail.contains("is not a \"email\""),
            "{}",
            f.error.detail
        );
        assert!(
            process(&strict, Message::json(json!("a@example.com")))
                .await
                .is_ok()
        );
    }

    #[tokio::test]
    async fn schemas_come_from_strings_and_files() {
        let step = build_one("validate", json!({"schema": "{\"type\": \"string\"}"}));
        assert!(process(&step, Message::json(json!("s"))).await.is_ok());
        assert!(process(&step, Message::json(json!(1))).await.is_err());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("schema.yaml");
        std::fs::write(&path, "type: array\nmaxItems: 1\n").unwrap();
        let step = build_one("validate", json!({"schema_file": path.to_str().unwrap()}));
        assert!(process(&step, Message::json(json!([1]))).await.is_ok());
        assert!(process(&step, Message::json(json!([1, 2]))).await.is_err());
    }

    #[test]
    fn bad_schemas_are_build_errors_naming_the_field() {
        let e = try_build("validate", &json!({"schema": {"type": "integr"}}))
            .err()
            .unwrap();
        assert_eq!(e.field.as_deref(), Some("schema"));
        let e = try_build("validate", &json!({"schema_file": "/nonexistent/s.json"}))
            .err()
            .unwrap();
        assert_eq!(e.field.as_deref(), Some("schema_file"));
        assert!(e.message.contains("working directory"), "{e}");
        let e = try_build("validate", &json!({})).err().unwrap();
        assert_eq!(e.field.as_deref(), Some("schema"));
        let e = try_build("validate", &json!({"schema": {}, "schema_file": "x.json"}))
            .err()
            .unwrap();
        assert!(e.message.contains("not both"));
        let e = try_build("validate", &json!({"schema": {"$ref": "#/$defs/missing"}}))
            .err()
            .unwrap();
        assert_eq!(e.field.as_deref(), Some("schema"));
    }
}
