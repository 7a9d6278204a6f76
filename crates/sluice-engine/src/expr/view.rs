//! The read-only view of a message that expressions see as `$meta` (jq) or `meta` (templates).

use std::time::SystemTime;

use serde_json::{Map, Value};
use sluice_core::{ExchangePattern, Message};

/// The message's metadata as expressions see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaView {
    /// The message id (a UUID v7).
    pub id: String,
    /// The correlation id, if any.
    pub correlation_id: Option<String>,
    /// The flow whose source produced the message, if known.
    pub origin: Option<String>,
    /// When the source created the message, in RFC 3339 (UTC, milliseconds).
    pub created_at: String,
    /// `in_only` or `in_out`.
    pub pattern: &'static str,
}

impl MetaView {
    /// Captures the metadata of `msg`.
    pub fn of(msg: &Message) -> Self {
        MetaView {
            id: msg.id().to_string(),
            correlation_id: msg.meta.correlation_id.clone(),
            origin: msg.meta.origin.as_deref().map(str::to_owned),
            created_at: rfc3339(msg.meta.created_at),
            pattern: pattern_name(msg.pattern),
        }
    }

    /// The view as a JSON object.
    pub fn to_json(&self) -> Value {
        let opt = |s: &Option<String>| s.as_ref().map_or(Value::Null, |s| Value::String(s.clone()));
        let mut map = Map::with_capacity(5);
        map.insert("id".into(), Value::String(self.id.clone()));
        map.insert("correlation_id".into(), opt(&self.correlation_id));
        map.insert("origin".into(), opt(&self.origin));
        map.insert("created_at".into(), Value::String(self.created_at.clone()));
        map.insert("pattern".into(), Value::String(self.pattern.into()));
        Value::Object(map)
    }
}

/// RFC 3339 in UTC with milliseconds, the form every `created_at` takes.
pub(crate) fn rfc3339(t: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// The snake_case name of an exchange pattern.
pub(crate) fn pattern_name(p: ExchangePattern) -> &'static str {
    match p {
        ExchangePattern::InOnly => "in_only",
        ExchangePattern::InOut => "in_out",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn meta_view_has_every_field() {
        let msg = Message::json(json!(1)).with_pattern(ExchangePattern::InOut);
        let view = MetaView::of(&msg).to_json();
        assert_eq!(view["pattern"], "in_out");
        assert_eq!(view["id"], msg.id().to_string());
        assert!(view["correlation_id"].is_null());
        assert!(view["created_at"].as_str().unwrap().ends_with('Z'));
    }
}
