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
