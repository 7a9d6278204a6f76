//! Acknowledgement handles: how at-least-once delivery survives fan-out, fan-in and filtering.
//!
//! A source that needs to know when a message is done creates an [`AckToken`] with a callback.
//! The token is a *share* of one tracker. Cloning a message (multicast, wire tap) clones the share;
//! merging messages (aggregate) moves every part's shares into the merged message; splitting moves
//! them into the parts. The callback runs exactly once, when the last share is gone:
//!
//! * [`Outcome::Ack`] if every share was resolved with [`AckToken::ack`];
//! * [`Outcome::Nack`] if any share was nacked, **or dropped without being resolved**.
//!
//! The second rule is deliberate: a message lost to a bug is redelivered, never silently acked.

use std::fmt;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

/// The final word on a message, delivered once to the source that produced it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every part of the message was committed by every sink on its path (or deliberately dropped).
    Ack,
    /// At least one part failed terminally; the reason of the first failure.
    Nack(Arc<str>),
}

impl Outcome {
    /// Whether this is an [`Outcome::Ack`].
    pub fn is_ack(&self) -> bool {
        matches!(self, Outcome::Ack)
    }
}

type Callback = Box<dyn FnOnce(Outcome) + Send>;

/// Shared state of all shares of one acknowledgement.
struct Tracker {
    first_nack: Mutex<Option<Arc<str>>>,
    callback: Mutex<Option<Callback>>,
}

impl Tracker {
    fn record_nack(&self, reason: Arc<str>) {
        if let Ok(mut slot) = self.first_nack.lock() {
            slot.get_or_insert(reason);
        }
    }
}

impl Drop for Tracker {
    // The last share is gone: every part of the message has been resolved one way or another.
    fn drop(&mut self) {
        let callback = self.callback.get_mut().ok().and_then(Option::take);
        let nack = self.first_nack.get_mut().ok().and_then(Option::take);
        if let Some(callback) = callback {
            callback(match nack {
                Some(reason) => Outcome::Nack(reason),
                None => Outcome::Ack,
            });
        }
    }
}

/// One share of an acknowledgement. See the [module documentation](self).
pub struct AckToken {
    tracker: Arc<Tracker>,
    resolved: bool,
}

/// The reason recorded for a share that was dropped without an explicit ack or nack.
pub const DROPPED_UNRESOLVED: &str = "message dropped without acknowledgement";

impl AckToken {
    /// A new acknowledgement whose `callback` runs once every share is resolved.
    pub fn with_callback(callback: impl FnOnce(Outcome) + Send + 'static) -> Self {
        AckToken {
            tracker: Arc::new(Tracker {
                first_nack: Mutex::new(None),
                callback: Mutex::new(Some(Box::new(callback))),
            }),
            resolved: false,
        }
    }

    /// A new acknowledgement and a receiver that yields its [`Outcome`].
    pub fn channel() -> (Self, oneshot::Receiver<Outcome>) {
        let (tx, rx) = oneshot::channel();
        let token = Self::with_callback(move |outcome| {
            // The receiver may have gone away (the source stopped waiting); nothing to tell then.
            let _ = tx.send(outcome);
        });
        (token, rx)
    }

    /// Resolves this share as committed.
    pub fn ack(mut self) {
        self.resolved = true;
    }

    /// Resolves this share as failed; the whole acknowledgement becomes a nack.
    pub fn nack(mut self, reason: impl Into<Arc<str>>) {
        self.tracker.record_nack(reason.into());
        self.resolved = true;
    }

    /// Another share of the same acknowledgement (for a copy of the message).
    pub fn share(&self) -> Self {
        AckToken {
            tracker: Arc::clone(&self.tracker),
            resolved: false,
        }
    }

    /// How many shares of this acknowledgement exist now (for tests and diagnostics).
    pub fn share_count(&self) -> usize {
        Arc::strong_count(&self.tracker)
    }
}

impl Drop for AckToken {
    fn drop(&mut self) {
        if !self.resolved {
            self.tracker.record_nack(Arc::from(DROPPED_UNRESOLVED));
        }
    }
}

impl fmt::Debug for AckToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AckToken")
            .field("shares", &Arc::strong_count(&self.tracker))
            .field("resolved", &self.resolved)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recorder() -> (AckToken, Arc<Mutex<Vec<Outcome>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&seen);
        let token = AckToken::with_callback(move |o| sink.lock().unwrap().push(o));
        (token, seen)
    }

    #[test]
    fn single_share_ack_fires_once() {
        let (token, seen) = recorder();
        token.ack();
        assert_eq!(*seen.lock().unwrap(), vec![Outcome::Ack]);
    }

    #[test]
    fn fan_out_waits_for_every_share() {
        let (token, seen) = recorder();
        let copy = token.share();
        token.ack();
        assert!(
            seen.lock().unwrap().is_empty(),
            "fired before the copy was resolved"
        );
        copy.ack();
        assert_eq!(*seen.lock().unwrap(), vec![Outcome::Ack]);
    }

    #[test]
    fn one_nack_among_acks_nacks_the_whole() {
        let (token, seen) = recorder();
        let a = token.share();
        let b = token.share();
        token.ack();
        a.nack("sink down");
        b.ack();
        assert_eq!(
            *seen.lock().unwrap(),
            vec![Outcome::Nack("sink down".into())]
        );
    }

    #[test]
    fn first_nack_reason_wins() {
        let (token, seen) = recorder();
        let a = token.share();
        token.nack("first");
        a.nack("second");
        assert_eq!(*seen.lock().unwrap(), vec![Outcome::Nack("first".into())]);
    }

    #[test]
    fn dropping_unresolved_is_a_nack() {
        let (token, seen) = recorder();
        drop(token);
        assert_eq!(
            *seen.lock().unwrap(),
            vec![Outcome::Nack(DROPPED_UNRESOLVED.into())]
        );
    }

    #[tokio::test]
    async fn channel_delivers_outcome() {
        let (token, rx) = AckToken::channel();
        let copy = token.share();
        assert_eq!(token.share_count(), 2);
        token.ack();
        copy.ack();
        assert_eq!(rx.await.unwrap(), Outcome::Ack);
    }
}
