//! Durable channels: `to: [{channel: {name: X, durable: true}}]` in one flow, `from: {channel:
//! {name: X, durable: true}}` in another, with the messages in between kept in the process's
//! store ([`crate::durable`]).
//!
//! **Writing.** The sink encodes the message ([`crate::envelope`]) and appends it to the channel's
//! queue; it returns only after the group commit that holds the record returned from fsync. The
//! producing flow's source is acknowledged after its targets return, so nothing is acknowledged
//! to a producer before it is on disk. A store failure is `unavailable` (a full disk says so),
//! which an HTTP source answers with 503 and `Retry-After`.
//!
//! **Reading.** The source leases as many records as it has free slots (`concurrency`), rebuilds
//! each message, marks redeliveries (`sluice.delivery.count`, `sluice.redelivered`) and admits
//! it to its flow in record order. When the flow acknowledges the message the record is deleted;
//! when it nacks, the record is given back with a growing delay. A record delivered
//! `max_deliveries` times whose last attempt fails too, or found beyond that count (the process
//! died while handling it, again and again), is moved to the dead letters and deleted. A record
//! whose envelope cannot be read is moved there as well, and the source carries on with the next.
//!
//! **Waiting.** With nothing to lease the source sleeps until the sink of the same process says
//! it wrote something, or `poll_interval` passes (for nack delays and lease timeouts coming due).
//!
//! **Shutdown.** The source stops leasing and waits for the messages in flight; one the runtime
//! abandons keeps its lease, which dies with the process: the record is delivered again after
//! the next start, its delivery count kept.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use sluice_core::{
    AckToken, BuildError, ErrorKind, Message, Outcome, ProcessError, Resources, Sink, Source,
    SourceContext, SourceError,
};
use sluice_store::{Delivery, NewDeadLetter, Queue, Store, StoreError};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use crate::durable::DurableStore;
use crate::envelope;

/// Header set on every message read from a durable channel: how many times its record was
/// handed out, this time included (`1` on first delivery).
pub const DELIVERY_COUNT_HEADER: &str = "sluice.delivery.count";
/// Header set on every message read from a durable channel: `true` when it was handed out before.
pub const REDELIVERED_HEADER: &str = "sluice.redelivered";

/// The longest a nacked record waits before it is delivered again.
const MAX_REDELIVERY_DELAY: Duration = Duration::from_secs(300);

/// Wake-ups from the durable channel sinks of this process to the sources reading the channels.
#[derive(Default)]
pub struct Wakeups {
    by_channel: Mutex<HashMap<String, Arc<Notify>>>,
}

impl Wakeups {
    /// The wake-up of channel `name`.
    pub fn of(&self, name: &str) -> Arc<Notify> {
        match self.by_channel.lock() {
            Ok(mut map) => Arc::clone(map.entry(name.to_owned()).or_default()),
            // A poisoned map only costs the wake-up: the reader still polls.
            Err(_) => Arc::new(Notify::new()),
        }
    }
}

fn open_store(resources: &Resources) -> Result<Store, BuildError> {
    resources.get_or_default::<DurableStore>().store()
}

/// A sink appending to durable channel `name`, opening the process's store if needed.
pub fn sink(resources: &Resources, name: &str) -> Result<Arc<dyn Sink>, BuildError> {
    let store = open_store(resources)?;
    Ok(Arc::new(DurableChannelSink {
        queue: store.queue(name),
        wake: resources.get_or_default::<Wakeups>().of(name),
    }))
}

struct DurableChannelSink {
    queue: Queue,
    wake: Arc<Notify>,
}

#[async_trait]
impl Sink for DurableChannelSink {
    async fn deliver(&self, msg: &Message) -> Result<(), ProcessError> {
        self.queue
            .append(vec![envelope::encode(msg)])
            .await
            .map_err(|e| store_error(self.queue.channel(), &e))?;
        self.wake.notify_one();
        Ok(())
    }
}

/// What a failed append tells the producer.
fn store_error(channel: &str, error: &StoreError) -> ProcessError {
    if let StoreError::TooLarge(_) = error {
        return ProcessError::new(
            ErrorKind::InvalidInput,
            format!("the message is too large for durable channel `{channel}`: {error}"),
        );
    }
    let detail = if error.is_disk_full() {
        format!(
            "durable channel `{channel}` cannot store the message: the disk is full; nothing was \
             stored, retry once space is freed"
        )
    } else {
        format!("durable channel `{channel}` cannot store the message: {error}")
    };
    ProcessError::new(ErrorKind::Unavailable, detail)
}

/// How a durable channel's reader works.
#[derive(Debug, Clone)]
pub struct ReaderOptions {
    /// Messages processed at once; 1 keeps record order.
    pub concurrency: usize,
    /// How long a leased record stays hidden before it is handed out again.
    pub visibility_timeout: Duration,
    /// Deliveries before a failing message goes to the dead letters.
    pub max_deliveries: u32,
    /// The wait before a nacked record's second delivery; doubles with each further one.
    pub redelivery_delay: Duration,
    /// The longest wait between two looks at an empty channel.
    pub poll_interval: Duration,
}

/// The source reading durable channel `name`, opening the process's store if needed.
pub fn source(
    resources: &Resources,
    name: &str,
    options: ReaderOptions,
) -> Result<Box<dyn Source>, BuildError> {
    let store = open_store(resources)?;
    Ok(Box::new(DurableChannelSource {
        queue: store.queue(name),
        store,
        wake: resources.get_or_default::<Wakeups>().of(name),
        options,
    }))
}

struct DurableChannelSource {
    store: Store,
    queue: Queue,
    wake: Arc<Notify>,
    options: ReaderOptions,
}

/// What the source needs to settle one record after its flow is done.
#[derive(Clone)]
struct Settle {
    queue: Queue,
    store: Store,
    flow: Arc<str>,
    options: Arc<ReaderOptions>,
}

#[async_trait]
impl Source for DurableChannelSource {
    async fn run(self: Box<Self>, ctx: SourceContext) -> Result<(), SourceError> {
        let this = *self;
        let concurrency = this.options.concurrency.max(1);
        let settle = Settle {
            queue: this.queue.clone(),
            store: this.store.clone(),
            flow: Arc::clone(&ctx.flow),
            options: Arc::new(this.options.clone()),
        };
        let permits = Arc::new(Semaphore::new(concurrency));
        let mut in_flight = JoinSet::new();
        loop {
            while in_flight.try_join_next().is_some() {}
            let first = tokio::select! {
                () = ctx.shutdown.cancelled() => break,
                permit = Arc::clone(&permits).acquire_owned() => match permit {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            let mut slots = vec![first];
            while slots.len() < concurrency {
                match Arc::clone(&permits).try_acquire_owned() {
                    Ok(p) => slots.push(p),
                    Err(_) => break,
                }
            }
            let leased = this
                .queue
                .lease(slots.len(), this.options.visibility_timeout)
                .await;
            let deliveries = match leased {
                Ok(deliveries) => deliveries,
                Err(error) => {
                    tracing::warn!(flow = %ctx.flow, channel = this.queue.channel(), %error, "cannot lease from the durable channel; retrying");
                    Vec::new()
                }
            };
            if deliveries.is_empty() {
                drop(slots);
                tokio::select! {
                    () = ctx.shutdown.cancelled() => break,
                    () = this.wake.notified() => {}
                    () = tokio::time::sleep(this.options.poll_interval) => {}
                }
                continue;
            }
            // Admitted here, in record order, so a flow's `ordered_by` keeps it per key.
            for (delivery, slot) in deliveries.into_iter().zip(slots) {
                settle.admit(delivery, slot, &ctx, &mut in_flight).await;
            }
        }
        // Messages in flight finish and settle their records; the runtime's grace bounds the wait.
        while in_flight.join_next().await.is_some() {}
        Ok(())
    }
}

impl Settle {
    async fn admit(
        &self,
        delivery: Delivery,
        slot: OwnedSemaphorePermit,
        ctx: &SourceContext,
        in_flight: &mut JoinSet<()>,
    ) {
        let id = delivery.id;
        let mut msg = match envelope::decode(&delivery.payload) {
            Ok(msg) => msg,
            Err(error) => {
                let error = format!(
                    "cannot read record {id} of durable channel `{}`: {error}",
                    self.queue.channel()
                );
                let settle = self.clone();
                in_flight.spawn(async move {
                    settle
                        .dead_letter(
                            id,
                            delivery.deliveries,
                            error,
                            Bytes::new(),
                            delivery.payload,
                        )
                        .await;
                    drop(slot);
                });
                return;
            }
        };
        if delivery.deliveries > self.options.max_deliveries {
            let error = format!(
                "delivered {} times, more than max_deliveries ({}), without being acknowledged",
                delivery.deliveries, self.options.max_deliveries
            );
            let settle = self.clone();
            in_flight.spawn(async move {
                settle
                    .dead_letter_message(id, delivery.deliveries, error, &msg)
                    .await;
                drop(slot);
            });
            return;
        }
        msg.headers.insert(
            DELIVERY_COUNT_HEADER.to_owned(),
            delivery.deliveries.to_string(),
        );
        msg.headers.insert(
            REDELIVERED_HEADER.to_owned(),
            (delivery.deliveries > 1).to_string(),
        );
        let original = msg.detached();
        let (token, outcome) = AckToken::channel();
        let work = Arc::clone(&ctx.dispatcher).admit(msg.with_ack(token)).await;
        let settle = self.clone();
        in_flight.spawn(async move {
            // The flow resolves the message's shares, on success and on failure alike.
            let _ = work.await;
            drop(slot);
            let outcome = outcome
                .await
                .unwrap_or_else(|_| Outcome::Nack(sluice_core::ack::DROPPED_UNRESOLVED.into()));
            settle
                .finish(id, delivery.deliveries, outcome, &original)
                .await;
        });
    }

    /// Deletes the record on an ack; gives it back on a nack, or dead-letters it after its last
    /// allowed delivery.
    async fn finish(&self, id: u64, deliveries: u32, outcome: Outcome, original: &Message) {
        let channel = self.queue.channel();
        let result = match outcome {
            Outcome::Ack => self.queue.ack(vec![id]).await.map(drop),
            Outcome::Nack(reason) if deliveries >= self.options.max_deliveries => {
                let error = format!(
                    "failed on delivery {deliveries} of {}: {reason}",
                    self.options.max_deliveries
                );
                self.dead_letter_message(id, deliveries, error, original)
                    .await;
                Ok(())
            }
            Outcome::Nack(reason) => {
                tracing::debug!(flow = %self.flow, channel, record = id, %reason, "message failed; its record is delivered again later");
                let delay = redelivery_delay(self.options.redelivery_delay, deliveries);
                self.queue.nack(id, delay).await.map(drop)
            }
        };
        if let Err(error) = result {
            // The lease then runs out and the record comes back: at-least-once still holds.
            tracing::warn!(flow = %self.flow, channel, record = id, %error, "cannot settle the durable channel record; it will be delivered again");
        }
    }

    async fn dead_letter_message(&self, id: u64, deliveries: u32, error: String, msg: &Message) {
        let headers = serde_json::to_vec(&msg.headers).unwrap_or_default();
        self.dead_letter(
            id,
            deliveries,
            error,
            Bytes::from(headers),
            msg.body.as_bytes().clone(),
        )
        .await;
    }

    /// Moves the record to the dead letters, then deletes it; a record that cannot be moved
    /// stays in the channel (its lease runs out and it comes back).
    async fn dead_letter(
        &self,
        id: u64,
        deliveries: u32,
        error: String,
        headers: Bytes,
        body: Bytes,
    ) {
        let channel = self.queue.channel();
        tracing::warn!(flow = %self.flow, channel, record = id, %error, "moving the durable channel record to the dead letters");
        let now = now_ms();
        let letter = NewDeadLetter {
            flow: self.flow.to_string(),
            flow_version: String::new(),
            step: format!("channel {channel}"),
            error,
            attempts: deliveries,
            first_failure_ms: now,
            last_failure_ms: now,
            headers,
            body,
        };
        let result = match self.store.dead_letters().put(letter).await {
            Ok(_) => self.queue.ack(vec![id]).await.map(drop),
            Err(error) => Err(error),
        };
        if let Err(error) = result {
            tracing::warn!(flow = %self.flow, channel, record = id, %error, "cannot move the record to the dead letters; it stays in the channel");
        }
    }
}

/// The wait before delivery `deliveries + 1`: `base`, doubled for every delivery after the first,
/// at most [`MAX_REDELIVERY_DELAY`].
fn redelivery_delay(base: Duration, deliveries: u32) -> Duration {
    let doublings = deliveries.saturating_sub(1).min(16);
    base.saturating_mul(1 << doublings)
        .min(MAX_REDELIVERY_DELAY)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redelivery_waits_grow_and_are_capped() {
        let base = Duration::from_secs(1);
        assert_eq!(redelivery_delay(base, 1), Duration::from_secs(1));
        assert_eq!(redelivery_delay(base, 2), Duration::from_secs(2));
        assert_eq!(redelivery_delay(base, 4), Duration::from_secs(8));
        assert_eq!(redelivery_delay(base, 40), MAX_REDELIVERY_DELAY);
    }

    #[test]
    fn a_full_disk_is_unavailable_and_says_so() {
        let error = store_error("orders", &StoreError::DiskFull("ENOSPC".into()));
        assert_eq!(error.kind, ErrorKind::Unavailable);
        assert!(error.detail.contains("disk is full"), "{}", error.detail);
        assert!(error.detail.contains("`orders`"), "{}", error.detail);
        let error = store_error("orders", &StoreError::Closed);
        assert_eq!(error.kind, ErrorKind::Unavailable);
    }
}
