//! `claim_check`: keeps a message's body aside and carries a claim instead, then restores it
//! (EIP Claim Check).

mod memory;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{Value, json};
use sluice_core::bytesize::ByteSize;
use sluice_core::duration::HumanDuration;
use sluice_core::spec::{ComponentKind, ComponentSpec, FieldSpec, FieldType};
use sluice_core::state::ClaimCheckStore;
use sluice_core::{
    Body, BuildContext, BuildError, Failure, Message, Outputs, ProcessError, Processor,
};

use super::common;
use super::named_store::{self, StoreRequest};
use super::ttl;

pub(crate) use memory::MemoryClaimStore;

/// The header carrying the claim with `claim: header`.
pub const CLAIM_HEADER: &str = "sluice.claim";

const DEFAULT_MAX_BYTES: u64 = 64 << 20;

/// The step's spec.
pub fn spec() -> ComponentSpec {
    ComponentSpec::new(
        "claim_check",
        ComponentKind::Processor,
        "Keep the body aside and carry a claim instead, or restore the body from its claim",
    )
    .description(
        "With `mode: check_in` the message's body is kept in a store and replaced by a claim, a \
new unique id: the body becomes `{\"claim\": \"<id>\"}` (`claim: body`, the default), or the body \
becomes empty and the id travels in the header `sluice.claim` (`claim: header`). The message then \
crosses the steps, channels and flows that need not see the body (EIP Claim Check).\n\n\
With `mode: check_out` the claim is read back (the `claim` field of a JSON body, or the header) \
and the kept body replaces the message's body (the whole body: fields added beside the claim are \
dropped); the header is removed. `remove: true` (the default) deletes the body from the store; \
`remove: false` leaves it for other check-outs until its `ttl` ends. A message without a claim, \
or whose claim is unknown, already checked out or expired, fails with `invalid_input` naming the \
claim.\n\n\
**Store.** Steps giving the same `store` name (default `default`) share one store, in one flow or \
across flows, so a check-in and a check-out meet. It is kept in memory, at most `max_bytes` of \
bodies in total; bodies expire after the `ttl` given at check-in. A full store fails the check-in \
with `unavailable` (bodies whose claims still travel are never dropped early); a body larger than \
the whole store fails with `rejected`. Memory is lost on restart.",
    )
    .field(
        FieldSpec::new(
            "mode",
            FieldType::Enum(vec!["check_in", "check_out"]),
            "`check_in` keeps the body and carries a claim; `check_out` restores the body from the claim.",
        )
        .required(),
    )
    .field(
        FieldSpec::new(
            "claim",
            FieldType::Enum(vec!["body", "header"]),
            "Where the claim travels: as the body `{\"claim\": \"<id>\"}` or in the header `sluice.claim`.",
        )
        .default_value("body"),
    )
    .field(
        FieldSpec::new("store", FieldType::String, "The name of the store; check-ins and check-outs with the same name meet.")
            .default_value("default"),
    )
    .field(
        FieldSpec::new("ttl", FieldType::Duration, "`check_in`: how long the body is kept if never checked out.")
            .default_value("1h"),
    )
    .field(
        FieldSpec::new("remove", FieldType::Bool, "`check_out`: delete the body from the store once restored.")
            .default_value(true),
    )
    .field(FieldSpec::new(
        "max_bytes",
        FieldType::ByteSize,
        "Most bytes of bodies the store holds (default 64MiB); fixed by the first step that names the store.",
    ))
    .shorthand("mode")
    .example("Check the body in", "mode: check_in\nstore: documents\nttl: 10m\n")
    .example(
        "Restore it later, in another flow",
        "mode: check_out\nstore: documents\n",
    )
    .example(
        "Carry the claim in a header and keep the body for several readers",
        "mode: check_out\nclaim: header\nremove: false\n",
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Mode {
    CheckIn,
    CheckOut,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Carrier {
    #[default]
    Body,
    Header,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    mode: Mode,
    #[serde(default)]
    claim: Carrier,
    #[serde(default = "default_store")]
    store: String,
    #[serde(default = "one_hour")]
    ttl: HumanDuration,
    #[serde(default = "yes")]
    remove: bool,
    max_bytes: Option<ByteSize>,
}

// The defaults repeat the spec's, for configurations that did not go through validation (tests).
fn default_store() -> String {
    "default".to_owned()
}
fn one_hour() -> HumanDuration {
    HumanDuration(Duration::from_secs(3600))
}
fn yes() -> bool {
    true
}

/// Builds the step.
pub fn build(config: &Value, ctx: &BuildContext<'_>) -> Result<Arc<dyn Processor>, BuildError> {
    let config: Config = common::config(config)?;
    let ttl = ttl::checked(config.ttl.0)?;
    let store = named_store::resolve::<dyn ClaimCheckStore>(
        ctx.resources,
        &StoreRequest {
            name: Some(&config.store),
            name_field: "store",
            capacity: config.max_bytes.map(|size| size.0),
            capacity_field: "max_bytes",
            default_capacity: DEFAULT_MAX_BYTES,
        },
        |max| Arc::new(MemoryClaimStore::new(max)),
    )?;
    Ok(Arc::new(ClaimCheck {
        mode: config.mode,
        carrier: config.claim,
        name: config.store,
        ttl,
        remove: config.remove,
        store,
    }))
}

struct ClaimCheck {
    mode: Mode,
    carrier: Carrier,
    name: String,
    ttl: Duration,
    remove: bool,
    store: Arc<dyn ClaimCheckStore>,
}

impl ClaimCheck {
    async fn check_in(&self, mut msg: Message) -> Result<Message, (Message, ProcessError)> {
        let claim = uuid::Uuid::now_v7().to_string();
        if let Err(e) = self
            .store
            .check_in(&claim, msg.body.clone(), self.ttl)
            .await
        {
            return Err((msg, e));
        }
        match self.carrier {
            Carrier::Body => msg.body = Body::from_json(json!({ "claim": claim })),
            Carrier::Header => {
                msg.body = Body::default();
                msg.headers.insert(CLAIM_HEADER.to_owned(), claim);
            }
        }
        Ok(msg)
    }

    fn claim_of(&self, msg: &Message) -> Result<String, ProcessError> {
        let claim = match self.carrier {
            Carrier::Header => msg.headers.get(CLAIM_HEADER).cloned(),
            Carrier::Body => msg
                .body
                .json()
                .ok()
                .and_then(|body| body.get("claim")?.as_str().map(str::to_owned)),
        };
        claim.ok_or_else(|| {
            ProcessError::invalid_input(match self.carrier {
                Carrier::Header => {
                    format!("the message has no `{CLAIM_HEADER}` header to check out")
                }
                Carrier::Body => {
                    "the body has no claim to check out: expected `{\"claim\": \"<id>\"}`"
                        .to_owned()
                }
            })
        })
    }

    async fn check_out(&self, mut msg: Message) -> Result<Message, (Message, ProcessError)> {
        let claim = match self.claim_of(&msg) {
            Ok(claim) => claim,
            Err(e) => return Err((msg, e)),
        };
        match self.store.check_out(&claim, self.remove).await {
            Ok(Some(body)) => {
                msg.body = body;
                msg.headers.remove(CLAIM_HEADER);
                Ok(msg)
            }
            Ok(None) => Err((
                msg,
                ProcessError::invalid_input(format!(
                    "claim `{claim}` is not in claim check store `{}`: never checked in there, \
already checked out, or expired",
                    self.name
                )),
            )),
            Err(e) => Err((msg, e)),
        }
    }
}

#[async_trait]
impl Processor for ClaimCheck {
    async fn process(&self, msg: Message) -> Result<Outputs, Failure> {
        let result = match self.mode {
            Mode::CheckIn => self.check_in(msg).await,
            Mode::CheckOut => self.check_out(msg).await,
        };
        result
            .map(common::one)
            .map_err(|(msg, e)| Failure::new(msg, e))
    }
}

#[cfg(test)]
mod tests;
