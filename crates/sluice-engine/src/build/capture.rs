//! Capturing sinks: in a flow test, every target records what reaches it instead of sending it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use sluice_core::{Message, ProcessError, Sink};

/// Messages captured by target id, shared between the sinks and the test runner.
#[derive(Clone, Default)]
pub struct Captured(Arc<Mutex<BTreeMap<String, Vec<Message>>>>);

impl Captured {
    /// The messages that reached `target`.
    pub fn take(&self, target: &str) -> Vec<Message> {
        self.0
            .lock()
            .map(|mut m| m.remove(target).unwrap_or_default())
            .unwrap_or_default()
    }

    pub(crate) fn push(&self, target: &str, msg: Message) {
        if let Ok(mut m) = self.0.lock() {
            m.entry(target.to_owned()).or_default().push(msg);
        }
    }
}

/// A sink that records a copy of every message.
pub struct CaptureSink {
    target: String,
    captured: Captured,
}

impl CaptureSink {
    /// A sink recording under `target`.
    pub fn new(target: String, captured: Captured) -> Self {
        CaptureSink { target, captured }
    }
}

#[async_trait]
impl Sink for CaptureSink {
    async fn deliver(&self, msg: &Message) -> Result<(), ProcessError> {
        let mut copy = msg.clone();
        // The copy is a record, not a delivery: its share is resolved now.
        for token in copy.take_acks() {
            token.ack();
        }
        self.captured.push(&self.target, copy);
        Ok(())
    }
}
