//! Mocked steps: in a flow test, a step named in `mocks:` returns a canned message instead of
//! doing its work (a call to a remote system, say), keeping the message's acknowledgement.

use async_trait::async_trait;
use sluice_core::{Body, Failure, Message, Outputs, Processor};

use crate::config::model::TestMessage;

/// Replaces the body and merges the headers of every message with canned ones.
pub struct MockStep {
    canned: TestMessage,
}

impl MockStep {
    /// A mock returning `canned`.
    pub fn new(canned: TestMessage) -> Self {
        MockStep { canned }
    }
}

/// The body a test wrote: a JSON string is a text body, anything else a JSON body.
pub fn test_body(value: &serde_json::Value) -> Body {
    match value {
        serde_json::Value::String(s) => Body::from_bytes(s.clone().into_bytes()),
        other => Body::from_json(other.clone()),
    }
}

#[async_trait]
impl Processor for MockStep {
    async fn process(&self, mut msg: Message) -> Result<Outputs, Failure> {
        msg.body = test_body(&self.canned.body);
        for (k, v) in &self.canned.headers {
            msg.headers.insert(k.clone(), v.clone());
        }
        let mut out = Outputs::new();
        out.push(msg);
        Ok(out)
    }
}
