//! A rebuild's record of the keys its fresh tables hold, so that an
//! `INSERT ... ON CONFLICT (k) DO ...` of a key not there yet goes out as a
//! plain INSERT.
//!
//! PostgreSQL checks an `ON CONFLICT` insert with a speculative insertion:
//! the conflict target's index searched first, then the row and its index
//! entry inserted and confirmed. In psql, on this machine, 847,000 timeline
//! rows took 4.4 s with `ON CONFLICT DO NOTHING` and 2.5 s without
//! (`docs/benchmarks.md`). A rebuild fills tables that start empty, written
//! only by its own worker, so it can know which keys are not there yet:
//! each scoped insert's key is remembered (as a hash, see [`KeySet`]) when
//! it goes out; a key certainly not there yet goes out in a plain INSERT,
//! and one that may be there goes out as it is.
//!
//! The record holds only while every write of the table is understood. A
//! table stops being followed (its inserts keep their conflict clause)
//! when:
//! - it is written by an INSERT of another shape, or with another conflict
//!   target, which adds rows whose keys are not known;
//! - an UPDATE assigns a key column, or cannot be read;
//! - a DELETE is by other columns than the key (a keyed DELETE by the key
//!   leaves its keys recorded: written again, they keep their conflict
//!   clause);
//! - a statement sent alone names it and may change it ([`Changes`]);
//! - the keys of all tables would take more than [`BUDGET`] bytes;
//! - a key parameter's type is not its column's (equal bytes must mean
//!   equal values in the column).
//!
//! Only tables that were empty when the rebuild made them, and that have no
//! trigger (which could write rows unseen), are followed, and
//! only scopes whose every unique index covers the key columns (so a plain
//! insert of a new key can meet no other row), with keys of types whose
//! equal values have equal bytes (`bulk::key_parameter`).
use std::collections::HashMap;

use crate::bulk::{Bulk, Changes, Effect, Shape};

/// The most bytes of keys one rebuild worker keeps: past it each table
/// stops being followed at its next scoped insert. About 8 million keys;
/// the 1,386,000 rows of `customer_360`'s tables in a 1M-event rebuild take
/// about 30 MB.
pub(crate) const BUDGET: usize = 256 << 20;

/// What a key counts against [`BUDGET`]: its hash's slot in the set (8
/// bytes and a control byte), with room for the spare slots (about 21
/// bytes a key in all) and for the old table while the set grows.
const PER_KEY: usize = 32;

/// See the module's documentation.
#[derive(Default)]
pub struct Fresh {
    state: std::sync::Mutex<State>,
}

/// A table's columns and the type (oid) of each.
pub(crate) type Columns = HashMap<String, u32>;

#[derive(Default)]
struct State {
    tables: HashMap<String, Table>,
    /// Each followed table's column types: a key parameter must have its
    /// column's type, so that equal bytes mean equal values there.
    types: HashMap<String, Columns>,
    /// Rows that went out in a plain INSERT.
    plain: u64,
    /// [`BUDGET`], but in tests.
    budget: usize,
}

enum Table {
    /// Followed: the key columns (sorted; `None` until the first scoped
    /// insert names them, while the table has no row), and the keys there.
    Keys {
        columns: Option<Vec<String>>,
        keys: KeySet,
    },
    /// No longer followed.
    Off,
}

/// How the rows of one gathered statement go out.
pub(crate) struct Split<R> {
    /// Rows of keys not there yet: sent with `Effect::Upsert`'s `plain`.
    pub(crate) plain: Vec<R>,
    /// Rows sent with the statement as it is.
    pub(crate) kept: Vec<R>,
}

impl Fresh {
    /// A record for `tables`, each of which is empty, with its columns'
    /// types.
    pub(crate) fn new(tables: impl IntoIterator<Item = (String, Columns)>) -> Self {
        let mut state = State {
            budget: BUDGET,
            ..State::default()
        };
        for (table, columns) in tables {
            let table = table.to_ascii_lowercase();
            state.tables.insert(
                table.clone(),
                Table::Keys {
                    columns: None,
                    keys: KeySet::default(),
                },
            );
            state.types.insert(table, columns);
        }
        Self {
            state: std::sync::Mutex::new(state),
        }
    }

    /// The same with another budget.
    #[cfg(test)]
    fn with_budget(self, budget: usize) -> Self {
        self.state().budget = budget;
        self
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The tables still followed, sorted.
    pub fn followed(&self) -> Vec<String> {
        let state = self.state();
        let mut followed: Vec<String> = state
            .tables
            .iter()
            .filter(|(_, table)| matches!(table, Table::Keys { .. }))
            .map(|(name, _)| name.clone())
            .collect();
        followed.sort();
        followed
    }

    /// Rows sent in a plain INSERT.
    pub fn plain(&self) -> u64 {
        self.state().plain
    }

    /// A statement going out alone (not gathered), or a read: stops
    /// following what it may change.
    pub(crate) fn observe(&self, shape: &Shape) {
        let mut state = self.state();
        if let Some(bulk) = &shape.bulk {
            // A gatherable write sent alone: its key is not recorded.
            match &bulk.effect {
                Effect::Update { assigned } => state.updated(bulk.table(), Some(assigned)),
                _ => state.off(bulk.table()),
            }
            return;
        }
        match &shape.changes {
            Changes::Nothing => {}
            Changes::Update { table, assigned } => state.updated(table, assigned.as_ref()),
            Changes::Unknown => {
                let named: Vec<String> = state
                    .tables
                    .iter()
                    .filter(|(name, table)| {
                        matches!(table, Table::Keys { .. }) && shape.mentions(name)
                    })
                    .map(|(name, _)| name.clone())
                    .collect();
                for table in named {
                    state.off(&table);
                }
            }
        }
    }

    /// The rows of one gathered statement of `bulk`, in the order they go
    /// out, with the keys they hold recorded. `commutes` says every unique
    /// index of the table covers the scope's columns; `param(row, k)` is a
    /// row's parameter `k` (`None` for NULL).
    pub(crate) fn split<'r, R: Copy + 'r>(
        &self,
        bulk: &Bulk,
        commutes: bool,
        rows: Vec<R>,
        param: impl Fn(&R, usize) -> Option<&'r [u8]>,
    ) -> Split<R> {
        let mut state = self.state();
        let table = bulk.table();
        let kept = |rows| Split {
            plain: Vec::new(),
            kept: rows,
        };
        if !matches!(state.tables.get(table), Some(Table::Keys { .. })) {
            return kept(rows);
        }
        let scope = bulk.scope.as_ref();
        match &bulk.effect {
            Effect::Update { assigned } => {
                state.updated(table, Some(assigned));
                kept(rows)
            }
            Effect::Insert => {
                state.off(table);
                kept(rows)
            }
            Effect::Delete => {
                if scope.is_none_or(|scope| !state.typed(table, scope, &bulk.types)) {
                    state.off(table);
                    return kept(rows);
                }
                let Some(Table::Keys { columns, .. }) = state.tables.get(table) else {
                    return kept(rows);
                };
                // A delete by the key leaves the keys recorded (a hash may
                // stand for other keys too): each may be there, so a key
                // written again keeps its conflict clause.
                let by_key = match (columns.as_ref(), scope) {
                    // No key recorded yet: the table has no row to delete.
                    (None, _) => true,
                    (Some(columns), Some(scope)) => *columns == scope.columns,
                    _ => false,
                };
                if !by_key {
                    state.off(table);
                }
                kept(rows)
            }
            Effect::Upsert { .. } => {
                let Some(scope) =
                    scope.filter(|scope| commutes && state.typed(table, scope, &bulk.types))
                else {
                    state.off(table);
                    return kept(rows);
                };
                let State {
                    tables,
                    plain: sent_plain,
                    ..
                } = &mut *state;
                let Some(Table::Keys { columns, keys }) = tables.get_mut(table) else {
                    return kept(rows);
                };
                if columns.get_or_insert_with(|| scope.columns.clone()) != &scope.columns {
                    state.off(table);
                    return kept(rows);
                }
                let mut split = Split {
                    plain: Vec::new(),
                    kept: Vec::new(),
                };
                // One buffer for the lookups.
                let mut key = Vec::new();
                for row in rows {
                    // A NULL in the key never conflicts.
                    if !key_of(&row, &scope.params, &param, &mut key) || keys.insert(&key) {
                        split.plain.push(row);
                    } else {
                        split.kept.push(row);
                    }
                }
                *sent_plain += split.plain.len() as u64;
                if state.bytes() > state.budget {
                    // Past the budget: this table's keys go, and its inserts
                    // keep their conflict clause from the next statement on.
                    tracing::debug!(table, "a rebuild table's keys are no longer followed");
                    state.off(table);
                }
                split
            }
        }
    }
}

impl State {
    /// Whether each of `scope`'s parameters has its column's type in
    /// `table` (`types` are the statement's parameter types).
    fn typed(
        &self,
        table: &str,
        scope: &crate::bulk::Scope,
        types: &[tokio_postgres::types::Type],
    ) -> bool {
        let Some(columns) = self.types.get(table) else {
            return false;
        };
        scope.columns.iter().zip(&scope.params).all(|(column, &k)| {
            types
                .get(k)
                .is_some_and(|ty| columns.get(column) == Some(&ty.oid()))
        })
    }

    fn off(&mut self, table: &str) {
        if let Some(entry) = self.tables.get_mut(table) {
            *entry = Table::Off;
        }
    }

    /// What the keys of every followed table count against [`BUDGET`].
    fn bytes(&self) -> usize {
        self.tables
            .values()
            .map(|table| match table {
                Table::Keys { keys, .. } => keys.accounted(),
                Table::Off => 0,
            })
            .sum()
    }

    /// An UPDATE of `table` assigning `assigned` (`None`: unknown columns).
    fn updated(&mut self, table: &str, assigned: Option<&Vec<String>>) {
        let Some(Table::Keys { columns, .. }) = self.tables.get(table) else {
            return;
        };
        let rekeys = match (columns, assigned) {
            // No key recorded yet: the table has no row to update.
            (None, _) => false,
            (Some(_), None) => true,
            (Some(columns), Some(assigned)) => assigned.iter().any(|a| columns.contains(a)),
        };
        if rekeys {
            self.off(table);
        }
    }
}

/// The keys entered, each as its 64-bit hash only ([`crate::runtime::Seeded`]:
/// the keys come from the events): no key bytes kept, one lookup in one
/// small table per key. A key whose hash is there is only *maybe* there
/// (another key may share the hash), so it keeps its conflict clause and
/// PostgreSQL decides; a key whose hash is not there certainly is not, and
/// only that answer lets a row go out plain. Nothing is ever removed (a
/// hash may stand for several keys): a key deleted and written again keeps
/// its conflict clause.
#[derive(Default)]
struct KeySet<S = crate::runtime::Seeded> {
    hasher: S,
    hashes: std::collections::HashSet<u64, std::hash::BuildHasherDefault<Hashed>>,
}

impl<S: std::hash::BuildHasher> KeySet<S> {
    /// Enters `key`: `true` when it certainly was not there, `false` when
    /// it may have been.
    fn insert(&mut self, key: &[u8]) -> bool {
        self.hashes.insert(self.hasher.hash_one(key))
    }

    /// What the keys there count against [`BUDGET`].
    fn accounted(&self) -> usize {
        self.hashes.len() * PER_KEY
    }
}

/// A hasher for keys that are hashes already (a [`KeySet`]'s).
#[derive(Default)]
struct Hashed(u64);

impl std::hash::Hasher for Hashed {
    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(byte);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// Writes a row's key into `key` (each part's length, then its bytes);
/// `false` when a part is NULL.
fn key_of<'r, R>(
    row: &R,
    params: &[usize],
    param: &impl Fn(&R, usize) -> Option<&'r [u8]>,
    key: &mut Vec<u8>,
) -> bool {
    key.clear();
    for &k in params {
        let Some(part) = param(row, k) else {
            return false;
        };
        key.extend_from_slice(&u32::try_from(part.len()).unwrap_or(u32::MAX).to_le_bytes());
        key.extend_from_slice(part);
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_postgres::types::Type;

    fn bulk(sql: &str, types: &[Type]) -> std::sync::Arc<Shape> {
        crate::bulk::shape(sql, types)
    }

    /// A row: its parameters' bytes.
    type Row<'a> = &'a [Option<&'a [u8]>];

    /// Which rows (by index) go plain, and which as they are.
    fn split(fresh: &Fresh, shape: &Shape, rows: &[Row<'_>]) -> (Vec<usize>, Vec<usize>) {
        let split = fresh.split(
            shape.bulk.as_ref().expect("gathers"),
            true,
            rows.iter().copied().enumerate().collect(),
            |row: &(usize, Row<'_>), k| row.1[k],
        );
        let indexes = |rows: Vec<(usize, Row<'_>)>| rows.into_iter().map(|(i, _)| i).collect();
        (indexes(split.plain), indexes(split.kept))
    }

    /// A record of empty tables `tables`, each with `k bigint, v text`.
    fn following(tables: &[&str]) -> Fresh {
        let columns: Columns = [
            ("k".to_owned(), Type::INT8.oid()),
            ("v".to_owned(), Type::TEXT.oid()),
        ]
        .into_iter()
        .collect();
        Fresh::new(tables.iter().map(|t| ((*t).to_owned(), columns.clone())))
    }

    const A: &[u8] = b"a";
    const B: &[u8] = b"b";
    const C: &[u8] = b"c";
    const TYPES: &[Type] = &[Type::INT8, Type::TEXT];
    const NOTHING: &str = "INSERT INTO t (k, v) VALUES ($1, $2) ON CONFLICT (k) DO NOTHING";
    const UPSERT: &str =
        "INSERT INTO t (k, v) VALUES ($1, $2) ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v";

    #[test]
    fn a_key_set_never_calls_an_entered_key_new_and_takes_a_shared_hash_for_there() {
        /// Every key one hash.
        #[derive(Default)]
        struct Same;
        struct Seven;
        impl std::hash::Hasher for Seven {
            fn write(&mut self, _: &[u8]) {}
            fn finish(&self) -> u64 {
                7
            }
        }
        impl std::hash::BuildHasher for Same {
            type Hasher = Seven;
            fn build_hasher(&self) -> Seven {
                Seven
            }
        }
        let mut same: KeySet<Same> = KeySet::default();
        assert!(same.insert(b"a"), "the first key is new");
        assert!(!same.insert(b"a"), "entered, so there");
        assert!(
            !same.insert(b"b"),
            "another key of the same hash may be there: not new"
        );
        assert_eq!(same.accounted(), PER_KEY);
        let mut seeded = KeySet::<crate::runtime::Seeded>::default();
        let keys: Vec<Vec<u8>> = (0u32..10_000).map(|n| n.to_le_bytes().to_vec()).collect();
        for key in &keys {
            assert!(seeded.insert(key), "{key:?} is new");
        }
        for key in &keys {
            assert!(!seeded.insert(key), "{key:?} is there");
        }
        assert_eq!(seeded.accounted(), 10_000 * PER_KEY);
    }

    #[test]
    fn new_keys_go_plain_and_known_ones_keep_their_conflict_clause() {
        let fresh = following(&["t"]);
        let nothing = bulk(NOTHING, TYPES);
        let upsert = bulk(UPSERT, TYPES);
        assert!(matches!(
            &nothing.bulk.as_ref().unwrap().effect,
            Effect::Upsert { plain } if !plain.contains("CONFLICT")
        ));
        let (plain, kept) = split(
            &fresh,
            &nothing,
            &[&[Some(A), Some(b"1")], &[Some(B), None], &[Some(A), None]],
        );
        assert_eq!(plain, vec![0, 1], "a and b are new");
        assert_eq!(kept, vec![2], "the second a keeps its DO NOTHING");
        let (plain, kept) = split(&fresh, &upsert, &[&[Some(B), Some(b"2")], &[Some(C), None]]);
        assert_eq!((plain, kept), (vec![1], vec![0]), "b is there: an upsert");
        // A NULL key never conflicts: plain, and not recorded.
        let (plain, _) = split(&fresh, &nothing, &[&[None, None], &[None, None]]);
        assert_eq!(plain, vec![0, 1]);
        assert_eq!(fresh.plain(), 5);
        assert_eq!(fresh.followed(), vec!["t"]);
    }

    #[test]
    fn a_keyed_delete_keeps_the_record_and_a_write_sent_alone_may_stop_it() {
        let fresh = following(&["t", "u"]);
        let nothing = bulk(NOTHING, TYPES);
        split(&fresh, &nothing, &[&[Some(A), None]]);
        let delete = bulk("DELETE FROM t WHERE k = $1", &[Type::INT8]);
        split(&fresh, &delete, &[&[Some(A)]]);
        assert_eq!(fresh.followed(), vec!["t", "u"]);
        let (plain, kept) = split(&fresh, &nothing, &[&[Some(A), None], &[Some(B), None]]);
        assert_eq!(
            (plain, kept),
            (vec![1], vec![0]),
            "a deleted key may be there: it keeps its conflict clause"
        );
        // An UPDATE of other columns changes no key.
        let update = bulk("UPDATE t SET v = $2 WHERE k = $1", TYPES);
        split(&fresh, &update, &[&[Some(A), None]]);
        assert_eq!(fresh.followed(), vec!["t", "u"]);
        // A read changes nothing, nor an UPDATE of other columns sent alone;
        // a write sent alone that may add rows to t stops following it.
        fresh.observe(&bulk("SELECT v FROM t WHERE k = $1", &[Type::INT8]));
        fresh.observe(&bulk(
            "UPDATE t SET v = (SELECT 'x') WHERE k = $1",
            &[Type::INT8],
        ));
        assert_eq!(fresh.followed(), vec!["t", "u"]);
        fresh.observe(&bulk("INSERT INTO t (k, v) SELECT k + 1, v FROM t", &[]));
        assert_eq!(fresh.followed(), vec!["u"]);
        let (plain, kept) = split(&fresh, &nothing, &[&[Some(A), None]]);
        assert_eq!((plain, kept), (vec![], vec![0]), "t is no longer followed");
    }

    #[test]
    fn gathered_writes_that_could_add_or_rekey_rows_stop_the_record() {
        for (sql, types) in [
            // Another shape of insert: keys not known.
            ("INSERT INTO t (k, v) VALUES ($1, $2)", TYPES),
            // Another conflict target.
            (
                "INSERT INTO t (k, v) VALUES ($1, $2) ON CONFLICT (v) DO NOTHING",
                TYPES,
            ),
            // An UPDATE of the key column (by another column).
            ("UPDATE t SET k = $1 WHERE v = $2", TYPES),
            // A DELETE by another column.
            ("DELETE FROM t WHERE v = $1", &[Type::TEXT][..]),
            // A DELETE by the key, of another type than the column's (4
            // bytes against 8: the same value, other bytes). Shapes are
            // kept by text, and another test has this one with `INT8`: a
            // space tells them apart.
            ("DELETE FROM t WHERE k = $1 ", &[Type::INT4][..]),
        ] {
            let fresh = following(&["t"]);
            split(&fresh, &bulk(NOTHING, TYPES), &[&[Some(A), None]]);
            let row: Vec<Option<&[u8]>> = vec![Some(C); types.len()];
            split(&fresh, &bulk(sql, types), &[&row[..]]);
            assert!(fresh.followed().is_empty(), "{sql}");
        }
    }

    #[test]
    fn statements_sent_alone_stop_the_record_where_they_may_change_keys() {
        for (sql, stops) in [
            ("UPDATE t SET k = k + 1", true),
            ("UPDATE t SET v = 'x' FROM u WHERE u.k = t.k", false),
            ("UPDATE t SET v = 'x', k = 2 FROM u WHERE u.k = t.k", true),
            ("UPDATE t SET (k, v) = (1, 'x')", true),
            ("DELETE FROM t WHERE v IS NULL", true),
            ("SELECT * FROM t FOR UPDATE", true),
            (
                "WITH d AS (DELETE FROM t RETURNING k) SELECT count(*) FROM d",
                true,
            ),
            ("SELECT count(*) FROM tt", false),
            ("SELECT count(*) FROM t", false),
            // A second statement after an UPDATE of other columns.
            ("UPDATE t SET v = 'x'; DELETE FROM t", true),
            ("UPDATE t SET v = 'a;b' WHERE v = 'c'", false),
            ("UPDATE t SET v = 'x';", false),
            // A FROM inside a value does not end the assignments.
            (
                "UPDATE t SET v = v IS DISTINCT FROM 'x', k = 5 WHERE v = 'y'",
                true,
            ),
        ] {
            let fresh = following(&["t"]);
            split(&fresh, &bulk(NOTHING, TYPES), &[&[Some(A), None]]);
            fresh.observe(&bulk(sql, &[]));
            assert_eq!(fresh.followed().is_empty(), stops, "{sql}");
        }
    }

    #[test]
    fn past_the_budget_a_table_is_no_longer_followed() {
        let fresh = following(&["t"]).with_budget(2 * PER_KEY);
        let nothing = bulk(NOTHING, TYPES);
        let (plain, _) = split(&fresh, &nothing, &[&[Some(A), None], &[Some(B), None]]);
        assert_eq!(plain, vec![0, 1]);
        assert_eq!(fresh.followed(), vec!["t"], "at the budget");
        let (plain, _) = split(&fresh, &nothing, &[&[Some(C), None]]);
        assert_eq!(plain, vec![0], "a new key, the last one recorded");
        assert!(fresh.followed().is_empty(), "past the budget");
        assert_eq!(fresh.state().bytes(), 0, "its keys are freed");
        let (plain, kept) = split(&fresh, &nothing, &[&[Some(A), None]]);
        assert_eq!((plain, kept), (vec![], vec![0]), "no longer followed");
    }
}
