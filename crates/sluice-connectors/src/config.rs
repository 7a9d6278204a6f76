//! Turning a component's validated JSON configuration into its typed config struct.

use serde::de::DeserializeOwned;
use sluice_core::BuildError;

/// Deserializes `value` into `T`, turning serde's message into a [`BuildError`].
///
/// The engine has already validated the value against the spec, so a failure here means the spec
/// and the struct disagree or the factory was called directly with a bad value.
pub fn parse<T: DeserializeOwned>(value: &serde_json::Value) -> Result<T, BuildError> {
    T::deserialize(value).map_err(|e| {
        let text = e.to_string();
        // serde names the offending field as "unknown field `x`" or "missing field `x`".
        let field = text
            .split('`')
            .nth(1)
            .filter(|_| text.starts_with("unknown field") || text.starts_with("missing field"));
        let message = format!("{text}; check the component's fields in `sluice docs`");
        match field {
            Some(f) => BuildError::field(f, message),
            None => BuildError::new(message),
        }
    })
}

/// Asserts that deserializing only `required` gives the same config as deserializing it with
/// `spec`'s defaults filled in, as the engine does: the serde defaults repeat the spec's.
#[cfg(test)]
#[allow(clippy::needless_pass_by_value)] // called with `json!` literals
pub(crate) fn assert_defaults_agree<T>(
    spec: &sluice_core::spec::ComponentSpec,
    required: serde_json::Value,
) where
    T: DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let mut filled = required.as_object().cloned().unwrap_or_default();
    for field in &spec.fields {
        if let Some(default) = &field.default {
            filled
                .entry(field.name.to_owned())
                .or_insert_with(|| default.clone());
        }
    }
    let bare: T = parse(&required).unwrap_or_else(|e| panic!("{}: {e}", spec.name));
    let full: T =
        parse(&serde_json::Value::Object(filled)).unwrap_or_else(|e| panic!("{}: {e}", spec.name));
    assert_eq!(
        bare, full,
        "{}: serde defaults and spec defaults differ",
        spec.name
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Demo {
        a: u32,
    }

    #[test]
    fn unknown_field_names_the_field() {
        let err = parse::<Demo>(&serde_json::json!({"a": 1, "b": 2})).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("b"));
        let err = parse::<Demo>(&serde_json::json!({})).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("a"));
        let err = parse::<Demo>(&serde_json::json!({"a": "x"})).unwrap_err();
        assert_eq!(err.field, None);
    }
}
