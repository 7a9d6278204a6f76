//! Sluice's embedded durable store, on [redb](https://docs.rs/redb) (pure Rust, ACID, copy-on-write
//! B-trees, durable commits).
//!
//! It keeps bytes and ids, never engine types, so it can be fuzzed and benchmarked alone:
//! durable queues for channels ([`Queue`]), the dead-letter store with idempotent replay
//! ([`DeadLetters`]), and idempotency keys with expiry ([`IdempotentKeys`]).
//!
//! # Opening
//! [`Store::open`] creates the data directory (the caller picks it, `./data/` by default),
//! takes an exclusive lock on `sluice.lock` in it (the OS drops the lock when the process dies,
//! so a crash leaves nothing stale), and opens `store.redb`. A second process gets
//! [`StoreError::Locked`] naming the directory and the holder's pid. Opening then releases the
//! leases of the previous run in one commit; it reads the in-flight entries only, never the
//! queued records, so open time does not grow with the queue ([`OpenReport`] counts what it read).
//!
//! # Record format
//! Every queued record and dead letter is wrapped in a frame ([`codec`]): version, flags,
//! length and a CRC-32C over header and payload. redb checks its own pages, but the frame
//! catches what redb cannot know about: bytes written by a buggy or foreign writer, or damage
//! inside a value. A queue record whose frame fails is **quarantined**: moved to the dead
//! letters with the decode error, in the same commit as the lease that found it, so it never
//! blocks the records behind it.
//!
//! # Tables
//! See `tables.rs`: `queue_records (channel, seq) -> frame`, `queue_channels channel ->
//! (next_seq, fresh_cursor)`, `queue_in_flight (channel, seq) -> (visible_at, deliveries,
//! state)`, `queue_visible_at (channel, visible_at, seq)` (index), `dead_letters id -> frame`,
//! `dead_letter_replays replay_id -> id`, `counters`, `idempotent_keys (repo, key) -> (state,
//! expires_at)`, `idempotent_expiry (expires_at, repo, key)` (index), `checkpoints key -> bytes`.
//!
//! A lease reads the visibility index up to now (expired leases, elapsed nacks), then fresh
//! records from the channel's cursor; ack deletes the record and its in-flight entries. Every
//! operation touches only the entries it returns or changes.
//!
//! # Group commit
//! One writer thread owns every write transaction ([`GroupCommit`]). Callers send it a closure
//! and await a oneshot reply; the writer takes the first request, then everything that arrives
//! within `max_wait` (2 ms by default) up to `max_batch` records, runs them all in one
//! transaction and commits it with `Durability::Immediate` (fsync). Only then are the replies
//! sent, so an id returned by [`Queue::append`] is always on disk. One fsync serves every
//! producer of the batch; a request waits at most `max_wait`, and the wait ends as soon as the
//! batch is as large as the previous one (producers blocked on a commit come back together: a
//! lone producer never waits, N steady producers commit once all N are in). `benches/queue.rs` measures it against a raw redb loop committing
//! batches of the same size.
//!
//! # Recovery
//! redb commits are atomic and its two-slot header makes a torn commit roll back to the last
//! durable one; quick repair is enabled on every commit so reopening after a crash does not walk
//! the whole file (it costs a second fsync per commit, which group commit amortizes). Above that: leases die with the process (released at open, their delivery
//! count kept, so a consumer sees the redelivery), nack delays survive, and acked records are
//! gone for good.
//!
//! # Testing
//! `src/tests/model.rs` runs random action sequences against the store and an in-memory model,
//! on a simulated disk (`src/tests/sim_disk.rs`, a redb `StorageBackend`) that keeps only synced
//! writes at a crash, plus a random prefix of the later ones with the last possibly torn, and
//! that can lose power in the middle of a commit. `fuzz/` holds a cargo-fuzz target for the
//! record decoder (its own workspace, not built in CI).

pub mod codec;

mod checkpoint;
mod clock;
mod dead_letter;
mod error;
mod idempotent;
mod lock;
mod queue;
mod store;
mod tables;
mod writer;

#[cfg(test)]
mod tests;

pub use checkpoint::Checkpoints;
pub use clock::{Clock, ManualClock, SystemClock};
pub use dead_letter::{
    DeadLetter, DeadLetters, Filter, NewDeadLetter, Page, Replay, ReplayMark, ReplayOutcome,
};
pub use error::StoreError;
pub use idempotent::{Claim, IdempotentKeys};
pub use lock::LOCK_FILE;
pub use queue::{Delivery, Queue};
pub use store::{DATABASE_FILE, DEFAULT_CACHE_SIZE, OpenReport, Store, StoreOptions};
pub use writer::GroupCommit;
