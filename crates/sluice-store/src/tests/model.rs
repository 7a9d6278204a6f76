//! Model-based test of the durable queue: random actions run against the store on a simulated
//! disk and against a plain in-memory model, with restarts, crashes (at rest and in the middle
//! of an append's commit, with unsynced writes dropped and the last one torn), a disk that fills
//! up during an append (the same store must go on by itself once space returns) and corrupted
//! records in the action set. Every lease must return exactly what the model predicts, so no
//! acknowledged append is ever lost, leases come back after a restart with their delivery count,
//! and corrupt records are quarantined without blocking the others.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use proptest::prelude::*;

use super::sim_disk::SimDisk;
use crate::{Delivery, GroupCommit, ManualClock, Queue, Store, StoreOptions, queue};

#[derive(Debug, Clone)]
enum Action {
    Append(u8),
    Lease {
        max: u8,
        timeout_s: u8,
    },
    /// Acks the in-flight or fresh records picked by index (modulo the records stored).
    Ack(Vec<u8>),
    Nack {
        pick: u8,
        delay_s: u8,
    },
    Advance(u8),
    Corrupt(u8),
    Restart,
    CrashAtRest {
        keep: u8,
        tear: bool,
    },
    CrashDuringAppend {
        records: u8,
        after_writes: u8,
        keep: u8,
        tear: bool,
    },
    /// The disk fills up for one append of this many records, then space returns.
    DiskFullDuringAppend(u8),
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        4 => (1u8..5).prop_map(Action::Append),
        4 => (1u8..6, 1u8..30).prop_map(|(max, timeout_s)| Action::Lease { max, timeout_s }),
        3 => proptest::collection::vec(any::<u8>(), 1..4).prop_map(Action::Ack),
        2 => (any::<u8>(), 0u8..20).prop_map(|(pick, delay_s)| Action::Nack { pick, delay_s }),
        2 => (1u8..40).prop_map(Action::Advance),
        1 => any::<u8>().prop_map(Action::Corrupt),
        1 => Just(Action::Restart),
        1 => (any::<u8>(), any::<bool>()).prop_map(|(keep, tear)| Action::CrashAtRest { keep, tear }),
        2 => (1u8..4, 0u8..40, any::<u8>(), any::<bool>()).prop_map(
            |(records, after_writes, keep, tear)| Action::CrashDuringAppend { records, after_writes, keep, tear }
        ),
        1 => (1u8..4).prop_map(Action::DiskFullDuringAppend),
    ]
}

#[derive(Debug, Clone, PartialEq)]
enum State {
    Fresh,
    InFlight { visible_at: u64, leased: bool },
}

#[derive(Debug, Clone)]
struct Record {
    payload: Bytes,
    deliveries: u32,
    state: State,
    corrupt: bool,
}

/// The queue as it should be.
#[derive(Debug, Default)]
struct Model {
    records: BTreeMap<u64, Record>,
    next_id: u64,
    next_payload: u64,
}

impl Model {
    fn payloads(&mut self, count: u8) -> Vec<Bytes> {
        (0..count)
            .map(|_| {
                self.next_payload += 1;
                Bytes::from(format!("payload-{}", self.next_payload))
            })
            .collect()
    }

    fn appended(&mut self, ids: &[u64], payloads: &[Bytes]) {
        for (id, payload) in ids.iter().zip(payloads) {
            self.records.insert(
                *id,
                Record {
                    payload: payload.clone(),
                    deliveries: 0,
                    state: State::Fresh,
                    corrupt: false,
                },
            );
            self.next_id = self.next_id.max(id + 1);
        }
    }

    fn pick(&self, index: u8) -> Option<u64> {
        let len = self.records.len();
        (len > 0).then(|| {
            *self
                .records
                .keys()
                .nth(usize::from(index) % len)
                .unwrap_or(&0)
        })
    }

    /// Mirrors `queue::lease`: due in-flight records by (visible_at, id), then fresh by id;
    /// corrupt ones are dropped where met.
    fn lease(&mut self, max: usize, now: u64, until: u64) -> Vec<Delivery> {
        let mut due: Vec<(u64, u64)> = self
            .records
            .iter()
            .filter_map(|(id, record)| match record.state {
                State::InFlight { visible_at, .. } if visible_at <= now => Some((visible_at, *id)),
                _ => None,
            })
            .collect();
        due.sort_unstable();
        due.truncate(max);
        let fresh: Vec<u64> = self
            .records
            .iter()
            .filter(|(_, record)| record.state == State::Fresh)
            .map(|(id, _)| *id)
            .collect();
        let mut out = Vec::new();
        let candidates = due
            .into_iter()
            .map(|(_, id)| (id, true))
            .chain(fresh.into_iter().map(|id| (id, false)));
        for (id, is_due) in candidates {
            if !is_due && out.len() >= max {
                break;
            }
            let record = self.records.get_mut(&id).unwrap();
            if record.corrupt {
                self.records.remove(&id);
                continue;
            }
            record.deliveries += 1;
            record.state = State::InFlight {
                visible_at: until,
                leased: true,
            };
            out.push(Delivery {
                id,
                payload: record.payload.clone(),
                deliveries: record.deliveries,
            });
        }
        out
    }

    fn restart(&mut self) {
        for record in self.records.values_mut() {
            if let State::InFlight { leased: true, .. } = record.state {
                record.state = State::InFlight {
                    visible_at: 0,
                    leased: false,
                };
            }
        }
    }
}

/// The system under test and what it runs on.
struct Harness {
    runtime: tokio::runtime::Runtime,
    clock: Arc<ManualClock>,
    disk: SimDisk,
    store: Option<Store>,
}

impl Harness {
    fn new() -> Self {
        let clock = Arc::new(ManualClock::new(1_000_000));
        let disk = SimDisk::default();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let mut harness = Self {
            runtime,
            clock,
            disk,
            store: None,
        };
        harness.open();
        harness
    }

    fn open(&mut self) {
        let options = StoreOptions {
            group_commit: GroupCommit {
                max_wait: Duration::ZERO,
                max_batch: 64,
            },
            clock: Arc::clone(&self.clock) as _,
            cache_size: crate::DEFAULT_CACHE_SIZE,
            reserve: 0,
        };
        self.store = Some(Store::open_with_backend(self.disk.clone(), options).unwrap());
    }

    fn queue(&self) -> Queue {
        self.store.as_ref().unwrap().queue("q")
    }

    fn crash(&mut self, keep: u8, tear: bool) {
        let image = self.disk.crash_image(keep, tear);
        drop(self.store.take());
        self.disk = image;
        self.open();
    }
}

fn run(actions: Vec<Action>) -> Result<(), TestCaseError> {
    let mut sut = Harness::new();
    let mut model = Model {
        next_id: 1,
        ..Model::default()
    };
    for action in actions {
        let queue = sut.queue();
        let now = sut.clock_now();
        match action {
            Action::Append(count) => {
                let payloads = model.payloads(count);
                let ids = sut
                    .runtime
                    .block_on(queue.append(payloads.clone()))
                    .unwrap();
                let expected: Vec<u64> =
                    (model.next_id..model.next_id + u64::from(count)).collect();
                prop_assert_eq!(&ids, &expected);
                model.appended(&ids, &payloads);
            }
            Action::Lease { max, timeout_s } => {
                let timeout = Duration::from_secs(u64::from(timeout_s));
                let got = sut
                    .runtime
                    .block_on(queue.lease(usize::from(max), timeout))
                    .unwrap();
                let expected = model.lease(usize::from(max), now, now + timeout.as_millis() as u64);
                prop_assert_eq!(got, expected);
            }
            Action::Ack(picks) => {
                let mut ids: Vec<u64> = picks.iter().filter_map(|pick| model.pick(*pick)).collect();
                ids.dedup();
                let acked = sut.runtime.block_on(queue.ack(ids.clone())).unwrap();
                let expected = ids
                    .iter()
                    .filter(|id| model.records.remove(id).is_some())
                    .count();
                prop_assert_eq!(acked, expected);
            }
            Action::Nack { pick, delay_s } => {
                let Some(id) = model.pick(pick) else { continue };
                let delay = Duration::from_secs(u64::from(delay_s));
                let nacked = sut.runtime.block_on(queue.nack(id, delay)).unwrap();
                let record = model.records.get_mut(&id).unwrap();
                let in_flight = record.state != State::Fresh;
                if in_flight {
                    record.state = State::InFlight {
                        visible_at: now + delay.as_millis() as u64,
                        leased: false,
                    };
                }
                prop_assert_eq!(nacked, in_flight);
            }
            Action::Advance(secs) => sut.clock.advance(Duration::from_secs(u64::from(secs))),
            Action::Corrupt(pick) => {
                let Some(id) = model.pick(pick) else { continue };
                sut.runtime
                    .block_on(queue::corrupt(&queue, id, b"not a frame".to_vec()))
                    .unwrap();
                model.records.get_mut(&id).unwrap().corrupt = true;
            }
            Action::Restart => {
                drop(queue);
                drop(sut.store.take());
                sut.open();
                model.restart();
            }
            Action::CrashAtRest { keep, tear } => {
                drop(queue);
                sut.crash(keep, tear);
                model.restart();
            }
            Action::DiskFullDuringAppend(records) => {
                let payloads = model.payloads(records);
                sut.disk.fill_up();
                let error = sut.runtime.block_on(queue.append(payloads)).unwrap_err();
                prop_assert!(error.is_disk_full(), "{}", error);
                // Nothing stored; the same store takes writes again once it reopened.
                sut.disk.free_space();
                sut.wait_until_writable(&queue);
            }
            Action::CrashDuringAppend {
                records,
                after_writes,
                keep,
                tear,
            } => {
                let payloads = model.payloads(records);
                sut.disk.fail_after(usize::from(after_writes));
                let result = sut.runtime.block_on(queue.append(payloads.clone()));
                drop(queue);
                sut.crash(keep, tear);
                model.restart();
                let batch: Vec<u64> = (model.next_id..model.next_id + u64::from(records)).collect();
                let stored = queue::stored_ids(&sut.queue()).unwrap();
                let known: Vec<u64> = model.records.keys().copied().collect();
                if let Ok(ids) = result {
                    // Acknowledged: must have survived.
                    prop_assert_eq!(&ids, &batch);
                    model.appended(&ids, &payloads);
                } else if stored.len() > known.len() {
                    // Not acknowledged but committed before the power went: all of it, or nothing.
                    model.appended(&batch, &payloads);
                }
                let expected: Vec<u64> = model.records.keys().copied().collect();
                prop_assert_eq!(
                    stored,
                    expected,
                    "after a crash during an append of {:?}",
                    batch
                );
            }
        }
    }
    // Drain: everything the model holds (and nothing else) is still deliverable.
    sut.clock.advance(Duration::from_secs(3600));
    let now = sut.clock_now();
    let got = sut
        .runtime
        .block_on(sut.queue().lease(10_000, Duration::from_secs(1)))
        .unwrap();
    let expected = model.lease(10_000, now, now + 1000);
    prop_assert_eq!(got, expected);
    Ok(())
}

impl Harness {
    /// Commits empty acks until one succeeds: the writer reopens its database on a backoff.
    fn wait_until_writable(&self, queue: &Queue) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while let Err(error) = self.runtime.block_on(queue.ack(Vec::new())) {
            assert!(
                std::time::Instant::now() < deadline,
                "the store never recovered from a full disk: {error}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn clock_now(&self) -> u64 {
        crate::Clock::now_ms(&*self.clock)
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn the_queue_behaves_like_its_model_across_crashes(
        actions in proptest::collection::vec(action(), 1..40)
    ) {
        run(actions)?;
    }
}
