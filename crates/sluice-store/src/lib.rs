//! Sluice's embedded durable store, on [redb](https://docs.rs/redb) (pure Rust, ACID, copy-on-write
//! B-trees, durable commits).
//!
//! It keeps bytes and ids, never engine types, so it can be fuzzed and benchmarked alone:
//! durable queues for channels ([`Queue`]), the dead-letter store with idempotent replay
//! ([`DeadLetters`]), idempotency keys with expiry ([`IdempotentKeys`]), aggregation groups
//! ([`AggregationGroups`]) and checkpoints ([`Checkpoints`]).
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
//! expires_at)`, `idempotent_expiry (expires_at, repo, key)` (index), `idempotent_claims (repo, key)` (index),
//! `checkpoints key -> bytes`, `aggregation_groups (repo, group_id) -> (key, first_at, last_at,
//! size)`, `aggregation_entries (repo, group_id, index) -> frame`.
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
//! # I/O errors and a full disk
//! After an I/O error redb refuses everything until its `Database` is opened again. The writer
//! thread does that by itself (`reopen.rs`): it takes the database away from readers, drops it,
//! and opens it again from the same file or backend, retrying with a backoff capped at a second
//! while opening fails; redb's recovery rolls back to the last durable commit, which holds
//! everything ever acknowledged. Leases are kept (their consumers are alive), unlike at open.
//! Requests meanwhile fail at once: [`StoreError::DiskFull`] when the disk is full, else
//! [`StoreError::Abandoned`]; none is queued behind a broken disk.
//!
//! A full disk must not stop consumers, whose acks are what frees space, yet redb needs to write
//! to commit an ack. A store on a directory therefore keeps a **reserve**: the file `reserve`
//! ([`StoreOptions::reserve`], 4 MiB by default), written at open. The first commit that fails
//! because the disk is full deletes it; from then on requests that store new payloads
//! ([`Queue::append`], [`DeadLetters::put`], [`DeadLetters::replay_into`]) fail at once with
//! [`StoreError::DiskFull`] while leases, acks, nacks, deletes and idempotency keys commit on the
//! freed room. The writer tries to write the reserve again (same backoff), and lets producers
//! back in once it can write it with as much again to spare. So:
//!
//! - the reserve is on disk exactly while producers are admitted;
//! - a refused request stored nothing; a failed commit is all or nothing (a full disk fails it
//!   while its pages are written, before the header that would make it durable), and nothing
//!   acknowledged is ever lost;
//! - work resumes in the same process once the disk has room for twice the reserve; nobody
//!   reopens anything. Space freed inside `store.redb` by acks is reused by redb, not returned
//!   to the filesystem, so it does not by itself count as room.
//!
//! [`Store::reserve_in_use`] reports the reserve released (for health checks and metrics); the
//! writer sets it before it answers the requests of the commit that failed, so a producer refused
//! for a full disk finds it set.
//!
//! A store opened on a full disk starts with the reserve released (using it for its recovery
//! commit if needed), so consumers can drain right away. Stores on another backend have no
//! reserve: they reopen, but a full disk fails every write until space returns.
//!
//! # Testing
//! `src/tests/model.rs` runs random action sequences against the store and an in-memory model,
//! on a simulated disk (`src/tests/sim_disk.rs`, a redb `StorageBackend`) that keeps only synced
//! writes at a crash, plus a random prefix of the later ones with the last possibly torn, and
//! that can lose power in the middle of a commit or fill up; `tests/disk_full.rs` fills a real
//! tmpfs (when it can mount one) to check the drain and the recovery. `fuzz/` holds a cargo-fuzz target for the
//! record decoder (its own workspace, not built in CI).

pub mod codec;

mod aggregation;
mod checkpoint;
mod clock;
mod combine;
mod dead_letter;
mod error;
mod idempotent;
mod lock;
mod queue;
mod reopen;
mod reserve;
mod store;
mod tables;
mod writer;

#[cfg(test)]
mod tests;

pub use aggregation::{AggregationGroups, StoredGroup};
pub use checkpoint::Checkpoints;
pub use clock::{Clock, ManualClock, SystemClock};
pub use dead_letter::{
    DeadLetter, DeadLetters, Filter, NewDeadLetter, Page, Replay, ReplayMark, ReplayOutcome,
};
pub use error::StoreError;
pub use idempotent::{Claim, IdempotentKeys};
pub use lock::LOCK_FILE;
pub use queue::{Delivery, Queue};
pub use reserve::{DEFAULT_RESERVE, RESERVE_FILE};
pub use store::{DATABASE_FILE, DEFAULT_CACHE_SIZE, OpenReport, Store, StoreOptions};
pub use writer::GroupCommit;
