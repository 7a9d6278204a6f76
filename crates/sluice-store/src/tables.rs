//! Every redb table of the store, in one place so the layout can be read at a glance.
//!
//! Keys that start with a channel or repository name keep each one's entries contiguous, so a
//! range over one name never touches another's.

use redb::TableDefinition;

/// `(channel, seq) -> frame(payload)`: every record not yet acknowledged.
pub(crate) const RECORDS: TableDefinition<(&str, u64), &[u8]> =
    TableDefinition::new("queue_records");

/// `channel -> (next_seq, fresh_cursor)`. Records at or after `fresh_cursor` were never leased;
/// records before it that are still stored have an [`IN_FLIGHT`] entry or lie in a
/// [`LEASE_RANGES`] entry (leased once, never since).
pub(crate) const CHANNELS: TableDefinition<&str, (u64, u64)> =
    TableDefinition::new("queue_channels");

/// `(channel, seq) -> (visible_at_ms, deliveries, state)` for records handed out at least once
/// and not acknowledged. `state` is [`LEASED`] or [`DELAYED`].
pub(crate) const IN_FLIGHT: TableDefinition<(&str, u64), (u64, u32, u8)> =
    TableDefinition::new("queue_in_flight");

/// `(channel, visible_at_ms, seq) -> ()`: the in-flight records by the time they become
/// visible again, so a lease finds expired ones without scanning.
pub(crate) const VISIBLE_AT: TableDefinition<(&str, u64, u64), ()> =
    TableDefinition::new("queue_visible_at");

/// `(channel, visible_at_ms, first_seq) -> end_seq`: the records of one lease of fresh records,
/// `first_seq..end_seq`, delivered once and hidden until `visible_at_ms`. One entry per lease
/// instead of one per record: an ack then only deletes the record. A record of the range that
/// has an [`IN_FLIGHT`] entry (nacked, or delivered again) follows that entry instead.
pub(crate) const LEASE_RANGES: TableDefinition<(&str, u64, u64), u64> =
    TableDefinition::new("queue_lease_ranges");

/// In-flight state: held by a consumer until its visibility timeout.
pub(crate) const LEASED: u8 = 0;
/// In-flight state: given back with a delay (nack); stays delayed across restarts.
pub(crate) const DELAYED: u8 = 1;

/// `id -> frame(dead letter)`.
pub(crate) const DEAD_LETTERS: TableDefinition<u64, &[u8]> = TableDefinition::new("dead_letters");

/// `replay_id -> dead letter id`: replays already done, to make replay idempotent.
pub(crate) const REPLAYS: TableDefinition<&str, u64> = TableDefinition::new("dead_letter_replays");

/// `name -> value`: counters (the next dead letter id).
pub(crate) const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");

/// `(repository, key) -> (state, expires_at_ms)`.
pub(crate) const IDEMPOTENT: TableDefinition<(&str, &str), (u8, u64)> =
    TableDefinition::new("idempotent_keys");

/// `(expires_at_ms, repository, key) -> ()`: the keys by expiry, to purge without scanning.
pub(crate) const IDEMPOTENT_EXPIRY: TableDefinition<(u64, &str, &str), ()> =
    TableDefinition::new("idempotent_expiry");

/// `(repository, key) -> ()`: the keys of [`IDEMPOTENT`] that are claimed, not confirmed. A
/// claim belongs to a message in flight, which dies with the process, so open releases every
/// claim listed here, reading only these entries (never the confirmed keys).
pub(crate) const IDEMPOTENT_CLAIMS: TableDefinition<(&str, &str), ()> =
    TableDefinition::new("idempotent_claims");

/// `(repository, group_id) -> (correlation_key, first_at_ms, last_at_ms, size)`: the
/// aggregation groups stored, one row per group (the index a reload reads).
pub(crate) const AGGREGATION_GROUPS: TableDefinition<(&str, &str), (&str, u64, u64, u64)> =
    TableDefinition::new("aggregation_groups");

/// `(repository, group_id, index) -> frame(entry)`: each group's entries, `index` counting from
/// 0 in arrival order, so one range reads a group in order.
pub(crate) const AGGREGATION_ENTRIES: TableDefinition<(&str, &str, u64), &[u8]> =
    TableDefinition::new("aggregation_entries");

/// `key -> value`: small values sources keep across restarts (a polling source's watermark).
pub(crate) const CHECKPOINTS: TableDefinition<&str, &[u8]> = TableDefinition::new("checkpoints");
