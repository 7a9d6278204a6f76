//! Settles a channel's deliveries with the broker: each run of consecutive acknowledged
//! deliveries with one `basic.ack` (`multiple`), each failure on its own.
//!
//! RabbitMQ does a fixed amount of work per ack frame. Acking every message separately made
//! the broker spend more than twice the CPU of a consumer that acks per batch (bench/amqp-pg,
//! on a machine the broker shares with Sluice), which bounded throughput. Deliveries finish out
//! of order (batched sinks commit hundreds at once), so one frame can settle many.
//!
//! The [`Window`] keeps the delivery tags the flow still holds, in delivery order. A
//! `basic.ack` with `multiple` settles every unsettled tag up to its own, so it is sent only for
//! a prefix of the window with no delivery still in the flow. A failure is sent on its own
//! (`basic.nack` requeue or `basic.reject`) before any multiple ack that covers it, so a
//! multiple ack never settles a failed delivery. A delivery that stays in the flow for long
//! (a slow message, a requeue delay) would hold back every ack behind it and, with the
//! prefetch window full, stop the consumer: once more than half the prefetch is acknowledged
//! but held back, those are acked one by one.

use std::collections::BTreeMap;

use lapin::Channel;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::connection::describe;

/// What the flow decided about a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Committed: acknowledge.
    Ack,
    /// Failed: back to the queue.
    Requeue,
    /// Failed: to the queue's dead-letter exchange (or dropped by the broker without one).
    Reject,
}

/// A frame to send to the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Frame {
    /// `basic.ack`; `multiple` settles every unsettled tag up to `tag`.
    Ack { tag: u64, multiple: bool },
    /// `basic.nack` with requeue, of one tag.
    Requeue(u64),
    /// `basic.reject` without requeue, of one tag.
    Reject(u64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// Still in the flow.
    Open,
    /// Acknowledged, not yet sent.
    Acked,
    /// Settled on its own (a failure already sent).
    Done,
}

/// The deliveries of one channel that the broker still counts as unacknowledged.
#[derive(Debug)]
pub(super) struct Window {
    slots: BTreeMap<u64, Slot>,
    failures: Vec<(u64, Verdict)>,
    /// How many slots are `Acked` (after [`Window::frames`], all of them behind an `Open` one).
    acked: usize,
    /// Beyond this many held-back acks, they are sent one by one.
    hold_limit: usize,
}

impl Window {
    pub(super) fn new(prefetch: u16) -> Self {
        Window {
            slots: BTreeMap::new(),
            failures: Vec::new(),
            acked: 0,
            hold_limit: usize::from(prefetch / 2),
        }
    }

    /// The broker delivered `tag` (tags grow along a channel).
    pub(super) fn delivered(&mut self, tag: u64) {
        self.slots.insert(tag, Slot::Open);
    }

    /// The flow is done with `tag`.
    pub(super) fn settled(&mut self, tag: u64, verdict: Verdict) {
        match verdict {
            Verdict::Ack => {
                if let Some(slot) = self.slots.get_mut(&tag)
                    && *slot == Slot::Open
                {
                    *slot = Slot::Acked;
                    self.acked += 1;
                }
            }
            Verdict::Requeue | Verdict::Reject => self.failures.push((tag, verdict)),
        }
    }

    /// The frames that settle everything settleable now, in the order they must be sent.
    pub(super) fn frames(&mut self) -> Vec<Frame> {
        let mut frames = Vec::new();
        for (tag, verdict) in self.failures.drain(..) {
            if let Some(slot) = self.slots.get_mut(&tag)
                && *slot == Slot::Open
            {
                *slot = Slot::Done;
                frames.push(match verdict {
                    Verdict::Requeue => Frame::Requeue(tag),
                    _ => Frame::Reject(tag),
                });
            }
        }
        let mut highest_ack = None;
        while let Some(entry) = self.slots.first_entry() {
            match *entry.get() {
                Slot::Open => break,
                Slot::Acked => {
                    highest_ack = Some(*entry.key());
                    self.acked -= 1;
                }
                Slot::Done => {}
            }
            entry.remove();
        }
        if let Some(tag) = highest_ack {
            frames.push(Frame::Ack {
                tag,
                multiple: true,
            });
        }
        if self.acked > self.hold_limit {
            let held: Vec<u64> = self
                .slots
                .iter()
                .filter(|(_, s)| **s == Slot::Acked)
                .map(|(t, _)| *t)
                .collect();
            for tag in held {
                self.slots.remove(&tag);
                frames.push(Frame::Ack {
                    tag,
                    multiple: false,
                });
            }
            self.acked = 0;
        }
        frames
    }
}

enum Event {
    Delivered(u64),
    Settled(u64, Verdict),
}

/// The handle deliveries of one session report through; cheap to clone.
#[derive(Debug, Clone)]
pub(super) struct Settle {
    events: mpsc::UnboundedSender<Event>,
}

impl std::fmt::Debug for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Event::Delivered(tag) => write!(f, "Delivered({tag})"),
            Event::Settled(tag, verdict) => write!(f, "Settled({tag}, {verdict:?})"),
        }
    }
}

impl Settle {
    /// Starts the settling task of `channel`. It ends once every handle is dropped and what
    /// they reported is sent.
    pub(super) fn start(
        channel: Channel,
        prefetch: u16,
        queue: String,
    ) -> (Settle, JoinHandle<()>) {
        let (events, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(run(channel, Window::new(prefetch), rx, queue));
        (Settle { events }, task)
    }

    /// Records a delivery; call before the delivery enters the flow.
    pub(super) fn delivered(&self, tag: u64) {
        // The task is gone only with the session; the broker redelivers what it held.
        let _ = self.events.send(Event::Delivered(tag));
    }

    /// Records the flow's verdict on a delivery.
    pub(super) fn settled(&self, tag: u64, verdict: Verdict) {
        let _ = self.events.send(Event::Settled(tag, verdict));
    }
}

async fn run(
    channel: Channel,
    mut window: Window,
    mut rx: mpsc::UnboundedReceiver<Event>,
    queue: String,
) {
    let apply = |window: &mut Window, event: Event| match event {
        Event::Delivered(tag) => window.delivered(tag),
        Event::Settled(tag, verdict) => window.settled(tag, verdict),
    };
    while let Some(event) = rx.recv().await {
        apply(&mut window, event);
        // Everything that arrived meanwhile goes into the same round of frames.
        while let Ok(event) = rx.try_recv() {
            apply(&mut window, event);
        }
        for frame in window.frames() {
            let sent = match frame {
                Frame::Ack { tag, multiple } => {
                    channel.basic_ack(tag, BasicAckOptions { multiple }).await
                }
                Frame::Requeue(tag) => {
                    channel
                        .basic_nack(
                            tag,
                            BasicNackOptions {
                                requeue: true,
                                multiple: false,
                            },
                        )
                        .await
                }
                Frame::Reject(tag) => {
                    channel
                        .basic_reject(tag, BasicRejectOptions { requeue: false })
                        .await
                }
            };
            if let Err(error) = sent {
                // The channel is gone; the broker redelivers what it did not settle.
                tracing::debug!(queue, ?frame, error = %describe(&error), "cannot settle deliveries; the broker will redeliver them");
            }
        }
    }
}

#[cfg(test)]
mod tests;
