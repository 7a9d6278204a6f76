//! The window against a model of the broker's unacknowledged deliveries.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::{Frame, Verdict, Window};

/// The broker's side: what it still counts as unacknowledged, and what the flow decided.
#[derive(Default)]
struct Broker {
    outstanding: BTreeMap<u64, Option<Verdict>>,
    acked: Vec<u64>,
    requeued: Vec<u64>,
    rejected: Vec<u64>,
}

impl Broker {
    /// Applies a frame, checking it settles only deliveries the flow decided, as decided.
    fn apply(&mut self, frame: Frame) {
        let decided = |b: &Self, tag: u64| -> Verdict {
            b.outstanding
                .get(&tag)
                .unwrap_or_else(|| {
                    panic!("{frame:?}: tag {tag} is not outstanding (channel error)")
                })
                .unwrap_or_else(|| panic!("{frame:?}: tag {tag} is still in the flow"))
        };
        match frame {
            Frame::Ack {
                tag,
                multiple: false,
            } => {
                assert_eq!(decided(self, tag), Verdict::Ack, "{frame:?}");
                self.outstanding.remove(&tag);
                self.acked.push(tag);
            }
            Frame::Ack {
                tag,
                multiple: true,
            } => {
                assert_eq!(decided(self, tag), Verdict::Ack, "{frame:?}");
                let covered: Vec<u64> = self.outstanding.range(..=tag).map(|(t, _)| *t).collect();
                for t in covered {
                    assert_eq!(decided(self, t), Verdict::Ack, "{frame:?} would ack {t}");
                    self.outstanding.remove(&t);
                    self.acked.push(t);
                }
            }
            Frame::Requeue(tag) => {
                assert_eq!(decided(self, tag), Verdict::Requeue, "{frame:?}");
                self.outstanding.remove(&tag);
                self.requeued.push(tag);
            }
            Frame::Reject(tag) => {
                assert_eq!(decided(self, tag), Verdict::Reject, "{frame:?}");
                self.outstanding.remove(&tag);
                self.rejected.push(tag);
            }
        }
    }
}

fn verdict(n: u64) -> Verdict {
    match n % 10 {
        0 => Verdict::Requeue,
        1 => Verdict::Reject,
        _ => Verdict::Ack,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

    /// Whatever the order the flow finishes in, every frame is valid for the broker, every
    /// delivery ends settled as the flow decided, and held-back acks stay within the limit.
    #[test]
    fn frames_settle_exactly_what_the_flow_decided(
        prefetch in 1u16..40,
        count in 1u64..80,
        seed in any::<u64>(),
    ) {
        let mut rng = seed | 1;
        let mut next = move || { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; rng };
        let mut window = Window::new(prefetch);
        let mut broker = Broker::default();
        let mut delivered = 0u64;
        let mut in_flow: Vec<u64> = Vec::new();
        let mut expected: BTreeMap<u64, Verdict> = BTreeMap::new();
        while delivered < count || !in_flow.is_empty() {
            let room = (broker.outstanding.len() as u64) < u64::from(prefetch);
            match next() % 3 {
                0 if delivered < count && room => {
                    delivered += 1;
                    window.delivered(delivered);
                    broker.outstanding.insert(delivered, None);
                    in_flow.push(delivered);
                }
                1 if !in_flow.is_empty() => {
                    let tag = in_flow.swap_remove((next() % in_flow.len() as u64) as usize);
                    let v = verdict(next());
                    expected.insert(tag, v);
                    broker.outstanding.insert(tag, Some(v));
                    window.settled(tag, v);
                }
                _ => {
                    for frame in window.frames() {
                        broker.apply(frame);
                    }
                    prop_assert!(window.acked <= window.hold_limit);
                }
            }
            // A full prefetch window with nothing left in the flow must get room back.
            if !room && in_flow.is_empty() {
                for frame in window.frames() {
                    broker.apply(frame);
                }
                prop_assert!((broker.outstanding.len() as u64) < u64::from(prefetch));
            }
        }
        for frame in window.frames() {
            broker.apply(frame);
        }
        prop_assert!(broker.outstanding.is_empty(), "left: {:?}", broker.outstanding);
        for (tag, v) in expected {
            let list = match v {
                Verdict::Ack => &broker.acked,
                Verdict::Requeue => &broker.requeued,
                Verdict::Reject => &broker.rejected,
            };
            prop_assert!(list.contains(&tag), "{} not settled as {:?}", tag, v);
        }
    }
}

#[test]
fn a_batch_finishing_in_any_order_is_one_frame() {
    let mut window = Window::new(1000);
    for tag in 1..=500 {
        window.delivered(tag);
    }
    for tag in (1..=500).rev() {
        window.settled(tag, Verdict::Ack);
    }
    assert_eq!(
        window.frames(),
        vec![Frame::Ack {
            tag: 500,
            multiple: true
        }]
    );
    assert_eq!(window.frames(), vec![]);
}

#[test]
fn a_failure_is_sent_before_the_ack_that_passes_it() {
    let mut window = Window::new(100);
    for tag in 1..=3 {
        window.delivered(tag);
    }
    window.settled(3, Verdict::Ack);
    window.settled(2, Verdict::Requeue);
    assert_eq!(window.frames(), vec![Frame::Requeue(2)]);
    window.settled(1, Verdict::Ack);
    assert_eq!(
        window.frames(),
        vec![Frame::Ack {
            tag: 3,
            multiple: true
        }]
    );
}

#[test]
fn acks_held_back_by_a_slow_delivery_go_one_by_one_past_half_the_prefetch() {
    let mut window = Window::new(4);
    for tag in 1..=4 {
        window.delivered(tag);
    }
    window.settled(2, Verdict::Ack);
    window.settled(3, Verdict::Ack);
    // Two held back behind tag 1: at the limit (4 / 2), still held.
    assert_eq!(window.frames(), vec![]);
    window.settled(4, Verdict::Ack);
    assert_eq!(
        window.frames(),
        vec![
            Frame::Ack {
                tag: 2,
                multiple: false
            },
            Frame::Ack {
                tag: 3,
                multiple: false
            },
            Frame::Ack {
                tag: 4,
                multiple: false
            },
        ]
    );
    window.settled(1, Verdict::Ack);
    assert_eq!(
        window.frames(),
        vec![Frame::Ack {
            tag: 1,
            multiple: true
        }]
    );
}
