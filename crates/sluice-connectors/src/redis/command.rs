//! The `redis` processor: GET, SET or INCRBY a key named from the message, for lookups (as an
//! `enrich` step's call), shared counters and state between instances.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::Value;
use sluice_core::duration::HumanDuration;
use sluice_core::spec::{ComponentKind, ComponentSpec, FieldSpec, FieldType};
use sluice_core::{
    Body, BuildContext, BuildError, Failure, HealthHandle, Message, Outputs, ProcessError,
    Processor,
};

use super::{LazyConnection, client, default_url, url_field};
use crate::template::Template;

/// Header set by `get`: whether the key existed.
pub const FOUND_HEADER: &str = "redis.found";
/// Header set by `incr`: the counter's value after the increment.
pub const VALUE_HEADER: &str = "redis.value";

const DESCRIPTION: &str = "\
Runs one command on the key `key` (`{header}` placeholders are filled from message headers):

* `get`: the value becomes the body and `redis.found` is `true`; a missing key leaves the body \
  unchanged with `redis.found: false`.
* `set`: stores the body under the key (for `ttl` if given); the message goes on unchanged.
* `incr`: adds `by` to the integer under the key (a missing key counts as 0), sets the new value \
  in the header `redis.value`, and with `ttl` starts the key's expiry when it is created (a \
  fixed-window counter shared by every instance).

**Delivery guarantee.** none needed: a step, run once per message; failures go to the flow's \
error handling (a retried `incr` counts twice).

**Limits.** Values are bytes; keys must be UTF-8. A connection failure is `unavailable`, an \
error answer (a value that is not an integer for `incr`) is `remote`. No TLS.";

/// The `redis` processor's spec.
pub fn spec() -> ComponentSpec {
    url_field(
        ComponentSpec::new(
            "redis",
            ComponentKind::Processor,
            "Get, set or increment a Redis key",
        )
        .description(DESCRIPTION),
    )
    .field(
        FieldSpec::new(
            "command",
            FieldType::Enum(vec!["get", "set", "incr"]),
            "What to do with the key.",
        )
        .required(),
    )
    .field(
        FieldSpec::new(
            "key",
            FieldType::String,
            "The key; `{header}` placeholders are filled from message headers.",
        )
        .required(),
    )
    .field(FieldSpec::new(
        "ttl",
        FieldType::Duration,
        "Expiry for `set`, and for a key `incr` creates.",
    ))
    .field(
        FieldSpec::new(
            "by",
            FieldType::Integer {
                min: None,
                max: None,
            },
            "Increment for `incr`.",
        )
        .default_value(1),
    )
    .example(
        "Look up a customer",
        "command: get\nkey: \"customer:{customer-id}\"\n",
    )
    .example(
        "Count requests per client per minute",
        "command: incr\nkey: \"rate:{client-id}\"\nttl: 1m\n",
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Command {
    Get,
    Set,
    Incr,
}

#[derive(Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "default_url")]
    url: String,
    command: Command,
    key: String,
    #[serde(default)]
    ttl: Option<HumanDuration>,
    #[serde(default = "one")]
    by: i64,
}

fn one() -> i64 {
    1
}

/// What a command returned.
enum Done {
    Value(Option<Vec<u8>>),
    Set,
    Count(i64),
}

struct RedisCommand {
    command: Command,
    key: Template,
    ttl: Option<Duration>,
    by: i64,
    conn: LazyConnection,
}

/// Builds the `redis` processor.
pub fn build(config: &Value, ctx: &BuildContext<'_>) -> Result<Arc<dyn Processor>, BuildError> {
    let c: Config = crate::config::parse(config)?;
    let client = client(&c.url)?;
    if c.key.is_empty() {
        return Err(BuildError::field("key", "must not be empty"));
    }
    let key = Template::parse(&c.key).map_err(|e| BuildError::field("key", e.to_string()))?;
    if c.ttl.is_some_and(|t| t.0 < Duration::from_millis(1)) {
        return Err(BuildError::field("ttl", "must be at least 1ms"));
    }
    if c.ttl.is_some() && c.command == Command::Get {
        return Err(BuildError::field(
            "ttl",
            "has no meaning for `get`; remove it",
        ));
    }
    Ok(Arc::new(RedisCommand {
        conn: LazyConnection::new(client, c.url, HealthHandle::for_component(ctx)),
        command: c.command,
        key,
        ttl: c.ttl.map(|t| t.0),
        by: c.by,
    }))
}

#[async_trait]
impl Processor for RedisCommand {
    async fn process(&self, msg: Message) -> Result<Outputs, Failure> {
        match self.run(msg).await {
            Ok(out) => Ok(std::iter::once(out).collect()),
            Err((msg, e)) => Err(Failure::new(msg, e)),
        }
    }
}

impl RedisCommand {
    async fn run(&self, msg: Message) -> Result<Message, (Message, ProcessError)> {
        let key = match self.key.render(|name| {
            msg.headers.get(name).cloned().ok_or_else(|| {
                ProcessError::invalid_input(format!(
                    "the key needs header `{name}`, which the message lacks"
                ))
            })
        }) {
            Ok(key) => key,
            Err(e) => return Err((msg, e)),
        };
        let ms = self
            .ttl
            .map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX));
        let what = format!("{:?} `{key}`", self.command).to_uppercase();
        let done: Result<Done, ProcessError> = match self.command {
            Command::Get => {
                let mut cmd = redis::cmd("GET");
                cmd.arg(&key);
                self.conn.query(&what, &cmd).await.map(Done::Value)
            }
            Command::Set => {
                let mut cmd = redis::cmd("SET");
                cmd.arg(&key).arg(msg.body.as_bytes().as_ref());
                if let Some(ms) = ms {
                    cmd.arg("PX").arg(ms);
                }
                self.conn.query::<()>(&what, &cmd).await.map(|()| Done::Set)
            }
            Command::Incr => {
                let mut pipe = redis::pipe();
                pipe.atomic().cmd("INCRBY").arg(&key).arg(self.by);
                if let Some(ms) = ms {
                    // NX: only a key without expiry (just created) gets one: a fixed window.
                    pipe.cmd("PEXPIRE").arg(&key).arg(ms).arg("NX").ignore();
                }
                self.conn
                    .query_pipe::<(i64,)>(&what, &pipe)
                    .await
                    .map(|(v,)| Done::Count(v))
            }
        };
        match done {
            Ok(Done::Value(Some(v))) => Ok(msg
                .derive(Body::from_bytes(Bytes::from(v)))
                .with_header(FOUND_HEADER, "true")),
            Ok(Done::Value(None)) => Ok(msg.with_header(FOUND_HEADER, "false")),
            Ok(Done::Set) => Ok(msg),
            Ok(Done::Count(v)) => Ok(msg.with_header(VALUE_HEADER, v.to_string())),
            Err(e) => Err((msg, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::assert_defaults_agree;
    use serde_json::json;

    #[test]
    fn serde_defaults_match_spec_defaults() {
        assert_defaults_agree::<Config>(&spec(), json!({"command": "incr", "key": "k"}));
    }
}
