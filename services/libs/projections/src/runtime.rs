//! The projection runtime: one [`Projector`] per projection.
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use crm_event_store::{EventStore, Filter, RecordedEvent};
use deadpool_postgres::Pool;
use futures_util::{FutureExt, StreamExt};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// The status table every projection's position lives in, written in the
/// same transaction as the projection's own tables.
pub const STATUS_SCHEMA: &str = "CREATE TABLE IF NOT EXISTS projections (
    name           text        PRIMARY KEY,
    position       bigint      NOT NULL DEFAULT 0,
    state          text        NOT NULL DEFAULT 'running',
    last_error     text,
    error_position bigint,
    holes_refilled bigint      NOT NULL DEFAULT 0,
    updated_at     timestamptz NOT NULL DEFAULT now()
)";

/// Why an event could not be applied: the projection stops on it.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("malformed payload of {event_type}: {reason}")]
    Payload { event_type: String, reason: String },
    #[error("database: {}", described(.0))]
    Database(#[from] tokio_postgres::Error),
    /// Worth retrying (a process manager's command met an unavailable store
    /// or a busy record): the batch is rolled back and retried with backoff,
    /// the projection keeps running.
    #[error("transient: {0}")]
    Transient(String),
}

/// `error` with what PostgreSQL said (tokio-postgres shows only "db error"):
/// severity, message, and the detail when there is one.
pub(crate) fn described(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => match db.detail() {
            Some(detail) => format!("{}: {} ({detail})", db.severity(), db.message()),
            None => format!("{}: {}", db.severity(), db.message()),
        },
        None => error.to_string(),
    }
}

/// The transaction a projection applies its events in: every statement
/// given as SQL text is prepared once per connection and cached, so a batch
/// (or a rebuild's chunk) pays for parsing and planning once per statement,
/// not once per event. Only its own methods reach the transaction, so none
/// can pass the queue below.
///
/// It defers its writes: [`Tx::execute`] encodes the parameters and queues
/// the statement; the queue goes to PostgreSQL as one
/// pipeline (every statement sent before the first answer is awaited)
/// before any read, when it is long, and at commit. Statements still run in
/// the order they were given, so a read sees every write before it; what is
/// saved is a round trip, and a wake-up of the backend and of the client,
/// per statement, and plain INSERTs go many rows at a time
/// (`bulk.rs`). A write that fails is reported at the next read, the
/// next flush or commit; [`Tx::failed_at`] names its event.
pub struct Tx<'a> {
    tx: deadpool_postgres::Transaction<'a>,
    cache: Option<&'a StateCache>,
    /// A rebuild's record of the keys its tables hold.
    fresh: Option<&'a crate::fresh::Fresh>,
    deferred: std::sync::Mutex<Deferred>,
}

/// A transaction's queued writes.
#[derive(Default)]
struct Deferred {
    writes: Vec<Write>,
    /// The position of the event being applied, recorded with each write.
    applying: u64,
    /// The positions of the events whose writes were in the statement that
    /// failed in a pipeline (first and last; the same for a single write).
    failed_at: Option<(u64, u64)>,
    /// Statements queued so far, by where their text lies (address and
    /// length): no hashing or comparing of the text per write. The texts
    /// are `'static`, so one address and length is always one text.
    prepared: FastMap<(usize, usize), PreparedWrite>,
    /// Where the writes' parameters are encoded: blocks of [`ARENA`] bytes,
    /// each write's a shared slice of one (no allocation per write).
    arena: bytes::BytesMut,
}

/// A statement's prepared statement and shape (see [`Deferred::prepared`]).
type PreparedWrite = (tokio_postgres::Statement, Arc<crate::bulk::Shape>);

/// The size of a block of [`Deferred::arena`]. A block is freed once the
/// writes it holds have gone out.
const ARENA: usize = 64 * 1024;

/// One queued write: its statement and its parameters, already encoded.
struct Write {
    statement: tokio_postgres::Statement,
    shape: Arc<crate::bulk::Shape>,
    /// Where each parameter lies ([`Encoded`], `HEAD` bytes each), then
    /// the parameters' bytes, one after the other: one block per write.
    data: bytes::Bytes,
    /// How many parameters it has.
    count: usize,
    /// Whether every parameter is in binary format (only such writes are
    /// gathered into arrays).
    binary: bool,
    position: u64,
}

impl Write {
    /// Tells queued writes apart (while the queue is borrowed).
    fn id(&self) -> usize {
        self as *const Self as usize
    }

    /// Where parameter `k` lies.
    fn encoded(&self, k: usize) -> Encoded {
        let head = &self.data[k * HEAD..(k + 1) * HEAD];
        let word = |i: usize| [head[i], head[i + 1], head[i + 2], head[i + 3]];
        Encoded {
            at: u32::from_le_bytes(word(0)),
            len: i32::from_le_bytes(word(4)),
            format: match head[8] {
                0 => tokio_postgres::types::Format::Text,
                _ => tokio_postgres::types::Format::Binary,
            },
        }
    }

    /// Parameter `k`'s bytes (`None` for NULL).
    fn bytes(&self, k: usize) -> Option<&[u8]> {
        let Encoded { at, len, .. } = self.encoded(k);
        let len = usize::try_from(len).ok()?;
        self.data.get(at as usize..at as usize + len)
    }
}

/// Queued writes as they go out: one by one, or gathered into one INSERT.
enum Gathered<'w> {
    One(&'w Write),
    Many(&'w crate::bulk::Bulk, Vec<Row<'w>>),
}

/// One row of a gathering: a write, or consecutive writes of one key
/// collapsed into one ([`crate::bulk::Collapse::Last`]), which takes the
/// parameters `keep` from the first and the others from the last.
#[derive(Clone, Copy)]
struct Row<'w> {
    first: &'w Write,
    last: &'w Write,
    keep: &'w [usize],
}

impl<'w> Row<'w> {
    fn new(write: &'w Write) -> Self {
        Self {
            first: write,
            last: write,
            keep: &[],
        }
    }

    /// Parameter `k`'s bytes (`None` for NULL).
    fn param(&self, k: usize) -> Option<&'w [u8]> {
        let from = if self.keep.contains(&k) {
            self.first
        } else {
            self.last
        };
        from.bytes(k)
    }

    /// The write itself, when it stands alone.
    fn alone(&self) -> Option<&'w Write> {
        std::ptr::eq(self.first, self.last).then_some(self.last)
    }
}

/// Per new row of a flush (by its first write): the parameters the
/// UPDATEs folded into it set, in order, and the last position they bring.
type Overrides<'w> = FastMap<usize, (Vec<(usize, Option<&'w [u8]>)>, u64)>;

/// A row's parameters as it goes out: each the last value an UPDATE
/// folded into it sets (looked up once per row), else its own.
fn row_values<'a, 'w>(
    overrides: &'a Overrides<'w>,
    row: &'a Row<'w>,
) -> impl Fn(usize) -> Option<&'w [u8]> + 'a {
    let set = match overrides.is_empty() {
        true => None,
        false => overrides.get(&row.first.id()).map(|(set, _)| set),
    };
    move |k| {
        set.and_then(|set| set.iter().rev().find(|(p, _)| *p == k).map(|(_, v)| *v))
            .unwrap_or_else(|| row.param(k))
    }
}

/// `rows` as [`crate::bulk::CopyIn`]'s data: PostgreSQL's binary COPY
/// format, each field the bytes its parameter was encoded to (with the
/// folds of `overrides`), which are its column's binary form.
fn copied(copy: &crate::bulk::CopyIn, rows: &[Row<'_>], overrides: &Overrides<'_>) -> bytes::Bytes {
    use bytes::BufMut;
    let fields = i16::try_from(copy.params.len()).unwrap_or(i16::MAX);
    let mut data = bytes::BytesMut::with_capacity(64 + rows.len() * 64);
    data.put_slice(b"PGCOPY\n\xff\r\n\0");
    data.put_i32(0); // flags
    data.put_i32(0); // header extension
    for row in rows {
        let value = row_values(overrides, row);
        data.put_i16(fields);
        for &k in &copy.params {
            match value(k) {
                Some(bytes) => {
                    data.put_i32(i32::try_from(bytes.len()).unwrap_or(i32::MAX));
                    data.put_slice(bytes);
                }
                None => data.put_i32(-1),
            }
        }
    }
    data.put_i16(-1);
    data.freeze()
}

/// One statement of a pipeline.
enum Outgoing<'w> {
    One(&'w Write),
    /// A gathered INSERT: its statement, its arrays, the first and last
    /// position of its writes.
    Many(
        tokio_postgres::Statement,
        Vec<crate::bulk::Column<'w>>,
        (u64, u64),
    ),
}

/// `writes` in the order they go out: each write of a gatherable statement
/// joins the first earlier write of the same statement unless a write in
/// between mentions its table (see [`crate::bulk`]).
///
/// Scoped writes ([`crate::bulk::Bulk::scope`]) of one table go further
/// when `commutes(table, columns)` says every unique index of the table
/// covers the scope's columns: each touches only the rows holding its own
/// values of those columns, so writes of different values commute, and
/// only the order of the writes of one value matters. Such a write joins
/// the first open gathering of its statement placed after the one holding
/// the previous write of its value, and other scoped statements of the
/// table do not close gatherings (an INSERT of one deal between the
/// UPDATEs of others, say). Scoped writes of one table that name different
/// columns are told apart by the columns they all name (a visit's INSERT by
/// deal and visit, its closing UPDATE by deal: both by deal), as long as
/// one's columns are among the other's.
///
/// Where a value's last write so far is one of the same statement and that
/// statement collapses ([`crate::bulk::Collapse`]), the new write takes its
/// place (`Last`: an upsert of a whole row, a keyed UPDATE of parameters)
/// or is dropped (`First`: `DO NOTHING`): a row written at every event of
/// a batch goes out once, as it ends up.
///
/// With `fold` (a rebuild's flush), a keyed UPDATE of a row whose writes in
/// this flush so far are an `INSERT ... ON CONFLICT` of that row and keyed
/// UPDATEs that fold into it is also listed in [`Folds`] under the insert:
/// should that insert go out as a plain INSERT of a new row, its values
/// take the UPDATEs' and they are not sent ([`crate::bulk::fold`]).
/// Moving an UPDATE's effect back to the insert passes no write of its row
/// (the row's writes in between all fold) and no write naming its table
/// unscoped (which closes the table's gatherings and ends the chain).
fn gathered<'w>(
    writes: &'w [Write],
    commutes: &dyn Fn(&str, &[String]) -> bool,
    fold: bool,
) -> (Vec<Gathered<'w>>, Folds) {
    let mut items: Vec<Gathered<'_>> = Vec::new();
    let mut folds = Folds::default();
    // Rows (gathering, row) of UPDATEs listed in `folds`, with the insert
    // row they fold into.
    let mut pending: FastMap<(usize, usize), (usize, usize)> = FastMap::default();
    let mut pairs = PairsCache::default();
    // Gatherings still open: the statement's shape (one per SQL text),
    // index in `items`.
    let mut open: Vec<(&Arc<crate::bulk::Shape>, usize)> = Vec::new();
    // Per table written by scoped writes: their columns, the open
    // gatherings holding them, and per value the gathering of its last write.
    let mut scoped: FastMap<&str, Scoped<'w>> = FastMap::default();
    for write in writes {
        let bulk = write.shape.bulk.as_ref().filter(|_| write.binary);
        let scope = bulk.and_then(|bulk| {
            let scope = bulk.scope.as_ref()?;
            commutes(bulk.table(), &scope.columns).then_some((bulk, scope))
        });
        // Values are told apart by their bytes, which are the same for the
        // same value only in parameters of one type (5 as `int4` and as
        // `int8` are not). A write whose key columns' parameters have other
        // types than the table's scoped writes so far goes alone, after
        // them (before, it could join a gathering ahead of a write of its
        // own key).
        let (bulk, scope) = match scope {
            Some((bulk, scope))
                if scoped
                    .get(bulk.table())
                    .is_some_and(|state| !state.typed_alike(bulk, scope)) =>
            {
                (None, None)
            }
            _ => (bulk, scope),
        };
        // An UPDATE goes gathered only under a scope that commutes.
        let bulk = bulk.filter(|bulk| !bulk.needs_scope || scope.is_some());
        if let Some((bulk, scope)) = scope {
            let table = bulk.table();
            let fresh = !scoped.contains_key(table);
            let state = scoped.entry(table).or_insert_with(|| Scoped {
                columns: &scope.columns,
                groups: Vec::new(),
                last: FastMap::default(),
                types: Vec::new(),
            });
            state.note_types(bulk, scope);
            // A write confined to the rows of its own values of some columns
            // is confined to those of its values of fewer of them: the
            // table's writes are told apart by the columns they all name.
            if !fresh && scope.columns.len() < state.columns.len() {
                state.coarsen(&scope.columns);
            }
            let mut value = Some(KeyValue::default());
            if std::ptr::eq(state.columns, &scope.columns[..]) {
                // The state's own columns (most often): in the scope's order.
                for (n, &k) in scope.params.iter().enumerate() {
                    match value.as_mut().and_then(|v| v.0.get_mut(n)) {
                        Some(part) => *part = write.bytes(k),
                        None => value = None,
                    }
                }
            } else {
                for (n, column) in state.columns.iter().enumerate() {
                    let at = scope.columns.iter().position(|c| c == column);
                    match (at, value.as_mut().and_then(|v| v.0.get_mut(n))) {
                        (Some(at), Some(part)) => {
                            *part = write.bytes(scope.params[at]);
                        }
                        _ => value = None,
                    }
                }
            }
            if let Some(value) = value {
                // Found once, set where the write is placed (hashed once).
                let slot = state.last.entry(value);
                let after = match &slot {
                    std::collections::hash_map::Entry::Occupied(last) => Some(*last.get()),
                    std::collections::hash_map::Entry::Vacant(_) => None,
                };
                let target = match after {
                    Some(last) if fold => {
                        fold_target(&items, &pending, &mut pairs, last, write, bulk)
                    }
                    _ => None,
                };
                // The value's last write is this statement's, for the same
                // row: one of the two stands for both. (Not for a NULL in the
                // key, which never conflicts: two such writes are two rows.
                // The write that does not go out is not checked either: one
                // that would have failed on its own passes unseen.)
                if let (Some((at, row)), Some(collapse)) = (after, &bulk.collapse)
                    && let Gathered::Many(_, rows) = &mut items[at]
                    && Arc::ptr_eq(&rows[row].last.shape, &write.shape)
                    && scope.params.iter().all(|&k| {
                        let key = write.bytes(k);
                        key.is_some() && rows[row].last.bytes(k) == key
                    })
                {
                    if let crate::bulk::Collapse::Last { keep } = collapse {
                        rows[row].last = write;
                        rows[row].keep = keep;
                    }
                    continue;
                }
                let after = after.map(|(at, _)| at);
                let join = state.groups.iter().copied().find(|&at| {
                    after.is_none_or(|after| at > after)
                        && matches!(&items[at], Gathered::Many(_, rows)
                            if Arc::ptr_eq(&rows[0].last.shape, &write.shape))
                });
                if let Some(at) = join
                    && let Gathered::Many(_, rows) = &mut items[at]
                {
                    let placed = (at, rows.len());
                    placed_at(slot, placed);
                    rows.push(Row::new(write));
                    folds.add(&mut pending, placed, target);
                    continue;
                }
                // Close what this write must follow: gatherings of other
                // tables it names, and, when the state is fresh, those of
                // this table (otherwise every open gathering of the table is
                // one of the state's: any other write naming the table
                // closed them all and dropped the state).
                let before = open.len();
                open.retain(|(_, at)| match &items[*at] {
                    Gathered::Many(other, _) if other.table() == table => !fresh,
                    Gathered::Many(other, _) => !write.shape.mentions(other.table()),
                    Gathered::One(_) => false,
                });
                let closed = open.len() < before;
                let at = items.len();
                open.push((&write.shape, at));
                state.groups.push(at);
                placed_at(slot, (at, 0));
                items.push(Gathered::Many(bulk, vec![Row::new(write)]));
                folds.add(&mut pending, (at, 0), target);
                if closed {
                    prune(&mut scoped, &open);
                }
                continue;
            }
        }
        if bulk.is_some()
            && let Some(&(_, at)) = open
                .iter()
                .find(|(shape, _)| Arc::ptr_eq(shape, &write.shape))
            && let Gathered::Many(_, rows) = &mut items[at]
        {
            rows.push(Row::new(write));
            continue;
        }
        let before = open.len();
        open.retain(|(_, at)| match &items[*at] {
            Gathered::Many(bulk, _) => !write.shape.mentions(bulk.table()),
            Gathered::One(_) => false,
        });
        let closed = open.len() < before;
        match bulk {
            Some(bulk) => {
                open.push((&write.shape, items.len()));
                items.push(Gathered::Many(bulk, vec![Row::new(write)]));
            }
            None => items.push(Gathered::One(write)),
        }
        if closed {
            prune(&mut scoped, &open);
        }
    }
    (items, folds)
}

/// The values of a scope (`columns`) that gathered writes of a table wrote
/// in a flush.
struct Written<'w> {
    columns: &'w [String],
    /// The types of the parameters that carry them: equal bytes are equal
    /// values only between parameters of one type.
    types: Vec<&'w tokio_postgres::types::Type>,
    values: FastMap<KeyValue<'w>, ()>,
}

impl Written<'_> {
    /// Whether `self` and `other` are values of the same columns, in
    /// parameters of the same types.
    fn comparable(&self, other: &Self) -> bool {
        self.columns == other.columns && self.types == other.types
    }
}

/// Adds to `named` that gathered writes of `table` wrote `written` (`None`:
/// not known which rows, or not comparable with those before).
fn name<'w>(
    named: &mut Vec<(&'w str, Option<Written<'w>>)>,
    table: &'w str,
    written: Option<Written<'w>>,
) {
    match named.iter_mut().find(|(other, _)| *other == table) {
        None => named.push((table, written)),
        Some((_, before)) => {
            *before = match (before.take(), written) {
                (Some(mut before), Some(written)) if before.comparable(&written) => {
                    before.values.extend(written.values);
                    Some(before)
                }
                _ => None,
            };
        }
    }
}

/// The values of `bulk`'s scope that `rows` write, if its scope commutes
/// (writes of other values cannot touch their rows) and each is known.
fn written<'w>(
    bulk: &'w crate::bulk::Bulk,
    rows: &[Row<'w>],
    commutes: &dyn Fn(&str, &[String]) -> bool,
) -> Option<Written<'w>> {
    let scope = bulk.scope.as_ref()?;
    if !commutes(bulk.table(), &scope.columns) {
        return None;
    }
    let types = scope
        .params
        .iter()
        .map(|&k| bulk.types.get(k))
        .collect::<Option<Vec<_>>>()?;
    let mut values = FastMap::default();
    for row in rows {
        values.insert(
            KeyValue::new(scope.params.iter().map(|&k| row.param(k)))?,
            (),
        );
    }
    Some(Written {
        columns: &scope.columns,
        types,
        values,
    })
}

/// Records where a value's last write now is.
fn placed_at(
    slot: std::collections::hash_map::Entry<'_, KeyValue<'_>, (usize, usize)>,
    at: (usize, usize),
) {
    match slot {
        std::collections::hash_map::Entry::Occupied(mut last) => {
            last.insert(at);
        }
        std::collections::hash_map::Entry::Vacant(last) => {
            last.insert(at);
        }
    }
}

/// See [`gathered`]: per insert row (by its first write), the UPDATE rows
/// (gathering, row) that fold into it, in order, each with the parameter
/// pairs of [`crate::bulk::fold`].
#[derive(Default)]
struct Folds {
    into: FastMap<usize, Vec<(usize, usize, Pairs)>>,
}

/// Parameter pairs `(insert's k, update's j)`.
type Pairs = Arc<[(usize, usize)]>;

/// [`crate::bulk::fold`] by (insert, update) statement, worked out once per
/// flush.
type PairsCache = Vec<(
    *const crate::bulk::Bulk,
    *const crate::bulk::Bulk,
    Option<Pairs>,
)>;

impl Folds {
    /// Lists the UPDATE row placed at `placed` under its insert row, if it
    /// folds into one (`target`: the insert row, its first write, pairs).
    fn add(
        &mut self,
        pending: &mut FastMap<(usize, usize), (usize, usize)>,
        placed: (usize, usize),
        target: Option<((usize, usize), usize, Pairs)>,
    ) {
        if let Some((insert, first, pairs)) = target {
            pending.insert(placed, insert);
            self.into
                .entry(first)
                .or_default()
                .push((placed.0, placed.1, pairs));
        }
    }
}

/// The insert row a keyed UPDATE `write` of `update` folds into, when the
/// last write of its row so far (`last`) is that insert row or an UPDATE
/// row folding into it: the insert row, its first write and the parameter
/// pairs.
fn fold_target(
    items: &[Gathered<'_>],
    pending: &FastMap<(usize, usize), (usize, usize)>,
    cache: &mut PairsCache,
    last: (usize, usize),
    write: &Write,
    update: &crate::bulk::Bulk,
) -> Option<((usize, usize), usize, Pairs)> {
    if update.fed.is_empty() {
        return None;
    }
    let target = pending.get(&last).copied().unwrap_or(last);
    let Gathered::Many(insert, rows) = items.get(target.0)? else {
        return None;
    };
    let pairs = match cache
        .iter()
        .find(|(i, u, _)| std::ptr::eq(*i, *insert) && std::ptr::eq(*u, update))
    {
        Some((_, _, pairs)) => pairs.clone(),
        None => {
            let pairs: Option<Pairs> = crate::bulk::fold(insert, update).map(Into::into);
            cache.push((*insert, update, pairs.clone()));
            pairs
        }
    }?;
    let row = rows.get(target.1)?;
    // The same row: every column of the conflict target equal (scopes
    // list their columns sorted, and `fold` checked they are the same),
    // none NULL (an UPDATE by a NULL key finds no row).
    let (by_insert, by_update) = (insert.scope.as_ref()?, update.scope.as_ref()?);
    for (&i, &u) in by_insert.params.iter().zip(&by_update.params) {
        let key = write.bytes(u);
        if key.is_none() || row.param(i) != key {
            return None;
        }
    }
    Some((target, row.first.id(), pairs))
}

/// A table's unique indexes: each one's columns, `None` for one that is
/// not a plain unique index of columns.
type UniqueIndexes = std::sync::Arc<Vec<Option<Vec<String>>>>;

/// A map for the queue's own bookkeeping (a few thousand keys per batch,
/// hashed at every write): a multiply-rotate hash (FxHash's) instead of
/// SipHash, which took 6 % of a rebuild. Its keys come from the events, but
/// a batch is small, so even keys made to collide cost little.
pub(crate) type FastMap<K, V> =
    std::collections::HashMap<K, V, std::hash::BuildHasherDefault<FastHasher>>;

#[derive(Default)]
pub(crate) struct FastHasher(u64);

impl std::hash::Hasher for FastHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
        // The last 1 to 7 bytes in one word (one multiply, not one per
        // byte), with their count in the top byte: a tail of zero bytes
        // still tells writes of different lengths apart.
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut word = (rest.len() as u64) << 56;
            for (i, &byte) in rest.iter().enumerate() {
                word |= u64::from(byte) << (8 * i);
            }
            self.add(word);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }

    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }

    fn finish(&self) -> u64 {
        // A last mix (MurmurHash3's), so that words that differ only in
        // their high bits (a big-endian integer's low bytes, say) still
        // land in different buckets: the table picks them by the low bits.
        let mut h = self.0;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^ (h >> 33)
    }
}

/// [`FastHasher`]s that start from a random seed, for a map that lives long
/// and holds keys from the events (a rebuild's record of keys): keys that
/// collide from a known start do not from an unknown one.
#[derive(Clone)]
pub(crate) struct Seeded(u64);

impl Default for Seeded {
    fn default() -> Self {
        use std::hash::BuildHasher;
        Self(std::collections::hash_map::RandomState::new().hash_one(0x5eed_u64))
    }
}

impl std::hash::BuildHasher for Seeded {
    type Hasher = FastHasher;

    fn build_hasher(&self) -> FastHasher {
        FastHasher(self.0)
    }
}

impl FastHasher {
    fn add(&mut self, word: u64) {
        const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(SEED);
    }
}

/// The values of a write's key columns (at most [`crate::bulk::KEY_PARTS`],
/// the rest `None`), told apart without an allocation per write. The keys
/// of one map all have the same columns.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
struct KeyValue<'w>([Option<&'w [u8]>; crate::bulk::KEY_PARTS]);

impl<'w> KeyValue<'w> {
    /// `None` when there are more parts than it holds.
    fn new(parts: impl IntoIterator<Item = Option<&'w [u8]>>) -> Option<Self> {
        let mut value = Self::default();
        for (n, part) in parts.into_iter().enumerate() {
            *value.0.get_mut(n)? = part;
        }
        Some(value)
    }
}

/// The scoped writes of one table in [`gathered`].
struct Scoped<'w> {
    columns: &'w [String],
    groups: Vec<usize>,
    /// Per value, where its last write is: its gathering and its row there.
    last: FastMap<KeyValue<'w>, (usize, usize)>,
    /// The type of the parameters that gave each column's values.
    types: Vec<(&'w str, &'w tokio_postgres::types::Type)>,
}

impl<'w> Scoped<'w> {
    /// Tells the writes apart by `columns` from now on, when they are some
    /// of the present ones: each value's last write is then the latest of
    /// those of the values it gathers.
    /// Whether `bulk`'s parameters for `scope`'s columns have the types
    /// those columns' values had so far.
    fn typed_alike(&self, bulk: &crate::bulk::Bulk, scope: &crate::bulk::Scope) -> bool {
        scope.columns.iter().zip(&scope.params).all(|(column, &k)| {
            self.types
                .iter()
                .find(|(own, _)| *own == column)
                .is_none_or(|(_, own)| bulk.types.get(k) == Some(*own))
        })
    }

    /// Notes the types of `bulk`'s parameters for `scope`'s columns.
    fn note_types(&mut self, bulk: &'w crate::bulk::Bulk, scope: &'w crate::bulk::Scope) {
        for (column, &k) in scope.columns.iter().zip(&scope.params) {
            if let Some(own) = bulk.types.get(k)
                && !self.types.iter().any(|(noted, _)| noted == column)
            {
                self.types.push((column, own));
            }
        }
    }

    fn coarsen(&mut self, columns: &'w [String]) {
        let Some(kept): Option<Vec<usize>> = columns
            .iter()
            .map(|c| self.columns.iter().position(|own| own == c))
            .collect()
        else {
            return;
        };
        // Built beside the present map, which is replaced only once the new
        // one is whole (it always is: fewer columns than now fit).
        let mut last: FastMap<_, (usize, usize)> = FastMap::default();
        for (value, &at) in &self.last {
            let Some(value) = KeyValue::new(kept.iter().map(|&i| value.0[i])) else {
                return;
            };
            let latest = last.entry(value).or_insert(at);
            *latest = (*latest).max(at);
        }
        self.columns = columns;
        self.last = last;
    }
}

/// Forgets the scoped state of tables whose gatherings were closed (a
/// table's gatherings close together, so its last one tells).
fn prune(scoped: &mut FastMap<&str, Scoped<'_>>, open: &[(&Arc<crate::bulk::Shape>, usize)]) {
    scoped.retain(|_, state| {
        state
            .groups
            .last()
            .is_some_and(|last| open.iter().any(|(_, at)| at == last))
    });
}

/// `rows` of one gathered INSERT as statements: under `ON CONFLICT ... DO
/// UPDATE` the n-th write of a key goes into the n-th statement.
fn one_update_per_row<'w>(bulk: &crate::bulk::Bulk, rows: Vec<Row<'w>>) -> Vec<Vec<Row<'w>>> {
    let Some(key) = &bulk.key else {
        return vec![rows];
    };
    if key.len() > crate::bulk::KEY_PARTS {
        // Not planned so (`bulk::conflict_target`); one by one would do.
        return rows.into_iter().map(|row| vec![row]).collect();
    }
    let mut seen: FastMap<KeyValue<'w>, usize> =
        FastMap::with_capacity_and_hasher(rows.len(), Default::default());
    let mut statements: Vec<Vec<Row<'w>>> = Vec::new();
    for write in rows {
        let id = KeyValue::new(key.iter().map(|&k| write.param(k))).unwrap_or_default();
        let nth = seen.entry(id).or_default();
        if statements.len() <= *nth {
            statements.push(Vec::new());
        }
        statements[*nth].push(write);
        *nth += 1;
    }
    statements
}

/// A parameter encoded when its statement was queued (its value is borrowed
/// only for the call), sent as those bytes later: where they lie in its
/// write's `data`, as its first `HEAD * count` bytes hold it (`at` and
/// `len` little-endian, then 1 for binary format, 0 for text).
#[derive(Clone, Copy, Debug)]
struct Encoded {
    at: u32,
    /// -1 for NULL.
    len: i32,
    format: tokio_postgres::types::Format,
}

/// The bytes of one [`Encoded`] at the head of a write's data.
const HEAD: usize = 9;

/// A queued parameter as it goes out in a write sent alone.
#[derive(Debug)]
struct Sent<'w> {
    bytes: Option<&'w [u8]>,
    format: tokio_postgres::types::Format,
}

impl tokio_postgres::types::ToSql for Sent<'_> {
    fn to_sql(
        &self,
        _: &tokio_postgres::types::Type,
        out: &mut bytes::BytesMut,
    ) -> Result<tokio_postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        Ok(match &self.bytes {
            Some(bytes) => {
                out.extend_from_slice(bytes);
                tokio_postgres::types::IsNull::No
            }
            None => tokio_postgres::types::IsNull::Yes,
        })
    }

    /// Checked when it was encoded, for the statement's own type.
    fn accepts(_: &tokio_postgres::types::Type) -> bool {
        true
    }

    fn encode_format(&self, _: &tokio_postgres::types::Type) -> tokio_postgres::types::Format {
        self.format
    }

    tokio_postgres::types::to_sql_checked!();
}

/// Queued writes sent as one pipeline when the queue reaches this length.
const PIPELINE: usize = 1_000;

/// The same in a rebuild's chunk: its writes go at commit or in pipelines
/// this long, so rows written at many events collapse across thousands of
/// events and the worker seldom waits.
const REBUILD_PIPELINE: usize = 20_000;

/// Aggregate states a rebuild has written, by row, so the next event of the
/// same stream evolves them without reading them back. Only a rebuild uses
/// one: it is its tables' only writer and any failure discards them, so the
/// cache cannot disagree with what was committed. Bounded: when full it is
/// emptied and rows are read again.
#[derive(Default)]
pub struct StateCache {
    states: std::sync::Mutex<CachedStates>,
}

/// A cached state by (its projection's select statement, row id), with its
/// tenant (checked when taken: ids are unique within a tenant only).
type CachedStates = FastMap<(usize, uuid::Uuid), (String, Box<dyn std::any::Any + Send>)>;

/// Most states a [`StateCache`] holds.
const STATE_CACHE_ROWS: usize = 200_000;

impl StateCache {
    /// The state last put for the row, taken out (the caller evolves it
    /// and puts the new one back; a row taken and not put back is read
    /// from its table next time).
    pub(crate) fn take<A: 'static>(
        &self,
        select: &'static str,
        tenant: &str,
        id: uuid::Uuid,
    ) -> Option<A> {
        let mut states = self.states.lock().unwrap_or_else(|e| e.into_inner());
        let (owner, cached) = states.get_mut(&(select.as_ptr() as usize, id))?;
        if owner != tenant {
            return None;
        }
        // The entry stays, holding nothing (a `Box<()>` allocates nothing),
        // so that putting the row's next state back needs no new key.
        let state = std::mem::replace(cached, Box::new(()));
        state.downcast::<A>().ok().map(|state| *state)
    }

    pub(crate) fn put<A: Send + 'static>(
        &self,
        select: &'static str,
        tenant: &str,
        id: uuid::Uuid,
        state: A,
    ) {
        let mut states = self.states.lock().unwrap_or_else(|e| e.into_inner());
        if states.len() >= STATE_CACHE_ROWS {
            states.clear();
        } else if states.capacity() == 0 {
            // Room for all at once: growing step by step rehashes every
            // state each time and faults in fresh pages for each new table.
            // (Only the control bytes are written now; the slots' pages are
            // faulted in as they fill.)
            states.reserve(STATE_CACHE_ROWS);
        }
        let key = (select.as_ptr() as usize, id);
        match states.get_mut(&key) {
            Some((owner, cached)) if owner == tenant => *cached = Box::new(state),
            _ => {
                states.insert(key, (tenant.to_owned(), Box::new(state)));
            }
        }
    }
}

type Params<'p> = &'p [&'p (dyn tokio_postgres::types::ToSql + Sync)];

impl<'a> Tx<'a> {
    /// A projector's batch (or a rebuild's catch-up at its swap).
    pub fn deferring(tx: deadpool_postgres::Transaction<'a>) -> Self {
        Self {
            tx,
            cache: None,
            fresh: None,
            deferred: std::sync::Mutex::default(),
        }
    }

    /// A rebuild's chunk: it also remembers the states it writes, and
    /// (`fresh`) the keys its tables hold.
    pub(crate) fn rebuilding(
        tx: deadpool_postgres::Transaction<'a>,
        cache: &'a StateCache,
        fresh: &'a crate::fresh::Fresh,
    ) -> Self {
        Self {
            tx,
            cache: Some(cache),
            fresh: Some(fresh),
            deferred: std::sync::Mutex::default(),
        }
    }

    /// A statement about to go out as it is, not queued: the rebuild's
    /// record of keys hears of it.
    fn observe(&self, sql: &str, types: &[tokio_postgres::types::Type]) {
        if let Some(fresh) = self.fresh {
            fresh.observe(&crate::bulk::shape(sql, types));
        }
    }

    pub(crate) fn cache(&self) -> Option<&StateCache> {
        self.cache
    }

    /// Whether this is a rebuild's transaction, into fresh tables (see
    /// [`Projection::rebuild_keys`]).
    pub fn in_rebuild(&self) -> bool {
        self.cache.is_some()
    }

    fn deferred(&self) -> std::sync::MutexGuard<'_, Deferred> {
        self.deferred.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The event about to be applied: a deferred write that fails is
    /// reported at its position ([`Tx::failed_at`]).
    pub fn applying(&self, position: u64) {
        self.deferred().applying = position;
    }

    /// The positions of the first and last event whose deferred writes were
    /// in the statement that failed, if one did (one event: the same twice).
    pub fn failed_at(&self) -> Option<(u64, u64)> {
        self.deferred().failed_at
    }

    /// The event to stop on for `error`, met while applying the event at
    /// `position` (or committing up to it), and what to say: the event whose
    /// deferred write failed when one did, naming every event whose writes
    /// were in that one statement.
    pub fn blame(&self, position: u64, error: impl std::fmt::Display) -> (u64, String) {
        match self.failed_at() {
            Some((first, last)) if first != last => (
                first,
                format!("in one statement with the writes of events {first} to {last}: {error}"),
            ),
            Some((first, _)) => (first, error.to_string()),
            None => (position, error.to_string()),
        }
    }

    /// Sends the queued writes as one pipeline and waits for them all. The
    /// writes of one plain INSERT go as one statement where that changes
    /// nothing (`bulk.rs`).
    ///
    /// Boxed, as are the other rare awaits of [`Tx::execute`] and the
    /// reads': a future holds the futures it awaits inline, so without the
    /// box every projection's `apply` future carried a flush's state (3 to
    /// 7 kB, copied into its box at every event: 8 % of a rebuild's CPU).
    pub async fn flush(&self) -> Result<(), tokio_postgres::Error> {
        Box::pin(self.flush_then(std::future::ready(Ok(())), None)).await
    }

    /// Sends the queued writes, then `read` behind them in the same
    /// pipeline (one round trip for both; it sees what they wrote), and
    /// returns what `read` returns once every write has succeeded. `read`
    /// must send its request on its first poll (tokio-postgres queries do).
    ///
    /// `read_shape` is the read's statement, for a rebuild's record of keys
    /// (a read may write: `UPDATE ... RETURNING`): heard after the queued
    /// writes, which run before it.
    async fn flush_then<T>(
        &self,
        read: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
        read_shape: Option<&crate::bulk::Shape>,
    ) -> Result<T, tokio_postgres::Error> {
        let writes = std::mem::take(&mut self.deferred().writes);
        let observe_read = || {
            if let (Some(fresh), Some(shape)) = (self.fresh, read_shape) {
                fresh.observe(shape);
            }
        };
        if writes.is_empty() {
            observe_read();
            return read.await;
        }
        let unique = self.unique_indexes(&writes).await?;
        let commutes = |table: &str, columns: &[String]| {
            unique.get(table).is_some_and(|indexes| {
                !indexes.is_empty()
                    && indexes.iter().all(|index| {
                        index
                            .as_ref()
                            .is_some_and(|index| columns.iter().all(|c| index.contains(c)))
                    })
            })
        };
        let mut sends = Vec::new();
        // Tables written by the gathered statements in `sends` (a gathered
        // statement writes its own table alone and reads no other), each
        // with the values of its scope they wrote, where they are known, the
        // scope commutes and every such statement of the table had the same
        // scope columns and parameter types: `None` where not.
        let mut named: Vec<(&str, Option<Written<'_>>)> = Vec::new();
        // The statements in `sends` that were not gathered (they may read
        // or write any table).
        let mut ungathered: Vec<&Write> = Vec::new();
        // New rows that go first, by COPY: the statement, data, positions.
        let mut copies: Vec<(tokio_postgres::Statement, bytes::Bytes, (u64, u64))> = Vec::new();
        let (items, folds) = gathered(&writes, &commutes, self.fresh.is_some());
        let mut items: Vec<Option<Gathered<'_>>> = items.into_iter().map(Some).collect();
        // UPDATE rows folded into the plain INSERT of their row (by first
        // write), and per such insert row (by first write) the parameters
        // its folds set, in order, and the last position they bring.
        let mut dropped: FastMap<usize, ()> = FastMap::default();
        let mut overrides: Overrides<'_> = FastMap::default();
        for i in 0..items.len() {
            let Some(item) = items[i].take() else {
                continue;
            };
            match item {
                Gathered::One(write) => {
                    if let Some(fresh) = self.fresh {
                        fresh.observe(&write.shape);
                    }
                    ungathered.push(write);
                    sends.push(Outgoing::One(write));
                }
                Gathered::Many(bulk, mut rows) => {
                    if !dropped.is_empty() {
                        rows.retain(|row| !dropped.contains_key(&row.first.id()));
                        if rows.is_empty() {
                            continue;
                        }
                    }
                    let mut statements = Vec::new();
                    for rows in one_update_per_row(bulk, rows) {
                        match self.fresh {
                            Some(fresh) => {
                                let commutes = bulk
                                    .scope
                                    .as_ref()
                                    .is_some_and(|scope| commutes(bulk.table(), &scope.columns));
                                let split =
                                    fresh.split(bulk, commutes, rows, |row: &Row<'_>, k| {
                                        row.param(k)
                                    });
                                if let crate::bulk::Effect::Upsert { plain } = &bulk.effect
                                    && !split.plain.is_empty()
                                {
                                    // New rows take the UPDATEs that fold
                                    // into them, which are not sent.
                                    for row in &split.plain {
                                        let Some(list) = folds.into.get(&row.first.id()) else {
                                            continue;
                                        };
                                        let (set, last) = overrides
                                            .entry(row.first.id())
                                            .or_insert_with(|| (Vec::new(), 0));
                                        for (at, r, pairs) in list {
                                            let Some(Some(Gathered::Many(_, updates))) =
                                                items.get(*at)
                                            else {
                                                continue;
                                            };
                                            let update = updates[*r];
                                            set.extend(
                                                pairs.iter().map(|&(k, j)| (k, update.param(j))),
                                            );
                                            *last = (*last).max(update.last.position);
                                            dropped.insert(update.first.id(), ());
                                        }
                                    }
                                    statements.push((plain.as_str(), split.plain, false));
                                }
                                if !split.kept.is_empty() {
                                    statements.push((bulk.sql.as_str(), split.kept, true));
                                }
                            }
                            None => statements.push((bulk.sql.as_str(), rows, true)),
                        }
                    }
                    for (sql, rows, as_is) in statements {
                        if as_is
                            && let [row] = rows[..]
                            && let Some(write) = row.alone()
                        {
                            // Sent alone, but still a gathered statement's
                            // write: of its own table only.
                            name(&mut named, bulk.table(), written(bulk, &rows, &commutes));
                            sends.push(Outgoing::One(write));
                            continue;
                        }
                        let positions = rows.iter().flat_map(|row| {
                            // With the positions of the UPDATEs folded in.
                            let folded = match overrides.is_empty() {
                                true => None,
                                false => overrides.get(&row.first.id()),
                            };
                            let last = folded.map_or(row.last.position, |(_, last)| *last);
                            [row.first.position, row.last.position, last]
                        });
                        let span = (
                            positions.clone().min().unwrap_or_default(),
                            positions.max().unwrap_or_default(),
                        );
                        // New rows (`!as_is`) by COPY, at the head of the
                        // flush: ahead of the statements before them, which
                        // is the same as long as none of those names the
                        // table (a statement sent alone may read it; a
                        // gathered one writes only its own table), or the
                        // gathered ones that do wrote other values of the
                        // same commuting scope: their rows are not these
                        // rows, and no unique index can tell the order of
                        // the two apart. (A new row's value written before
                        // it, by an UPDATE or DELETE that then found no row
                        // or by an upsert, keeps its row in place.)
                        // The values these rows write: worked out only
                        // where the table was named before (most new rows
                        // go first without), or for `named` below.
                        let mut known = None;
                        let ahead = match named.iter().find(|(table, _)| *table == bulk.table()) {
                            None => true,
                            Some((_, None)) => false,
                            Some((_, Some(before))) => {
                                let new = known.insert(written(bulk, &rows, &commutes));
                                new.as_ref().is_some_and(|new| {
                                    new.comparable(before)
                                        && new.values.keys().all(|v| !before.values.contains_key(v))
                                })
                            }
                        };
                        // A rebuild's plain INSERT: all its rows new.
                        let new = !as_is
                            || (self.fresh.is_some()
                                && matches!(bulk.effect, crate::bulk::Effect::Insert));
                        if let (Some(copy), true, true) = (&bulk.copy, new, ahead)
                            && !ungathered
                                .iter()
                                .any(|write| write.shape.mentions(bulk.table()))
                        {
                            let statement = self.prepared_for(&copy.sql, span).await?;
                            let data = copied(copy, &rows, &overrides);
                            copies.push((statement, data, span));
                            continue;
                        }
                        let statement = self.prepared_for(sql, span).await?;
                        let mut columns: Vec<_> = bulk
                            .types
                            .iter()
                            .map(|element| crate::bulk::Column {
                                element: element.clone(),
                                items: Vec::with_capacity(rows.len()),
                            })
                            .collect();
                        // Row by row: each write's parameters are read
                        // together.
                        for row in &rows {
                            let value = row_values(&overrides, row);
                            for (k, column) in columns.iter_mut().enumerate() {
                                column.items.push(value(k));
                            }
                        }
                        let written = known.unwrap_or_else(|| written(bulk, &rows, &commutes));
                        name(&mut named, bulk.table(), written);
                        sends.push(Outgoing::Many(statement, columns, span));
                    }
                }
            }
        }
        type Param<'p> = &'p (dyn tokio_postgres::types::ToSql + Sync);
        let alone: Vec<Vec<Sent<'_>>> = sends
            .iter()
            .map(|send| match send {
                Outgoing::One(write) => (0..write.count)
                    .map(|k| Sent {
                        bytes: write.bytes(k),
                        format: write.encoded(k).format,
                    })
                    .collect(),
                Outgoing::Many(..) => Vec::new(),
            })
            .collect();
        let params: Vec<Vec<Param<'_>>> = sends
            .iter()
            .zip(&alone)
            .map(|(send, alone)| match send {
                Outgoing::One(_) => alone.iter().map(|p| p as Param<'_>).collect(),
                Outgoing::Many(_, columns, _) => columns.iter().map(|c| c as Param<'_>).collect(),
            })
            .collect();
        let mut sent: Vec<_> = sends
            .iter()
            .zip(&params)
            .map(|(send, params)| {
                let statement = match send {
                    Outgoing::One(write) => &write.statement,
                    Outgoing::Many(statement, _, _) => statement,
                };
                Box::pin(futures_util::future::maybe_done(
                    self.tx.execute(statement, params),
                ))
            })
            .collect();
        let mut copying: Vec<_> = copies
            .iter()
            .map(|(statement, data, _)| {
                Box::pin(futures_util::future::maybe_done(async move {
                    let sink = self.tx.copy_in::<_, bytes::Bytes>(statement).await?;
                    let mut sink = std::pin::pin!(sink);
                    futures_util::SinkExt::send(&mut sink, data.clone()).await?;
                    sink.as_mut().finish().await
                }))
            })
            .collect();
        observe_read();
        let mut read = std::pin::pin!(futures_util::future::maybe_done(read));
        // Each request goes out on its first poll: poll them once in order
        // (PostgreSQL runs them in the order received: the COPYs first, each
        // taking its data once the server asks for it, then the others), the
        // read last, then wait for all.
        {
            let mut cx = std::task::Context::from_waker(futures_util::task::noop_waker_ref());
            for copy in &mut copying {
                let _ = copy.as_mut().poll(&mut cx);
            }
            for write in &mut sent {
                let _ = write.as_mut().poll(&mut cx);
            }
            let _ = read.as_mut().poll(&mut cx);
        }
        futures_util::future::join(
            futures_util::future::join_all(copying.iter_mut()),
            futures_util::future::join_all(sent.iter_mut()),
        )
        .await;
        for ((_, _, span), done) in copies.iter().zip(&mut copying) {
            if let Some(Err(error)) = done.as_mut().take_output() {
                self.deferred().failed_at = Some(*span);
                // What was sent behind it fails too.
                return Err(error);
            }
        }
        for (send, done) in sends.iter().zip(&mut sent) {
            if let Some(Err(error)) = done.as_mut().take_output() {
                self.deferred().failed_at = Some(match send {
                    Outgoing::One(write) => (write.position, write.position),
                    Outgoing::Many(_, _, span) => *span,
                });
                // The read, sent behind it, fails too: its answer is dropped.
                return Err(error);
            }
        }
        read.as_mut().await;
        read.as_mut()
            .take_output()
            .expect("a finished read has its output")
    }

    /// `sql` prepared for gathered writes whose events span `span`, which
    /// are blamed when it cannot be.
    async fn prepared_for(
        &self,
        sql: &str,
        span: (u64, u64),
    ) -> Result<tokio_postgres::Statement, tokio_postgres::Error> {
        let prepared = self.tx.prepare_cached(sql).await;
        if prepared.is_err() {
            self.deferred().failed_at = Some(span);
        }
        prepared
    }

    /// The unique indexes of each table the scoped writes in `writes` name:
    /// per index its columns, `None` for one on an expression or an
    /// exclusion constraint. Read from the catalog once per table name and
    /// process (a read model's tables have the same indexes in every schema
    /// they are built in).
    async fn unique_indexes(
        &self,
        writes: &[Write],
    ) -> Result<FastMap<String, UniqueIndexes>, tokio_postgres::Error> {
        static KNOWN: std::sync::LazyLock<
            std::sync::Mutex<std::collections::HashMap<String, UniqueIndexes>>,
        > = std::sync::LazyLock::new(Default::default);
        let mut tables: Vec<&str> = writes
            .iter()
            .filter_map(|w| w.shape.bulk.as_ref())
            .filter(|bulk| bulk.scope.is_some())
            .map(|bulk| bulk.table())
            .collect();
        tables.sort_unstable();
        tables.dedup();
        let known = |table: &str| {
            KNOWN
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(table)
                .cloned()
        };
        let mut found = FastMap::default();
        for table in tables {
            let indexes = match known(table) {
                Some(indexes) => indexes,
                None => {
                    let rows = self
                        .tx
                        .query(
                            "SELECT ARRAY(SELECT a.attname::text FROM pg_attribute a \
                               WHERE a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey::int2[])), \
                               i.indexprs IS NULL AND NOT i.indisexclusion \
                             FROM (SELECT to_regclass($1) AS oid) t \
                             LEFT JOIN pg_index i ON i.indrelid = t.oid \
                               AND (i.indisunique OR i.indisexclusion) \
                             WHERE t.oid IS NOT NULL",
                            &[&table],
                        )
                        .await?;
                    // One row per index (one with NULLs when there is none);
                    // no row: no such table here (yet), so ask again later.
                    let indexes: UniqueIndexes = std::sync::Arc::new(
                        rows.iter()
                            .filter_map(|row| {
                                let plain: Option<bool> = row.get(1);
                                plain.map(|plain| plain.then(|| row.get(0)))
                            })
                            .collect(),
                    );
                    if !rows.is_empty() {
                        KNOWN
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(table.to_owned(), indexes.clone());
                    }
                    indexes
                }
            };
            found.insert(table.to_owned(), indexes);
        }
        Ok(found)
    }

    pub async fn commit(self) -> Result<(), tokio_postgres::Error> {
        self.flush().await?;
        self.tx.commit().await
    }

    /// Queues a write (see [`Tx`]). Its text is `'static` (a literal): the
    /// queue knows it by where it lies.
    pub async fn execute(
        &self,
        sql: &'static str,
        params: Params<'_>,
    ) -> Result<(), tokio_postgres::Error> {
        let at = (sql.as_ptr() as usize, sql.len());
        let known = self.deferred().prepared.get(&at).cloned();
        let (statement, shape) = match known {
            Some(prepared) => prepared,
            None => {
                let statement = Box::pin(self.tx.prepare_cached(sql)).await?;
                let shape = crate::bulk::shape(sql, statement.params());
                self.deferred()
                    .prepared
                    .insert(at, (statement.clone(), shape.clone()));
                (statement, shape)
            }
        };
        let queued = {
            let mut deferred = self.deferred();
            match encode(&statement, params, &mut deferred.arena) {
                Some((data, binary)) => {
                    let position = deferred.applying;
                    deferred.writes.push(Write {
                        shape,
                        statement,
                        data,
                        binary,
                        count: params.len(),
                        position,
                    });
                    let limit = if self.cache.is_some() {
                        REBUILD_PIPELINE
                    } else {
                        PIPELINE
                    };
                    Ok(deferred.writes.len() >= limit)
                }
                None => Err(statement),
            }
        };
        let full = match queued {
            Ok(full) => full,
            Err(statement) => {
                // Not encodable as given: run it now, and let tokio-postgres
                // report why.
                self.flush().await?;
                self.observe(sql, statement.params());
                return Box::pin(self.tx.execute(&statement, params))
                    .await
                    .map(|_| ());
            }
        };
        if full {
            self.flush().await?;
        }
        Ok(())
    }

    /// Runs SQL text without parameters (after the queued writes).
    pub async fn batch_execute(&self, sql: &str) -> Result<(), tokio_postgres::Error> {
        self.flush().await?;
        self.observe(sql, &[]);
        self.tx.batch_execute(sql).await
    }

    /// Reads, behind the queued writes (sent with them, in one round trip).
    pub async fn query(
        &self,
        sql: &str,
        params: Params<'_>,
    ) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
        let statement = Box::pin(self.tx.prepare_cached(sql)).await?;
        let shape = self
            .fresh
            .map(|_| crate::bulk::shape(sql, statement.params()));
        Box::pin(self.flush_then(self.tx.query(&statement, params), shape.as_deref())).await
    }

    /// Reads, behind the queued writes (sent with them, in one round trip).
    pub async fn query_opt(
        &self,
        sql: &str,
        params: Params<'_>,
    ) -> Result<Option<tokio_postgres::Row>, tokio_postgres::Error> {
        let statement = Box::pin(self.tx.prepare_cached(sql)).await?;
        let shape = self
            .fresh
            .map(|_| crate::bulk::shape(sql, statement.params()));
        Box::pin(self.flush_then(self.tx.query_opt(&statement, params), shape.as_deref())).await
    }

    /// Reads, behind the queued writes (sent with them, in one round trip).
    pub async fn query_one(
        &self,
        sql: &str,
        params: Params<'_>,
    ) -> Result<tokio_postgres::Row, tokio_postgres::Error> {
        let statement = Box::pin(self.tx.prepare_cached(sql)).await?;
        let shape = self
            .fresh
            .map(|_| crate::bulk::shape(sql, statement.params()));
        Box::pin(self.flush_then(self.tx.query_one(&statement, params), shape.as_deref())).await
    }
}

/// `params` encoded for `statement`'s parameter types into `arena`: where
/// each lies (`HEAD` bytes each), then their bytes (see [`Write::data`]),
/// and whether all are in binary format; `None` when they do not fit (wrong
/// count or type).
fn encode(
    statement: &tokio_postgres::Statement,
    params: Params<'_>,
    arena: &mut bytes::BytesMut,
) -> Option<(bytes::Bytes, bool)> {
    if params.len() != statement.params().len() {
        return None;
    }
    if arena.capacity() < ARENA / 16 {
        arena.reserve(ARENA);
    }
    // The arena is empty here: the write's bytes are split off whole.
    arena.resize(params.len() * HEAD, 0);
    let mut binary = true;
    for (k, (param, ty)) in params.iter().zip(statement.params()).enumerate() {
        let before = arena.len();
        let len = match param.to_sql_checked(ty, arena) {
            Ok(tokio_postgres::types::IsNull::No) => i32::try_from(arena.len() - before).ok(),
            Ok(tokio_postgres::types::IsNull::Yes) => {
                arena.truncate(before);
                Some(-1)
            }
            Err(_) => None,
        };
        let (Some(len), Ok(at)) = (len, u32::try_from(before)) else {
            arena.clear();
            return None;
        };
        let format = param.encode_format(ty);
        binary &= matches!(format, tokio_postgres::types::Format::Binary);
        let head = &mut arena[k * HEAD..(k + 1) * HEAD];
        head[..4].copy_from_slice(&at.to_le_bytes());
        head[4..8].copy_from_slice(&len.to_le_bytes());
        head[8] = u8::from(matches!(format, tokio_postgres::types::Format::Binary));
    }
    Some((arena.split().freeze(), binary))
}

pub type ApplyFuture<'a> = Pin<Box<dyn Future<Output = Result<(), ApplyError>> + Send + 'a>>;

/// The three naming methods of a [`Projection`]: `projection_names!(NAME,
/// SCHEMA, ["table", ...])` inside its `impl`.
#[macro_export]
macro_rules! projection_names {
    ($name:expr, $schema:expr, [$($table:expr),+ $(,)?]) => {
        fn name(&self) -> &'static str {
            $name
        }

        fn schema(&self) -> &'static str {
            $schema
        }

        fn tables(&self) -> &'static [&'static str] {
            &[$($table),+]
        }
    };
}

/// One read model.
pub trait Projection: Send + Sync + 'static {
    /// Stable name: status row, durable consumer, `crm projector NAME`.
    fn name(&self) -> &'static str;
    /// Idempotent DDL of its tables, unqualified (a rebuild runs it in a
    /// schema of its own).
    fn schema(&self) -> &'static str;
    /// Its tables, swapped as a whole by a rebuild.
    fn tables(&self) -> &'static [&'static str];
    /// Whether `crm projections rebuild` may replay it: not for process
    /// managers, whose effect is the commands they sent.
    fn rebuildable(&self) -> bool {
        true
    }
    /// Its secondary indexes that no statement of `apply` can use (only
    /// queries and the scheduler read by them). A rebuild creates these
    /// once its tables are full, in one sorted pass each, instead of
    /// keeping them up to date row by row; an index `apply` relies on must
    /// not be named here, or each statement using it scans its table while
    /// the rebuild runs.
    fn query_indexes(&self) -> &'static [&'static str] {
        &[]
    }
    /// Its primary keys (constraint names) that only live writes use: an
    /// `ON CONFLICT ... DO NOTHING` against an event applied twice. In a
    /// rebuild ([`Tx::in_rebuild`]) `apply` writes those tables
    /// with plain INSERTs, which a rebuild sends by COPY; it adds these keys
    /// once its tables are full, in one sorted pass each (which also fails
    /// the rebuild if a row was written twice), instead of keeping them up
    /// to date row by row.
    fn rebuild_keys(&self) -> &'static [&'static str] {
        &[]
    }
    /// The stream types whose events may change its tables (empty: every
    /// type). Its projector has a JetStream consumer per type, filtered by
    /// subject, so the others' events never reach it; it learns from the
    /// store how far they move its position.
    fn stream_types(&self) -> &'static [&'static str] {
        &[]
    }
    /// When it reads only one event type of `stream_type` (one of
    /// [`Self::stream_types`]), that type: its consumer of that stream type
    /// is filtered by it too.
    fn only_event_type(&self, _stream_type: &str) -> Option<&'static str> {
        None
    }
    /// Whether events of `stream_type` and `event_type` may change its
    /// tables: by default, whether the stream type is one of
    /// [`Self::stream_types`] and the event type the one
    /// [`Self::only_event_type`] names, if any; an override may only narrow
    /// that. Events it does not handle move its position without a
    /// transaction (flushed to the status row now and then).
    fn handles(&self, stream_type: &str, event_type: &str) -> bool {
        self.reads(stream_type, event_type)
    }
    /// Whether its consumers deliver events of `stream_type` and
    /// `event_type` ([`Self::stream_types`], [`Self::only_event_type`]); not
    /// to be overridden.
    fn reads(&self, stream_type: &str, event_type: &str) -> bool {
        let types = self.stream_types();
        (types.is_empty() || types.contains(&stream_type))
            && self
                .only_event_type(stream_type)
                .is_none_or(|only| only == event_type)
    }
    /// Applies one event inside the batch's transaction. Events it does not
    /// use are ignored (`Ok`). A projection that hands each kind of stream
    /// to its own async fn boxes that fn's future in each arm of its
    /// `match`: one async block around the whole `match` is as large as
    /// its largest arm, and is copied whole into its box at every event.
    fn apply<'a>(&'a self, tx: &'a Tx<'_>, event: &'a RecordedEvent) -> ApplyFuture<'a>;
    /// Called by the live projector once per batch, in its transaction,
    /// before it applies anything, with the batch's events that it handles
    /// (in log order; possibly none), so that a projection can read what
    /// they need in one query instead of one per event. Events read from the
    /// store to catch up first are not among them, and a rebuild never calls
    /// it: `apply` must be right without it. An error fails the batch, which
    /// is tried again.
    fn read_ahead<'a>(
        &'a self,
        _tx: &'a Tx<'_>,
        _events: &'a [&'a RecordedEvent],
    ) -> ApplyFuture<'a> {
        Box::pin(async { Ok(()) })
    }
}

/// How a projector reads. Defaults suit `crm all`.
#[derive(Clone, Debug)]
pub struct ProjectorOptions {
    /// The relay's JetStream stream and subject prefix.
    pub stream: String,
    pub subject_prefix: String,
    /// Most messages per batch (one transaction).
    pub batch: usize,
    /// How long one fetch waits for messages.
    pub fetch_wait: Duration,
    /// How long a position of the projection's stream types that its
    /// consumer has not delivered yet (nor passed) is waited for before it,
    /// and everything else missing up to the log's head, is read from the
    /// store.
    pub tail_refill_after: Duration,
    /// Most events read from the store per transaction when refilling.
    pub refill_chunk: u64,
    /// How long a batch waits for more messages after its first.
    pub linger: Duration,
    /// Longest wait between attempts when NATS or PostgreSQL fails.
    pub max_backoff: Duration,
}

impl Default for ProjectorOptions {
    fn default() -> Self {
        Self {
            stream: "CRM_EVENTS".into(),
            subject_prefix: "crm.v1".into(),
            batch: 500,
            fetch_wait: Duration::from_millis(500),
            tail_refill_after: Duration::from_secs(2),
            refill_chunk: 5_000,
            linger: Duration::from_millis(5),
            max_backoff: Duration::from_secs(5),
        }
    }
}

/// A projection's row in `projections`, for `crm projections status`.
#[derive(Clone, Debug, PartialEq)]
pub struct ProjectionStatus {
    pub name: String,
    pub position: u64,
    pub state: String,
    pub last_error: Option<String>,
    pub error_position: Option<u64>,
    pub holes_refilled: u64,
    /// Events in the log not applied yet.
    pub lag_events: u64,
    /// Age of the oldest event not applied yet, in seconds (0 when caught up).
    pub lag_seconds: f64,
}

#[derive(Debug, thiserror::Error)]
enum RunError {
    #[error("NATS: {0}")]
    Nats(String),
    #[error("PostgreSQL: {}", described(.0))]
    Postgres(#[from] tokio_postgres::Error),
    #[error("no PostgreSQL connection: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("event store: {0}")]
    Read(#[from] crm_event_store::ReadError),
    #[error("event at position {position} cannot be applied: {error}")]
    Poison { position: u64, error: String },
    #[error("event at position {position}: {error}; retrying")]
    Transient { position: u64, error: String },
}

fn nats(error: impl std::fmt::Display) -> RunError {
    RunError::Nats(error.to_string())
}

/// A projector's OpenTelemetry instruments (meter `crm.projections`), each
/// with the attribute `projection`. Without a meter provider (no
/// `OTEL_EXPORTER_OTLP_ENDPOINT`) they cost nothing.
struct Metrics {
    attributes: [opentelemetry::KeyValue; 1],
    /// `crm.projection.events`: events of the projection applied (from NATS
    /// or refilled from the store; redeliveries and events it does not
    /// handle not counted).
    events: opentelemetry::metrics::Counter<u64>,
    /// `crm.projection.batches`: transactions committed.
    batches: opentelemetry::metrics::Counter<u64>,
    /// `crm.projection.holes_refilled`: events read from the store because
    /// the delivery skipped them.
    holes: opentelemetry::metrics::Counter<u64>,
    /// `crm.projection.poison`: stops on an event it cannot apply.
    poison: opentelemetry::metrics::Counter<u64>,
    /// `crm.projection.position`: the global position applied.
    position: opentelemetry::metrics::Gauge<u64>,
}

impl Metrics {
    fn new(projection: &'static str) -> Self {
        let meter = opentelemetry::global::meter("crm.projections");
        Self {
            attributes: [opentelemetry::KeyValue::new("projection", projection)],
            events: meter
                .u64_counter("crm.projection.events")
                .with_description("Events applied to the read model")
                .build(),
            batches: meter
                .u64_counter("crm.projection.batches")
                .with_description("Projection transactions committed")
                .build(),
            holes: meter
                .u64_counter("crm.projection.holes_refilled")
                .with_description(
                    "Events refilled from the event store after a hole in the delivery",
                )
                .build(),
            poison: meter
                .u64_counter("crm.projection.poison")
                .with_description("Stops on an event the projection cannot apply")
                .build(),
            position: meter
                .u64_gauge("crm.projection.position")
                .with_description("Global position applied")
                .build(),
        }
    }
}

/// What one message from the stream brings: an event to apply, or only the
/// position of one the projection does not handle (passed over undecoded).
/// Not boxed: the events of a batch are moved in and out once each, and a
/// box would cost an allocation per event.
#[derive(Clone)]
#[allow(clippy::large_enum_variant)]
enum Delivered {
    Event(RecordedEvent),
    PassedOver(u64),
}

impl Delivered {
    fn position(&self) -> u64 {
        match self {
            Self::Event(event) => event.global_position,
            Self::PassedOver(position) => *position,
        }
    }
}

/// What a projector's session has received and not yet acknowledged.
struct Inbox {
    /// Received, not applied yet, by position.
    buffer: std::collections::BTreeMap<u64, Received>,
    /// Per consumer, the highest position it has delivered.
    seen: Vec<u64>,
    /// Per consumer, its latest applied message (with its position): with
    /// AckPolicy::All, acknowledging it acknowledges all before it.
    ackable: Vec<Option<(u64, jetstream::Message)>>,
    /// Messages applied since the last acknowledgement.
    unacked: usize,
    acked_at: tokio::time::Instant,
    /// The first position expected and not received, and since when.
    waiting: Option<(u64, tokio::time::Instant)>,
    /// Once a wait runs out, every position expected and not received up to
    /// here is read from the store without another wait.
    refill_through: u64,
    /// Positions whose message did not decode: read from the store (where
    /// a poison event stops the projection once everything before it is
    /// committed).
    undecodable: std::collections::BTreeSet<u64>,
}

/// One message received and not applied yet.
struct Received {
    delivered: Delivered,
    consumer: usize,
    /// Its stream sequence: what an acknowledgement covers.
    sequence: u64,
    message: jetstream::Message,
}

/// A message's stream sequence (its position when the reply subject does
/// not say).
fn sequence(message: &jetstream::Message, position: u64) -> u64 {
    message.info().map_or(position, |info| info.stream_sequence)
}

impl Inbox {
    fn new(consumers: usize) -> Self {
        Self {
            buffer: std::collections::BTreeMap::new(),
            seen: vec![0; consumers],
            ackable: (0..consumers).map(|_| None).collect(),
            unacked: 0,
            acked_at: tokio::time::Instant::now(),
            waiting: None,
            refill_through: 0,
            undecodable: std::collections::BTreeSet::new(),
        }
    }

    fn receive(
        &mut self,
        consumer: usize,
        delivered: Delivered,
        message: jetstream::Message,
        applied: u64,
    ) {
        let position = delivered.position();
        let sequence = sequence(&message, position);
        self.seen[consumer] = self.seen[consumer].max(position);
        if position <= applied || self.buffer.contains_key(&position) {
            // A redelivery, or a duplicate: the first copy stays.
            self.applied(consumer, sequence, message);
        } else {
            self.buffer.insert(
                position,
                Received {
                    delivered,
                    consumer,
                    sequence,
                    message,
                },
            );
        }
    }

    /// A message of `consumer` at `position` that does not decode: passed,
    /// so its event is read from the store.
    fn undecodable(&mut self, consumer: usize, position: u64) {
        self.seen[consumer] = self.seen[consumer].max(position);
        self.undecodable.insert(position);
    }

    /// The highest position received, decoded or not.
    fn last(&self) -> Option<u64> {
        let buffered = self.buffer.last_key_value().map(|(p, _)| *p);
        let undecodable = self.undecodable.last().copied();
        buffered.max(undecodable)
    }

    fn applied(&mut self, consumer: usize, sequence: u64, message: jetstream::Message) {
        self.unacked += 1;
        if self.ackable[consumer]
            .as_ref()
            .is_none_or(|(last, _)| *last < sequence)
        {
            self.ackable[consumer] = Some((sequence, message));
        }
    }

    /// Drops what was received at or before `position` (applied already).
    fn drop_applied(&mut self, position: u64) {
        self.undecodable = self.undecodable.split_off(&(position + 1));
        if self.waiting.is_some_and(|(at, _)| at <= position) {
            self.waiting = None;
        }
        if self
            .buffer
            .first_key_value()
            .is_some_and(|(first, _)| *first <= position)
        {
            drop(self.take(position));
        }
    }

    /// Takes what was received up to `up_to`, in order, to be applied.
    fn take(&mut self, up_to: u64) -> Vec<Delivered> {
        let rest = self.buffer.split_off(&(up_to + 1));
        let taken = std::mem::replace(&mut self.buffer, rest);
        taken
            .into_values()
            .map(|received| {
                self.applied(received.consumer, received.sequence, received.message);
                received.delivered
            })
            .collect()
    }

    /// Acknowledges every applied message, but (AckPolicy::All covering
    /// every lower stream sequence) none above a message still waiting:
    /// that one waits with it.
    async fn ack_all(&mut self) -> Result<(), RunError> {
        let mut lowest = vec![u64::MAX; self.ackable.len()];
        for received in self.buffer.values() {
            let low = &mut lowest[received.consumer];
            *low = (*low).min(received.sequence);
        }
        for (slot, lowest) in self.ackable.iter_mut().zip(lowest) {
            if slot
                .as_ref()
                .is_some_and(|(sequence, _)| *sequence < lowest)
                && let Some((_, message)) = slot.take()
            {
                message.ack().await.map_err(nats)?;
            }
        }
        self.unacked = 0;
        self.acked_at = tokio::time::Instant::now();
        Ok(())
    }
}

/// A running projector's applied position, for a query that waits until
/// it reaches the caller's `min_position`.
#[derive(Clone)]
pub struct Applied {
    position: watch::Receiver<u64>,
    wanted: Arc<watch::Sender<u64>>,
}

impl Applied {
    /// The position applied now.
    pub fn now(&self) -> u64 {
        *self.position.borrow()
    }

    /// Tells the projector a query waits for `min_position`: each wait
    /// for a position not applied yet is heard, even one below an earlier
    /// wait's (which may lie beyond the log's head and never be reached).
    pub fn want(&self, min_position: u64) {
        if *self.position.borrow() < min_position {
            self.wanted
                .send_modify(|wanted| *wanted = (*wanted).max(min_position));
        }
    }

    /// Waits until `min_position` is applied; returns the position then.
    /// The projector hears of the wait, so that one whose consumers deliver
    /// nothing up to there (events of other stream types) looks at the log
    /// at once.
    pub async fn reached(&mut self, min_position: u64) -> u64 {
        self.want(min_position);
        let reached = self
            .position
            .wait_for(|p| *p >= min_position)
            .await
            .map(|position| *position);
        match reached {
            Ok(position) => position,
            // The projector is gone: the position stays where it is.
            Err(_) => std::future::pending().await,
        }
    }
}

/// Runs one projection until shutdown, or until a poison event stops it.
pub struct Projector {
    projection: Arc<dyn Projection>,
    store: EventStore,
    pool: Pool,
    nats_url: String,
    options: ProjectorOptions,
    position: watch::Sender<u64>,
    /// How far batches of events the projection does not handle have moved
    /// it without a transaction; written to the status row by
    /// [`Self::flush_skipped`].
    skipped_to: std::sync::atomic::AtomicU64,
    flushed_to: std::sync::atomic::AtomicU64,
    flushed_at: std::sync::Mutex<tokio::time::Instant>,
    /// The highest position a query waits for: the projector looks at the
    /// log's head at once rather than at its next [`ADVANCE_EVERY`].
    wanted: Arc<watch::Sender<u64>>,
    metrics: Metrics,
}

/// Longest a projector holds back the acknowledgement of messages it has
/// applied, and most messages it holds it back for: one acknowledgement per
/// message would cost every consumer a publish per event.
const ACK_EVERY: Duration = Duration::from_millis(100);
const ACK_AFTER: usize = 1_000;

/// How often positions moved past unhandled events reach the status row.
const FLUSH_SKIPPED_EVERY: Duration = Duration::from_millis(250);

/// How often an idle projector reads the log's head, to move past the
/// events its consumers do not deliver (and to find holes at the tail).
const ADVANCE_EVERY: Duration = FLUSH_SKIPPED_EVERY;

impl Projector {
    pub fn new(
        projection: Arc<dyn Projection>,
        store: EventStore,
        pool: Pool,
        nats_url: String,
        options: ProjectorOptions,
    ) -> Self {
        Self {
            metrics: Metrics::new(projection.name()),
            projection,
            store,
            pool,
            nats_url,
            options,
            position: watch::Sender::new(0),
            skipped_to: std::sync::atomic::AtomicU64::new(0),
            flushed_to: std::sync::atomic::AtomicU64::new(0),
            flushed_at: std::sync::Mutex::new(tokio::time::Instant::now()),
            wanted: Arc::new(watch::Sender::new(0)),
        }
    }

    /// Moves to `position` without a transaction: nothing up to it is the
    /// projection's.
    fn skip_to(&self, position: u64) {
        self.skipped_to
            .fetch_max(position, std::sync::atomic::Ordering::SeqCst);
        self.position.send_replace(position);
    }

    /// Writes the position moved past unhandled events to the status row,
    /// at most every [`FLUSH_SKIPPED_EVERY`] unless `now`.
    async fn flush_skipped(&self, now: bool) -> Result<(), RunError> {
        let skipped = self.skipped_to.load(std::sync::atomic::Ordering::SeqCst);
        if skipped <= self.flushed_to.load(std::sync::atomic::Ordering::SeqCst) {
            return Ok(());
        }
        {
            let mut flushed_at = self
                .flushed_at
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if !now && flushed_at.elapsed() < FLUSH_SKIPPED_EVERY {
                return Ok(());
            }
            *flushed_at = tokio::time::Instant::now();
        }
        let client = self.pool.get().await?;
        let statement = client
            .prepare_cached(
                "UPDATE projections SET position = greatest(position, $2), updated_at = now() \
                 WHERE name = $1",
            )
            .await?;
        client
            .execute(
                &statement,
                &[
                    &self.projection.name(),
                    &i64::try_from(skipped).unwrap_or(i64::MAX),
                ],
            )
            .await?;
        self.flushed_to
            .fetch_max(skipped, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// The position applied so far, as it moves.
    pub fn position(&self) -> watch::Receiver<u64> {
        self.position.subscribe()
    }

    /// The position applied so far, for queries that wait for one.
    pub fn applied(&self) -> Applied {
        Applied {
            position: self.position.subscribe(),
            wanted: self.wanted.clone(),
        }
    }

    /// Runs until `shutdown`. Transient failures (NATS, PostgreSQL) are
    /// retried with backoff; a poison event is recorded and ends the run.
    pub async fn run(self, shutdown: CancellationToken) {
        let name = self.projection.name();
        let span = tracing::info_span!("projector", projection = name);
        async {
            let mut delay = Duration::from_millis(100);
            loop {
                let before = *self.position.borrow();
                let error = match self.session(&shutdown).await {
                    Ok(()) => return,
                    Err(error) => error,
                };
                if let RunError::Poison { position, error } = &error {
                    self.metrics.poison.add(1, &self.metrics.attributes);
                    tracing::error!(position, %error, "projection stopped on an event it cannot apply; fix and restart");
                    if let Err(status_error) = self.record_failure(*position, error).await {
                        tracing::error!(%status_error, "could not record the failure");
                    }
                    return;
                }
                if *self.position.borrow() > before {
                    delay = Duration::from_millis(100);
                }
                tracing::warn!(%error, retry_in_ms = delay.as_millis() as u64, "projector failed; retrying");
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(self.options.max_backoff);
            }
        }
        .instrument(span)
        .await;
    }

    async fn session(&self, shutdown: &CancellationToken) -> Result<(), RunError> {
        let name = self.projection.name();
        let start = self.prepare().await?;
        // Never back: batches skipped before a restart stay skipped (the
        // events come again and are recognised as applied).
        self.position
            .send_replace(start.max(self.skipped_to.load(std::sync::atomic::Ordering::SeqCst)));
        let client = async_nats::ConnectOptions::new()
            .name(format!("crm-projector-{name}"))
            .connection_timeout(Duration::from_secs(5))
            .connect(self.nats_url.as_str())
            .await
            .map_err(nats)?;
        let js = jetstream::new(client);
        let stream = js.get_stream(&self.options.stream).await.map_err(nats)?;
        let consumers = self.consumers();
        self.drop_stale_consumers(&stream, &consumers).await;
        let mut merged = futures_util::stream::SelectAll::new();
        for (index, (durable, filter)) in consumers.iter().enumerate() {
            let consumer = stream
                .get_or_create_consumer(
                    durable,
                    consumer::pull::Config {
                        durable_name: Some(durable.clone()),
                        description: Some(format!("read model {name}: {filter}")),
                        ack_policy: consumer::AckPolicy::All,
                        // Stream sequence n holds position n (ADR 0005); a
                        // mismatch only means duplicates (skipped) or holes
                        // (refilled).
                        deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                            start_sequence: start + 1,
                        },
                        filter_subject: filter.clone(),
                        ack_wait: Duration::from_secs(30),
                        max_ack_pending: 20_000,
                        ..Default::default()
                    },
                )
                .await
                .map_err(nats)?;
            // One continuous pull each (the client re-pulls and heartbeats): a
            // message arrives as soon as it is published, and whatever else is
            // already there joins its batch. (`fetch` would answer at once
            // when nothing is there, turning an idle projector into a busy
            // loop.)
            let messages = consumer
                .stream()
                .max_messages_per_batch(self.options.batch)
                .messages()
                .await
                .map_err(nats)?;
            // A stream that ends would leave the merge quietly: end the
            // session instead.
            let ended = futures_util::stream::once(async move {
                (index, Err("a consumer's message stream ended".to_owned()))
            });
            merged.push(
                messages
                    .map(move |message| (index, message.map_err(|e| e.to_string())))
                    .chain(ended)
                    .boxed(),
            );
        }
        let mut inbox = Inbox::new(consumers.len());
        let mut wanted = self.wanted.subscribe();
        let mut checked_at = tokio::time::Instant::now();
        // A query may have waited before this session began.
        let mut demanded = *wanted.borrow_and_update() > *self.position.borrow();
        loop {
            let busy = inbox.unacked > 0 || inbox.waiting.is_some() || !inbox.buffer.is_empty();
            let wait = if busy {
                self.options.fetch_wait.min(ACK_EVERY)
            } else {
                self.options.fetch_wait
            }
            .min(ADVANCE_EVERY);
            let mut messages = Vec::new();
            tokio::select! {
                () = shutdown.cancelled() => {
                    inbox.ack_all().await?;
                    self.flush_skipped(true).await?;
                    return Ok(());
                }
                Ok(()) = wanted.changed() => demanded = true,
                next = tokio::time::timeout(wait, merged.next()) => match next {
                    Ok(Some((index, message))) => messages.push((index, message.map_err(RunError::Nats)?)),
                    Ok(None) => return Err(RunError::Nats("the consumer's stream ended".into())),
                    // quiet: acknowledge what was applied
                    Err(_) => inbox.ack_all().await?,
                },
            }
            // Let a burst gather (`linger`), so busy logs apply in batches
            // rather than a transaction per event.
            let gather_until = tokio::time::Instant::now() + self.options.linger;
            while !messages.is_empty() && messages.len() < self.options.batch && !demanded {
                let next = match merged.next().now_or_never() {
                    Some(next) => next,
                    None => tokio::select! {
                        next = tokio::time::timeout_at(gather_until, merged.next()) => match next {
                            Ok(next) => next,
                            Err(_) => break,
                        },
                        // A query waits: apply what is here now.
                        Ok(()) = wanted.changed() => {
                            demanded = true;
                            break;
                        }
                    },
                };
                match next {
                    Some((index, message)) => {
                        messages.push((index, message.map_err(RunError::Nats)?))
                    }
                    None => break,
                }
            }
            for (index, message) in messages {
                let applied = *self.position.borrow();
                match self.receive(&message) {
                    Ok(delivered) => inbox.receive(index, delivered, message, applied),
                    Err(RunError::Poison { position, error }) if position > 0 => {
                        tracing::warn!(position, %error, "a message does not decode; reading its event from the store");
                        if position > applied {
                            inbox.undecodable(index, position);
                        }
                    }
                    Err(error) => return Err(error),
                }
            }
            // How far to look: up to the last event received; up to the
            // log's head now and then when nothing was received, and at once
            // when a query waits for a position not applied yet.
            let position = *self.position.borrow();
            let wants = std::mem::take(&mut demanded) && *wanted.borrow() > position;
            let last = inbox.last();
            let bound = if wants || (last.is_none() && checked_at.elapsed() >= ADVANCE_EVERY) {
                checked_at = tokio::time::Instant::now();
                let head = self.store.head().await?;
                last.max((head > position).then_some(head))
            } else {
                last
            };
            if let Some(bound) = bound {
                self.settle(bound, &mut inbox).await?;
            }
            if inbox.unacked >= ACK_AFTER
                || (inbox.unacked > 0 && inbox.acked_at.elapsed() >= ACK_EVERY)
            {
                inbox.ack_all().await?;
            }
            self.flush_skipped(false).await?;
        }
    }

    /// Deletes this projection's durable consumers that `consumers` no
    /// longer names (an earlier version's: unfiltered, or of a stream type
    /// or event type it no longer reads), which would only hold messages
    /// back on the server. Best effort: one left is deleted next time.
    async fn drop_stale_consumers(
        &self,
        stream: &jetstream::stream::Stream,
        consumers: &[(String, String)],
    ) {
        let name = self.projection.name();
        let (whole, typed) = (format!("projection_{name}"), format!("projection_{name}__"));
        let mut names = stream.consumer_names();
        let mut stale = Vec::new();
        while let Some(Ok(durable)) = names.next().await {
            if (durable == whole || durable.starts_with(&typed))
                && !consumers.iter().any(|(current, _)| *current == durable)
            {
                stale.push(durable);
            }
        }
        for durable in stale {
            match stream.delete_consumer(&durable).await {
                Ok(_) => tracing::info!(consumer = %durable, "deleted a consumer no longer read"),
                Err(error) => {
                    tracing::warn!(consumer = %durable, %error, "a stale consumer was not deleted");
                }
            }
        }
    }

    /// The projector's consumers: durable name and subject filter. One per
    /// stream type it reads, or one for the whole stream.
    fn consumers(&self) -> Vec<(String, String)> {
        let name = self.projection.name();
        let prefix = &self.options.subject_prefix;
        match self.projection.stream_types() {
            [] => vec![(format!("projection_{name}"), format!("{prefix}.>"))],
            // <prefix>.<tenant>.<stream type>.<stream id>.<event type>
            types => types
                .iter()
                .map(|t| match self.projection.only_event_type(t) {
                    Some(e) => (
                        format!("projection_{name}__{t}__{e}"),
                        format!("{prefix}.*.{t}.*.{e}"),
                    ),
                    None => (
                        format!("projection_{name}__{t}"),
                        format!("{prefix}.*.{t}.*.*"),
                    ),
                })
                .collect(),
        }
    }

    /// Which of the projector's consumers delivers events of `stream_type`.
    fn consumer_of(&self, stream_type: &str) -> usize {
        self.projection
            .stream_types()
            .iter()
            .position(|t| *t == stream_type)
            .unwrap_or(0)
    }

    /// Applies what has been received up to `bound`, in log order, as far
    /// as it is complete. What the projection must see in that range comes
    /// from the store: every position when it reads the whole stream, the
    /// positions of its stream types otherwise. One not received is a hole,
    /// refilled from the store, when its consumer has delivered a later
    /// message (each consumer delivers in log order); otherwise it may
    /// still be on its way (consumers run at their own pace), and
    /// everything from it on waits, for [`ProjectorOptions::tail_refill_after`]
    /// at most, before it too is refilled.
    async fn settle(&self, bound: u64, inbox: &mut Inbox) -> Result<(), RunError> {
        loop {
            let position = *self.position.borrow();
            inbox.drop_applied(position);
            if bound <= position {
                return Ok(());
            }
            let mut until = bound.min(position + self.options.refill_chunk.max(1));
            let types = self.projection.stream_types();
            let expected: Vec<(u64, usize)> = if types.is_empty() {
                (position + 1..=until).map(|p| (p, 0)).collect()
            } else {
                let only: Vec<&str> = types
                    .iter()
                    .map(|t| self.projection.only_event_type(t).unwrap_or(""))
                    .collect();
                let (head, found) = self
                    .store
                    .positions(position, until, types, &only, until - position)
                    .await?;
                // Nothing is passed beyond what the store has committed
                // (messages ahead of it: a store restored from a backup).
                until = until.min(head);
                if until <= position {
                    return Ok(());
                }
                found
                    .into_iter()
                    .map(|(p, stream_type)| (p, self.consumer_of(&stream_type)))
                    .collect()
            };
            let mut holes = Vec::new();
            let mut up_to = until;
            for (at, consumer) in expected {
                if inbox.buffer.contains_key(&at) {
                    continue;
                }
                let overtaken = inbox.seen[consumer] > at || inbox.undecodable.contains(&at);
                let waited_out = matches!(inbox.waiting, Some((waited, since))
                    if waited == at && since.elapsed() >= self.options.tail_refill_after);
                if waited_out {
                    // Everything missing up to here goes at once, not one
                    // wait per position.
                    inbox.refill_through = inbox.refill_through.max(bound);
                }
                if overtaken || at <= inbox.refill_through {
                    holes.push(at);
                    continue;
                }
                if !matches!(inbox.waiting, Some((waited, _)) if waited == at) {
                    inbox.waiting = Some((at, tokio::time::Instant::now()));
                }
                up_to = at - 1;
                break;
            }
            if up_to <= position {
                return Ok(()); // the next event is on its way
            }
            if inbox.waiting.is_some_and(|(at, _)| at <= up_to) {
                inbox.waiting = None;
            }
            let events = inbox.take(up_to);
            if holes.is_empty() && !events.iter().any(|e| self.handled(e).is_some()) {
                self.skip_to(up_to);
            } else {
                if !holes.is_empty() {
                    tracing::warn!(
                        holes = holes.len(),
                        first = holes[0],
                        "positions missing from the delivery; reading them from the store"
                    );
                }
                self.apply_batch(events, holes, up_to).await?;
            }
            if up_to >= bound {
                return Ok(());
            }
        }
    }

    /// What a message brings. One the projection does not handle (by its
    /// subject) is not decoded, only its position kept: with many
    /// projections on one stream, most messages are passed over this way.
    fn receive(&self, message: &jetstream::Message) -> Result<Delivered, RunError> {
        if let Some((stream_type, event_type)) = crm_wire::cloudevents::kind(&message.subject)
            && !self.takes(stream_type, event_type)
            && let Some(position) = crm_wire::cloudevents::position(message.headers.as_ref())
        {
            return Ok(Delivered::PassedOver(position));
        }
        crm_wire::cloudevents::decode(message.headers.as_ref(), &message.payload)
            .map(Delivered::Event)
            .map_err(|e| RunError::Poison {
                position: e.position,
                error: e.to_string(),
            })
    }

    /// The event `delivered` brings, when the projection handles it.
    fn handled<'e>(&self, delivered: &'e Delivered) -> Option<&'e RecordedEvent> {
        match delivered {
            Delivered::Event(event) if self.handles(event) => Some(event),
            _ => None,
        }
    }

    fn handles(&self, event: &RecordedEvent) -> bool {
        self.takes(&event.stream_type, &event.event_type)
    }

    /// [`Projection::handles`], within [`Projection::stream_types`] and
    /// [`Projection::only_event_type`].
    fn takes(&self, stream_type: &str, event_type: &str) -> bool {
        self.projection.reads(stream_type, event_type)
            && self.projection.handles(stream_type, event_type)
    }

    /// Creates the tables and the status row, marks the projection running;
    /// returns the applied position.
    async fn prepare(&self) -> Result<u64, RunError> {
        let name = self.projection.name();
        let client = self.pool.get().await?;
        ensure_schema(&client, self.projection.as_ref()).await?;
        client
            .execute(
                "UPDATE projections SET state = 'running', last_error = NULL, \
                 error_position = NULL WHERE name = $1",
                &[&name],
            )
            .await?;
        Ok(applied_position(&client, name).await?)
    }

    /// [`Self::apply_once`], and when an event cannot be applied, commits
    /// everything before it first, so the status shows exactly where it
    /// stopped.
    async fn apply_batch(
        &self,
        events: Vec<Delivered>,
        holes: Vec<u64>,
        up_to: u64,
    ) -> Result<(), RunError> {
        match self.apply_once(events.clone(), holes.clone(), up_to).await {
            Err(RunError::Poison { position, error }) => {
                let before: Vec<_> = events
                    .into_iter()
                    .filter(|e| e.position() < position)
                    .collect();
                let holes = holes.into_iter().filter(|h| *h < position).collect();
                if position > 1 {
                    self.apply_once(before, holes, position - 1).await?;
                }
                Err(RunError::Poison { position, error })
            }
            other => other,
        }
    }

    /// Applies `events` (received, in order) and the events at `holes`
    /// (read from the store) in one transaction, in log order, and moves
    /// the position to `up_to`: nothing else up to there is the
    /// projection's.
    async fn apply_once(
        &self,
        events: Vec<Delivered>,
        holes: Vec<u64>,
        up_to: u64,
    ) -> Result<(), RunError> {
        let name = self.projection.name();
        let span = tracing::info_span!(
            "projection_batch",
            projection = name,
            events = events.len(),
            holes = holes.len(),
            up_to
        );
        async {
            let mut client = self.pool.get().await?;
            let tx = Tx::deferring(client.transaction().await?);
            // The row lock also keeps two instances of one projection apart.
            let stored: u64 = tx
                .query_one(
                    "SELECT position FROM projections WHERE name = $1 FOR UPDATE",
                    &[&name],
                )
                .await?
                .get::<_, i64>(0)
                .try_into()
                .unwrap_or(0);
            // Batches it did not handle may have moved it on already, unless
            // the status row was moved back from outside (a reset to replay):
            // then that is where it stands, and everything from there to
            // where the batch starts is read from the store.
            use std::sync::atomic::Ordering::SeqCst;
            let mut position = if stored < self.flushed_to.load(SeqCst) {
                self.skipped_to.store(stored, SeqCst);
                self.flushed_to.store(stored, SeqCst);
                stored
            } else {
                stored.max(self.skipped_to.load(SeqCst))
            };
            let mut applied = 0u64;
            let base = (*self.position.borrow()).min(up_to);
            // Caught up to `base` first (from the store), then the batch.
            let floor = position.max(base);
            let holes: Vec<u64> = holes.into_iter().filter(|h| *h > floor).collect();
            let mut all = events;
            all.extend(self.fetch(&holes).await?.into_iter().map(Delivered::Event));
            all.sort_by_key(Delivered::position);
            // Announced before anything is applied, even when empty (so
            // nothing read ahead for an earlier batch lingers).
            let ahead: Vec<&RecordedEvent> = all
                .iter()
                .filter(|delivered| delivered.position() > floor)
                .filter_map(|delivered| self.handled(delivered))
                .collect();
            self.projection
                .read_ahead(&tx, &ahead)
                .await
                .map_err(|error| RunError::Transient {
                    position: floor + 1,
                    error: error.to_string(),
                })?;
            drop(ahead);
            let mut refilled = self.refill(&tx, &mut position, base, &mut applied).await?;
            refilled += holes.len() as u64;
            for delivered in &all {
                if delivered.position() <= position {
                    continue; // applied before: redelivery
                }
                if let Some(event) = self.handled(delivered) {
                    self.apply_one(&tx, event).await?;
                    applied += 1;
                }
                position = delivered.position();
            }
            position = position.max(up_to);
            // The batch's last deferred writes: one PostgreSQL refuses is its
            // event's poison, like a write refused at once; a lost connection
            // is retried.
            if let Err(error) = tx.flush().await {
                if error.as_db_error().is_none() {
                    return Err(RunError::Postgres(error));
                }
                let (position, error) = tx.blame(position, ApplyError::Database(error));
                return Err(RunError::Poison { position, error });
            }
            let stored = i64::try_from(position).unwrap_or(i64::MAX);
            tx.execute(
                "UPDATE projections SET position = $2, holes_refilled = holes_refilled + $3, \
                 updated_at = now() WHERE name = $1",
                &[&name, &stored, &(refilled as i64)],
            )
            .await?;
            tx.commit().await?;
            let attributes = &self.metrics.attributes;
            self.metrics.events.add(applied, attributes);
            self.metrics.batches.add(1, attributes);
            self.metrics.position.record(position, attributes);
            if refilled > 0 {
                self.metrics.holes.add(refilled, attributes);
                tracing::warn!(
                    refilled,
                    position,
                    "refilled a hole in the delivery from the event store"
                );
            }
            self.position.send_replace(position);
            Ok(())
        }
        .instrument(span)
        .await
    }

    /// What the projector reads from the store: its stream types.
    fn filter(&self) -> Filter {
        Filter {
            stream_types: self
                .projection
                .stream_types()
                .iter()
                .map(|t| (*t).to_owned())
                .collect(),
            ..Filter::default()
        }
    }

    /// The stored events at `positions` (ascending), each of them; an error
    /// names the first missing.
    async fn fetch(&self, positions: &[u64]) -> Result<Vec<RecordedEvent>, RunError> {
        let (Some(&first), Some(&last)) = (positions.first(), positions.last()) else {
            return Ok(Vec::new());
        };
        let mut found = Vec::with_capacity(positions.len());
        let mut events = self.store.replay(first - 1, last, self.filter());
        let mut wanted = positions.iter().peekable();
        while let Some(event) = events.next().await {
            let event = event?;
            while wanted.next_if(|p| **p < event.global_position).is_some() {}
            if wanted.next_if(|p| **p == event.global_position).is_some() {
                found.push(event);
            }
        }
        if found.len() < positions.len() {
            let missing = positions
                .iter()
                .find(|p| !found.iter().any(|e| e.global_position == **p))
                .copied()
                .unwrap_or(first);
            return Err(RunError::Read(crm_event_store::ReadError::Corrupt(
                format!("position {missing} is missing from the store"),
            )));
        }
        Ok(found)
    }

    /// Applies every stored event of the projection after `position` up to
    /// `up_to`, moving `position` there; returns how many it read, and
    /// counts the events the projection handles in `applied`.
    async fn refill(
        &self,
        tx: &Tx<'_>,
        position: &mut u64,
        up_to: u64,
        applied: &mut u64,
    ) -> Result<u64, RunError> {
        let mut count = 0;
        let whole = self.projection.stream_types().is_empty();
        while *position < up_to {
            let before = *position;
            let mut events = self.store.replay(before, up_to, self.filter());
            while let Some(event) = events.next().await {
                let event = event?;
                let taken = self.handles(&event);
                if taken {
                    self.apply_one(tx, &event).await?;
                    *applied += 1;
                }
                *position = event.global_position;
                // Positions filled: all of them when it reads everything,
                // else those of its events.
                count += u64::from(whole || taken);
            }
            if !whole {
                // Only the projection's stream types are read: the rest of
                // the range holds none.
                *position = up_to;
            } else if *position == before {
                return Err(RunError::Read(crm_event_store::ReadError::Corrupt(
                    format!(
                        "positions {} to {up_to} are missing from the store",
                        before + 1
                    ),
                )));
            }
        }
        Ok(count)
    }

    /// Applies `event`; a failure is its own (or, when a deferred write of
    /// an earlier event failed on the way, that event's).
    async fn apply_one(&self, tx: &Tx<'_>, event: &RecordedEvent) -> Result<(), RunError> {
        tx.applying(event.global_position);
        self.projection
            .apply(tx, event)
            .await
            .map_err(|error| match error {
                ApplyError::Transient(error) => {
                    let (position, error) = tx.blame(event.global_position, error);
                    RunError::Transient { position, error }
                }
                error => {
                    let (position, error) = tx.blame(event.global_position, error);
                    RunError::Poison { position, error }
                }
            })
    }

    async fn record_failure(&self, position: u64, error: &str) -> Result<(), RunError> {
        let client = self.pool.get().await?;
        client
            .execute(
                "UPDATE projections SET state = 'failed', last_error = $2, error_position = $3, \
                 updated_at = now() WHERE name = $1",
                &[
                    &self.projection.name(),
                    &error,
                    &i64::try_from(position).unwrap_or(i64::MAX),
                ],
            )
            .await?;
        Ok(())
    }
}

/// Creates a projection's tables and status row if missing (idempotent, one
/// process at a time).
pub async fn ensure_schema(
    client: &tokio_postgres::Client,
    projection: &dyn Projection,
) -> Result<(), tokio_postgres::Error> {
    const DDL_LOCK: i64 = 0x0063_726d_5f70_726a; // "crm_prj"
    client
        .batch_execute(&format!(
            "SELECT pg_advisory_lock({DDL_LOCK}); {STATUS_SCHEMA}; {}; \
             INSERT INTO projections (name) VALUES ('{}') ON CONFLICT DO NOTHING; \
             SELECT pg_advisory_unlock({DDL_LOCK});",
            projection.schema(),
            projection.name()
        ))
        .await
}

/// The position `name` has applied (0 when it never ran).
pub async fn applied_position(
    client: &tokio_postgres::Client,
    name: &str,
) -> Result<u64, tokio_postgres::Error> {
    let row = client
        .query_opt("SELECT position FROM projections WHERE name = $1", &[&name])
        .await?;
    Ok(row.map_or(0, |row| u64::try_from(row.get::<_, i64>(0)).unwrap_or(0)))
}

/// Every projection's status with its lag against the log's head.
pub async fn statuses(
    client: &tokio_postgres::Client,
) -> Result<Vec<ProjectionStatus>, tokio_postgres::Error> {
    client.batch_execute(STATUS_SCHEMA).await?;
    let rows = client
        .query(
            "SELECT p.name, p.position, p.state, p.last_error, p.error_position, p.holes_refilled, \
               h.position - p.position, \
               COALESCE(EXTRACT(EPOCH FROM now() - e.recorded_at)::float8, 0) \
             FROM projections p CROSS JOIN log_head h \
             LEFT JOIN events e ON e.global_position = p.position + 1 \
             ORDER BY p.name",
            &[],
        )
        .await?;
    let unsigned = |v: i64| u64::try_from(v).unwrap_or(0);
    Ok(rows
        .iter()
        .map(|row| ProjectionStatus {
            name: row.get(0),
            position: unsigned(row.get(1)),
            state: row.get(2),
            last_error: row.get(3),
            error_position: row.get::<_, Option<i64>>(4).map(unsigned),
            holes_refilled: unsigned(row.get(5)),
            lag_events: unsigned(row.get(6)),
            lag_seconds: row.get(7),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use tokio::sync::watch;

    #[test]
    fn short_keys_that_differ_in_any_byte_or_length_hash_apart() {
        use std::hash::BuildHasher;
        let hasher = std::hash::BuildHasherDefault::<super::FastHasher>::default();
        let mut seen = std::collections::HashMap::new();
        // Every key of up to 9 bytes from a few byte values: tails of 1 to
        // 7 bytes, zero bytes among them, and keys that are prefixes of
        // others.
        let mut keys: Vec<Vec<u8>> = vec![Vec::new()];
        for _ in 0..9 {
            let longer: Vec<Vec<u8>> = keys
                .iter()
                .filter(|key| key.len() == keys.last().map_or(0, Vec::len))
                .flat_map(|key| {
                    [0u8, 1, 255].map(|byte| {
                        let mut key = key.clone();
                        key.push(byte);
                        key
                    })
                })
                .collect();
            keys.extend(longer);
        }
        assert_eq!(keys.len(), (0..=9).map(|n| 3usize.pow(n)).sum::<usize>());
        for key in &keys {
            let hash = hasher.hash_one(key.as_slice());
            if let Some(other) = seen.insert(hash, key.clone()) {
                panic!("{key:?} and {other:?} hash alike");
            }
        }
        // Strings hash their bytes and an end marker, not their length:
        // the tail's length tells trailing zero bytes apart.
        assert_ne!(hasher.hash_one("a"), hasher.hash_one("a\0"));
        assert_ne!(hasher.hash_one(""), hasher.hash_one("\0"));
    }

    #[test]
    fn every_wait_beyond_the_applied_position_is_heard() {
        let (_applied_to, position) = watch::channel(10u64);
        let wanted = Arc::new(watch::Sender::new(0u64));
        let applied = super::Applied {
            position,
            wanted: wanted.clone(),
        };
        let mut heard = wanted.subscribe();
        applied.want(5); // applied already: nothing to hear
        assert!(!heard.has_changed().unwrap());
        applied.want(1_000_000); // beyond the log, say: never reached
        assert!(heard.has_changed().unwrap());
        heard.borrow_and_update();
        applied.want(20); // lower than that, still not applied: heard too
        assert!(heard.has_changed().unwrap());
        assert_eq!(*heard.borrow_and_update(), 1_000_000);
    }
}
