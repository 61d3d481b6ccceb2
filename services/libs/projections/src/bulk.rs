//! Many queued single-row INSERTs sent as one statement.
//!
//! A projection's transaction queues its writes ([`crate::Tx`]). When the queue goes out, the
//! writes of one plain `INSERT INTO t (...) VALUES (...) [ON CONFLICT ...]`
//! statement are gathered into one `INSERT ... SELECT ... FROM unnest(...)`
//! with one array per parameter, as long as no write between them mentions
//! `t`: such a statement reads and writes only `t` (its values and its
//! conflict clause may hold parameters, literals, casts, operators and a
//! few plain functions, nothing that reads a table; read models have no
//! triggers, foreign keys, rules or views, which would break this), so
//! moving it before writes that never name `t` changes nothing. Under `ON CONFLICT ... DO
//! UPDATE` a row may not be updated twice by one statement, so the n-th
//! write of one key goes into the n-th statement, in order.
//!
//! Plain `UPDATE t SET ... WHERE k1 = $a AND k2 = $b [AND ...]` statements
//! are gathered the same way, into one `UPDATE t SET ... FROM unnest(...)
//! WHERE ...`: writes with different key values touch disjoint rows (none
//! may set a key column), and the n-th write of one key goes into the n-th
//! statement (an `UPDATE ... FROM` would apply only one of several writes
//! that match one row).
//!
//! An `INSERT ... ON CONFLICT (k...)` and a keyed `UPDATE` are *scoped*:
//! each touches only rows holding its own values of `k...`. Where every
//! unique index of the table covers those columns (read from the catalog),
//! scoped writes of different values commute, so one need not close the
//! gathering of another statement of the same table; only the writes of
//! one value keep their order (`runtime::gathered`).
//!
//! In a rebuild, whose record of keys ([`crate::fresh`]) knows which rows
//! are new, a keyed UPDATE of a row inserted earlier in the same flush is
//! folded into that insert ([`fold`]): the new row goes out once, with the
//! UPDATE's values, and the UPDATE is not sent.
use std::sync::{Arc, LazyLock, Mutex};

use tokio_postgres::types::{IsNull, Kind, ToSql, Type};

/// What the queue needs to know about one SQL text.
pub(crate) struct Shape {
    /// The text in lower case, to tell which tables it mentions.
    lower: String,
    /// How its writes are sent together, when they can be.
    pub(crate) bulk: Option<Bulk>,
    /// What it may change when it goes out alone (see [`Changes`]).
    pub(crate) changes: Changes,
}

/// What a statement sent alone may change in the tables it names, for a
/// rebuild's record of the keys its tables hold ([`crate::fresh`]).
/// Statements change only the tables they name: read models have no
/// triggers, rules or functions that write.
#[derive(Debug, PartialEq)]
pub(crate) enum Changes {
    /// A plain read.
    Nothing,
    /// `UPDATE table SET ...`: rows stay, and only the columns assigned
    /// change (`None` when the assignments cannot be read).
    Update {
        table: String,
        assigned: Option<Vec<String>>,
    },
    /// Anything else: any table it names may gain, lose or re-key rows.
    Unknown,
}

/// What a gathered statement's writes do to its table's rows.
#[derive(Debug, PartialEq)]
pub(crate) enum Effect {
    /// `INSERT ... ON CONFLICT (scope) DO NOTHING` or `DO UPDATE`: `plain`
    /// is the gathered statement without its conflict clause, for rows
    /// whose key is known not to be there yet.
    Upsert { plain: String },
    /// Another INSERT: rows whose keys are not known.
    Insert,
    /// A keyed UPDATE: the columns it assigns.
    Update { assigned: Vec<String> },
    /// A keyed DELETE: the rows of its scope's values go.
    Delete,
}

/// The most columns a gathered write's key or scope may have (the queue
/// tells keys apart without allocating: `runtime::KeyValue`).
pub(crate) const KEY_PARTS: usize = 6;

/// One INSERT statement's writes sent as one statement.
pub(crate) struct Bulk {
    /// The table it writes (lower case).
    table: String,
    /// The `unnest` statement: parameter `$k` is the array of every write's
    /// `$k`.
    pub(crate) sql: String,
    /// The parameters naming the row of an `ON CONFLICT (...) DO UPDATE`
    /// target (0-based), if it has one.
    pub(crate) key: Option<Vec<usize>>,
    /// The columns (lower case, sorted) and parameters that confine every
    /// write to the rows holding its own values of those columns: an
    /// `ON CONFLICT (...)` target, or an UPDATE's key. Writes of different
    /// values commute where the table's unique indexes all cover the
    /// columns (see `runtime::gathered`).
    pub(crate) scope: Option<Scope>,
    /// An UPDATE: gathered only where its scope commutes (one statement
    /// checks unique indexes row by row, so writes of different keys that
    /// swap a unique value could collide where one after the other do not).
    pub(crate) needs_scope: bool,
    /// Whether, of several writes of one scope value in a row, one alone
    /// has the effect of them all (see [`Collapse`]).
    pub(crate) collapse: Option<Collapse>,
    /// The element type of each array.
    pub(crate) types: Vec<Type>,
    /// What its writes do to the rows.
    pub(crate) effect: Effect,
    /// The columns (lower case) that take a parameter alone, each with it
    /// (0-based): of an INSERT, those whose value is a parameter used
    /// nowhere else in the statement; of a keyed UPDATE that collapses,
    /// every assignment when each assigns a parameter (else none). See
    /// [`fold`].
    pub(crate) fed: Vec<(String, usize)>,
    /// An upsert's new rows as `COPY`, where it can be (see [`CopyIn`]).
    pub(crate) copy: Option<CopyIn>,
}

/// A gathered upsert's rows known to be new sent by `COPY ... FROM STDIN
/// (FORMAT binary)` rather than as arrays to unnest: PostgreSQL's bulk
/// insert path, without the arrays to parse and the function's rows to
/// materialize (in a rebuild its inserts' CPU is most of the server's).
/// Also every row of a plain INSERT (no conflict clause) in a rebuild.
/// Only for an INSERT whose every value is a parameter alone, without a
/// cast (so its type is its column's, and its bytes are the column's
/// binary form), each taken once.
#[derive(Debug, PartialEq)]
pub(crate) struct CopyIn {
    /// The `COPY` statement, naming the INSERT's columns.
    pub(crate) sql: String,
    /// The parameter (0-based) each column takes, in order.
    pub(crate) params: Vec<usize>,
}

/// See [`CopyIn`].
fn copy_in(table: &str, columns: &[&str], values: &[&str]) -> Option<CopyIn> {
    let mut params = Vec::with_capacity(values.len());
    for value in values {
        let (k, None) = lone_parameter(value.trim())? else {
            return None;
        };
        let k = k.checked_sub(1)?;
        if params.contains(&k) {
            return None;
        }
        params.push(k);
    }
    Some(CopyIn {
        sql: format!(
            "COPY {table} ({}) FROM STDIN (FORMAT binary)",
            columns.join(", ")
        ),
        params,
    })
}

/// How consecutive writes of one scope value (no other write of that value
/// between them) can go out as one, so the others need not be sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Collapse {
    /// `INSERT ... ON CONFLICT (k) DO NOTHING`: once the first has run the
    /// row exists, and the others do nothing.
    First,
    /// An upsert whose `DO UPDATE` sets columns to their new values
    /// (`c = EXCLUDED.c`), or a keyed UPDATE whose WHERE is its key alone
    /// and whose values are parameters: one write with the last write's
    /// parameters, except those listed (0-based), which only feed columns
    /// an upsert sets when it inserts and keeps when it updates, and so
    /// come from the first write. Both ways (the row there before or not)
    /// that one write leaves the row as the writes one by one would.
    Last { keep: Vec<usize> },
}

/// See [`Bulk::scope`].
#[derive(Debug, PartialEq)]
pub(crate) struct Scope {
    pub(crate) columns: Vec<String>,
    pub(crate) params: Vec<usize>,
}

impl Scope {
    fn new(mut pairs: Vec<(String, usize)>) -> Option<Self> {
        if pairs.is_empty() {
            return None;
        }
        pairs.sort();
        let (columns, params) = pairs.into_iter().unzip();
        Some(Self { columns, params })
    }
}

impl Shape {
    /// Whether the text names `table` as a whole word.
    pub(crate) fn mentions(&self, table: &str) -> bool {
        let bytes = self.lower.as_bytes();
        let word = |i: usize| {
            bytes
                .get(i)
                .is_some_and(|b| b.is_ascii_alphanumeric() || *b == b'_')
        };
        self.lower
            .match_indices(table)
            .any(|(at, _)| (at == 0 || !word(at - 1)) && !word(at + table.len()))
    }
}

impl Bulk {
    pub(crate) fn table(&self) -> &str {
        &self.table
    }
}

/// The shape of `sql`, whose parameters have `types`; worked out once per
/// text.
pub(crate) fn shape(sql: &str, types: &[Type]) -> Arc<Shape> {
    static SHAPES: LazyLock<Mutex<crate::runtime::FastMap<String, Arc<Shape>>>> =
        LazyLock::new(Mutex::default);
    let mut shapes = SHAPES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(shape) = shapes.get(sql) {
        return shape.clone();
    }
    let lower = sql.to_ascii_lowercase();
    let shape = Arc::new(Shape {
        changes: changes(&lower),
        lower,
        bulk: plan(sql, types),
    });
    if shape.bulk.is_none() && shape.changes != Changes::Nothing {
        // Once per statement text: a write that goes out one by one is
        // easy to miss (a bare literal in VALUES is enough, see `plan`).
        tracing::debug!(sql = sql.trim(), "a write statement that does not gather");
    }
    shapes.insert(sql.to_owned(), shape.clone());
    shape
}

/// The bulk form of `sql`, or `None` when it is not a plain single-row
/// INSERT whose parameters all sit in its VALUES and are scalars of the
/// built-in types.
fn plan(sql: &str, types: &[Type]) -> Option<Bulk> {
    let sql = sql.trim();
    let upper = sql.to_ascii_uppercase();
    if unparsable(sql) {
        return None;
    }
    if upper.starts_with("UPDATE ") {
        return plan_update(sql, types);
    }
    if upper.starts_with("DELETE FROM ") {
        return plan_delete(sql, types);
    }
    if !upper.starts_with("INSERT INTO ")
        || upper.contains("SELECT")
        || upper.contains("RETURNING")
        || types.is_empty()
    {
        return None;
    }
    let rest = sql["INSERT INTO ".len()..].trim_start();
    let (table, rest) = leading_table(rest)?;
    let (columns, rest) = parenthesized(rest)?;
    let rest = rest.trim_start();
    if !rest.to_ascii_uppercase().starts_with("VALUES") {
        return None;
    }
    let (values, tail) = parenthesized(rest["VALUES".len()..].trim_start())?;
    if tail.contains('$') || tail.trim_start().starts_with(',') {
        return None;
    }
    let columns: Vec<&str> = split_top(columns).into_iter().map(str::trim).collect();
    let values: Vec<&str> = split_top(values).into_iter().map(str::trim).collect();
    if columns.len() != values.len() {
        return None;
    }
    if !builtin_scalars(types) {
        return None;
    }
    // A literal alone is typed by its column in VALUES but not in a
    // SELECT (a bare NULL or '...' would be text there): only values that
    // take a parameter or have a type of their own (a cast, an integer,
    // a boolean, now()) are moved.
    if !only_plain_expressions(&values, tail) {
        return None;
    }
    let typed = |v: &&str| {
        v.contains('$')
            || v.contains("::")
            || v.bytes().all(|b| b.is_ascii_digit())
            || ["now()", "true", "false"].contains(v)
    };
    if !values.iter().all(typed) {
        return None;
    }
    let key = if tail.to_ascii_uppercase().contains("DO UPDATE") {
        let (target, _) = conflict_target(tail, &columns, &values, types)?;
        Some(target.into_iter().map(|(_, k)| k).collect())
    } else {
        None
    };
    let scope = insert_scope(tail, &columns, &values, types);
    let collapse = scope
        .as_ref()
        .and_then(|_| insert_collapse(tail, &columns, &values, types));
    let mut selected = Vec::with_capacity(values.len());
    for value in &values {
        selected.push(renumbered(value, types.len(), "u")?);
    }
    let (arrays, names) = unnested_arrays(types);
    let plain = format!(
        "INSERT INTO {table} ({}) SELECT {} FROM unnest({}) AS u({})",
        columns.join(", "),
        selected.join(", "),
        arrays,
        names,
    );
    let effect = match scope {
        Some(_) => Effect::Upsert {
            plain: plain.clone(),
        },
        None => Effect::Insert,
    };
    // An upsert's rows known new, or every row of a plain INSERT (COPY
    // inserts them as it does: a duplicate fails either way).
    let copy = match effect {
        Effect::Upsert { .. } => copy_in(&table, &columns, &values),
        Effect::Insert if tail.trim().is_empty() => copy_in(&table, &columns, &values),
        _ => None,
    };
    let fed = fed_columns(&columns, &values, types);
    Some(Bulk {
        sql: format!("{plain}{tail}"),
        table,
        key,
        scope,
        needs_scope: false,
        collapse,
        types: types.to_vec(),
        effect,
        fed,
        copy,
    })
}

/// Whether every parameter is a scalar of a built-in type (one array each).
fn builtin_scalars(types: &[Type]) -> bool {
    types
        .iter()
        .all(|ty| matches!(ty.kind(), Kind::Simple) && ty.schema() == "pg_catalog")
}

/// The table name `rest` starts with (lower case), and what follows it.
fn leading_table(rest: &str) -> Option<(String, &str)> {
    let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))?;
    Some((rest[..end].to_ascii_lowercase(), rest[end..].trim_start()))
}

/// The `unnest` arguments of a gathered statement (`$k::"type"[]`, one per
/// parameter) and the names of its columns (`p1`, `p2`, ...).
fn unnested_arrays(types: &[Type]) -> (String, String) {
    let arrays: Vec<String> = types
        .iter()
        .enumerate()
        .map(|(k, ty)| format!("${}::\"{}\"[]", k + 1, ty.name()))
        .collect();
    let names: Vec<String> = (1..=types.len()).map(|k| format!("p{k}")).collect();
    (arrays.join(", "), names.join(", "))
}

/// The columns of an `ON CONFLICT (target)` (lower case, in order) with
/// the parameter each takes alone, and what follows the target; `None`
/// when a target column takes anything else (a cast to another type could
/// make different bytes one value).
fn conflict_target<'t>(
    tail: &'t str,
    columns: &[&str],
    values: &[&str],
    types: &[Type],
) -> Option<(Vec<(String, usize)>, &'t str)> {
    let target = tail.trim_start();
    if !target.to_ascii_uppercase().starts_with("ON CONFLICT") {
        return None;
    }
    let (target, action) = parenthesized(target["ON CONFLICT".len()..].trim_start())?;
    let mut pairs = Vec::new();
    for column in split_top(target) {
        let column = column.trim().to_ascii_lowercase();
        let at = columns
            .iter()
            .position(|c| c.eq_ignore_ascii_case(&column))?;
        pairs.push((column, key_parameter(values[at], types)?));
    }
    (pairs.len() <= KEY_PARTS).then_some((pairs, action))
}

/// The 0-based parameter `value` is when it is a lone `$k` (or cast only to
/// its own type) of a type whose equal values have equal bytes, so writes
/// can be told apart by their key bytes.
fn key_parameter(value: &str, types: &[Type]) -> Option<usize> {
    let (k, cast) = lone_parameter(value.trim())?;
    let k = k.checked_sub(1)?;
    let ty = types.get(k)?;
    if cast.is_some_and(|cast| !cast.eq_ignore_ascii_case(ty.name())) {
        return None;
    }
    // Not numeric, floats, intervals, jsonb or bpchar: equal values there
    // may differ in bytes (1.0 and 1, -0 and 0, trailing blanks).
    [
        Type::INT2,
        Type::INT4,
        Type::INT8,
        Type::UUID,
        Type::BOOL,
        Type::DATE,
        Type::TIMESTAMP,
        Type::TIMESTAMPTZ,
        Type::TEXT,
        Type::VARCHAR,
    ]
    .contains(ty)
    .then_some(k)
}

/// Whether any assignment of `sets` (`a = ..., b = ...`) targets one of
/// `columns`; `None` when a target is not a bare column name (a quoted name
/// or a `(a, b) = ...` list could hide one).
fn assigns_any(sets: &str, columns: &[String]) -> Option<bool> {
    let mut any = false;
    for assignment in split_top(sets) {
        let (target, _) = assignment.split_once('=')?;
        let target = target.trim().to_ascii_lowercase();
        if target.is_empty()
            || !target
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            return None;
        }
        any |= columns.contains(&target);
    }
    Some(any)
}

/// Text the word-level checks here cannot read safely: quoted names,
/// escapes and dollar quoting (which hide where a string ends), comments,
/// and `BETWEEN ... AND` (whose AND is not a conjunction).
fn unparsable(sql: &str) -> bool {
    let lower = sql.to_ascii_lowercase();
    let bytes = lower.as_bytes();
    let escape_string = lower.match_indices("e'").any(|(at, _)| {
        at == 0 || !(bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_')
    });
    ["\"", "\\", "$$", "--", "/*"]
        .iter()
        .any(|bad| lower.contains(bad))
        || escape_string
        || !word_positions(&lower, "between").is_empty()
}

/// The scope of an `INSERT ... ON CONFLICT (target) DO ...`, unless its
/// `DO UPDATE` assigns a target column or has a condition.
fn insert_scope(tail: &str, columns: &[&str], values: &[&str], types: &[Type]) -> Option<Scope> {
    let (pairs, action) = conflict_target(tail, columns, values, types)?;
    let action = action.trim_start();
    if let Some(sets) = action
        .get(..13)
        .filter(|a| a.eq_ignore_ascii_case("DO UPDATE SET"))
        .map(|_| &action[13..])
    {
        if split_at_word(sets, "where").is_some() {
            return None;
        }
        let targets: Vec<String> = pairs.iter().map(|(column, _)| column.clone()).collect();
        if assigns_any(sets, &targets)? {
            return None;
        }
    } else if !action.eq_ignore_ascii_case("DO NOTHING") {
        return None;
    }
    Scope::new(pairs)
}

/// How writes of one key by a scoped INSERT collapse (see [`Collapse`]).
fn insert_collapse(
    tail: &str,
    columns: &[&str],
    values: &[&str],
    types: &[Type],
) -> Option<Collapse> {
    let (target, action) = conflict_target(tail, columns, values, types)?;
    let action = action.trim();
    if action.eq_ignore_ascii_case("DO NOTHING") {
        return Some(Collapse::First);
    }
    let sets = action
        .get(..13)
        .filter(|a| a.eq_ignore_ascii_case("DO UPDATE SET"))
        .map(|_| &action[13..])?;
    let mut assigned = Vec::new();
    for assignment in split_top(sets) {
        let (column, value) = assignment.split_once('=')?;
        let column = column.trim().to_ascii_lowercase();
        let value = value.trim().to_ascii_lowercase();
        if value.strip_prefix("excluded.") != Some(column.as_str()) {
            return None;
        }
        assigned.push(column);
    }
    let keys: Vec<usize> = target.iter().map(|(_, k)| *k).collect();
    let (mut last, mut first) = (Vec::new(), Vec::new());
    for (column, value) in columns.iter().zip(values) {
        let column = column.trim().to_ascii_lowercase();
        if target.iter().any(|(c, _)| *c == column) {
            continue;
        }
        let side = if assigned.contains(&column) {
            &mut last
        } else {
            &mut first
        };
        side.extend(parameters(value)?.into_iter().filter(|k| !keys.contains(k)));
    }
    // A parameter that feeds both kinds of column cannot come from one write.
    if first.iter().any(|k| last.contains(k)) {
        return None;
    }
    first.sort_unstable();
    first.dedup();
    Some(Collapse::Last { keep: first })
}

/// The 0-based parameters `value` takes; `None` for a `$` that is not
/// one (`$` inside a quoted literal is not looked at).
fn parameters(value: &str) -> Option<Vec<usize>> {
    parameter_sites(value)?
        .into_iter()
        .map(|(_, _, k)| k.checked_sub(1))
        .collect()
}

/// Where `value` takes a parameter, outside quoted literals: the offset of
/// each `$k`, its length, and `k`; `None` for a `$` without digits.
fn parameter_sites(value: &str) -> Option<Vec<(usize, usize, usize)>> {
    let mut sites = Vec::new();
    let mut quoted = false;
    for (at, c) in value.char_indices() {
        if c == '\'' {
            quoted = !quoted;
        }
        if c != '$' || quoted {
            continue;
        }
        let digits = value[at + 1..]
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(value.len() - at - 1);
        let k: usize = value[at + 1..at + 1 + digits].parse().ok()?;
        sites.push((at, digits + 1, k));
    }
    Some(sites)
}

/// Whether `word` (lower case) is the name of an unnested parameter
/// (`p1`, `p2`, ...) in a gathered UPDATE or DELETE.
fn unnested(word: &str) -> bool {
    word.len() > 1 && word.starts_with('p') && word[1..].bytes().all(|b| b.is_ascii_digit())
}

/// What the unnested parameters are called in a gathered UPDATE: a name no
/// read-model table or column uses (statements naming it stay single).
const UPDATE_ALIAS: &str = "gathered_writes";

/// The bulk form of `DELETE FROM t WHERE k1 = $a AND k2 = $b ...` (every
/// condition a key column equal to a parameter), one `DELETE ... USING
/// unnest(...)`: scoped by its key like a keyed UPDATE, and a second delete
/// of one key right after the first finds nothing left ([`Collapse::First`]).
fn plan_delete(sql: &str, types: &[Type]) -> Option<Bulk> {
    if types.is_empty() {
        return None;
    }
    if !builtin_scalars(types) {
        return None;
    }
    let rest = sql["DELETE FROM ".len()..].trim_start();
    let (table, rest) = leading_table(rest)?;
    if !rest.get(..6)?.eq_ignore_ascii_case("WHERE ") {
        return None;
    }
    let conditions = &rest[6..];
    let (mut key, mut scope) = (Vec::new(), Vec::new());
    for condition in split_at_words(conditions, "and") {
        let (column, value) = condition.split_once('=')?;
        let column = column.trim();
        // A column named like an unnested one would be ambiguous.
        if unnested(&column.to_ascii_lowercase())
            || column.eq_ignore_ascii_case(UPDATE_ALIAS)
            || column.is_empty()
            || !column
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            return None;
        }
        let k = key_parameter(value, types)?;
        key.push(k);
        scope.push((column.to_ascii_lowercase(), k));
    }
    // Every parameter is a key's: nothing else to send.
    if (0..types.len()).any(|k| !key.contains(&k)) || key.len() > KEY_PARTS {
        return None;
    }
    let (arrays, names) = unnested_arrays(types);
    Some(Bulk {
        sql: format!(
            "DELETE FROM {table} USING unnest({}) AS {UPDATE_ALIAS}({}) WHERE {}",
            arrays,
            names,
            renumbered(conditions.trim(), types.len(), UPDATE_ALIAS)?,
        ),
        table,
        key: Some(key),
        scope: Scope::new(scope),
        needs_scope: true,
        collapse: Some(Collapse::First),
        types: types.to_vec(),
        effect: Effect::Delete,
        fed: Vec::new(),
        copy: None,
    })
}

/// The bulk form of `UPDATE t SET ... WHERE c = $k AND ...`, or `None` when
/// the statement reads anything but its own row, or its WHERE is not a
/// conjunction with at least one `column = $k` (the key).
fn plan_update(sql: &str, types: &[Type]) -> Option<Bulk> {
    let upper = sql.to_ascii_uppercase();
    if types.is_empty() || upper.contains("SELECT") || upper.contains("RETURNING") {
        return None;
    }
    if !builtin_scalars(types) {
        return None;
    }
    let rest = sql["UPDATE ".len()..].trim_start();
    let (table, rest) = leading_table(rest)?;
    if !rest.get(..4)?.eq_ignore_ascii_case("SET ") {
        return None;
    }
    let rest = &rest[4..];
    // Only plain expressions of the row and the parameters: no subquery,
    // no other table, no function but the plain ones, no RETURNING, and
    // nothing that could mean the unnested columns.
    const REFUSED: &[&str] = &[
        "select",
        "table",
        "values",
        "from",
        "join",
        "lateral",
        "with",
        "using",
        "returning",
        "or",
        UPDATE_ALIAS,
    ];
    let plain = words(rest).all(|(word, cast, called)| {
        !REFUSED.contains(&word.as_str())
            && !unnested(&word)
            && (cast || !called || PLAIN_FUNCTIONS.contains(&word.as_str()))
    });
    if !plain {
        return None;
    }
    let (assignments, conditions) = split_at_word(rest, "where")?;
    if split_at_word(conditions, "where").is_some() {
        return None;
    }
    let (mut key, mut key_columns, mut scope) = (Vec::new(), Vec::new(), Vec::new());
    let conjuncts = split_at_words(conditions, "and");
    let n_conjuncts = conjuncts.len();
    for condition in conjuncts {
        let Some((column, value)) = condition.split_once('=') else {
            continue;
        };
        let column = column.trim();
        if column.is_empty()
            || !column
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_')
            || value.contains(['<', '>', '!'])
            || column.ends_with(['<', '>', '!'])
        {
            continue;
        }
        let Some(k) = key_parameter(value, types) else {
            continue;
        };
        key.push(k);
        key_columns.push(column.to_ascii_lowercase());
        scope.push((column.to_ascii_lowercase(), k));
    }
    if key.is_empty() || key.len() > KEY_PARTS {
        return None;
    }
    // A write that moved a row to another key could be matched by a later
    // write of that key, which one statement (one snapshot) would miss.
    if assigns_any(assignments, &key_columns)? {
        return None;
    }
    let assigned = assigned_columns(assignments)?;
    // Its key alone picks the row, and every value is a parameter's: the
    // last write of a key sets the row as all of them would.
    let collapse = (n_conjuncts == key.len()
        && split_top(assignments).iter().all(|assignment| {
            assignment.split_once('=').is_some_and(|(_, value)| {
                lone_parameter(value.trim()).is_some() || constant(value.trim())
            })
        }))
    .then_some(Collapse::Last { keep: Vec::new() });
    let fed = match collapse {
        Some(_) => {
            let (columns, values): (Vec<&str>, Vec<&str>) = split_top(assignments)
                .into_iter()
                .filter_map(|assignment| assignment.split_once('='))
                .map(|(column, value)| (column.trim(), value.trim()))
                .unzip();
            let fed = fed_columns(&columns, &values, types);
            if fed.len() == columns.len() {
                fed
            } else {
                Vec::new()
            }
        }
        None => Vec::new(),
    };
    let renumber = |text: &str| renumbered(text, types.len(), UPDATE_ALIAS);
    let (arrays, names) = unnested_arrays(types);
    Some(Bulk {
        sql: format!(
            "UPDATE {table} SET {} FROM unnest({}) AS {UPDATE_ALIAS}({}) WHERE {}",
            renumber(assignments.trim())?,
            arrays,
            names,
            renumber(conditions.trim())?,
        ),
        table,
        key: Some(key),
        scope: Scope::new(scope),
        needs_scope: true,
        collapse,
        types: types.to_vec(),
        effect: Effect::Update { assigned },
        fed,
        copy: None,
    })
}

/// The columns of `columns` whose value in `values` is a parameter alone
/// (cast, if at all, to its own type) that no other value takes, with it
/// (0-based).
fn fed_columns(columns: &[&str], values: &[&str], types: &[Type]) -> Vec<(String, usize)> {
    let mut uses = vec![0usize; types.len()];
    for value in values {
        for k in parameters(value).unwrap_or_default() {
            if let Some(n) = uses.get_mut(k) {
                *n += 1;
            }
        }
    }
    columns
        .iter()
        .zip(values)
        .filter_map(|(column, value)| {
            let (k, cast) = lone_parameter(value.trim())?;
            let k = k.checked_sub(1)?;
            let ty = types.get(k)?;
            let own = cast.is_none_or(|cast| cast.eq_ignore_ascii_case(ty.name()));
            (own && uses[k] == 1).then(|| (column.trim().to_ascii_lowercase(), k))
        })
        .collect()
}

/// How a keyed UPDATE's write can be folded into an earlier plain INSERT
/// of the same row in one flush of a rebuild (the row known to be new, and
/// no write of it between the two): the insert's parameter `k` takes the
/// update's parameter `j`, for each pair `(k, j)`. `None` unless `update`
/// picks its row by exactly the columns of `insert`'s conflict target (a
/// unique index) with parameters of the same types, by its key alone, and
/// assigns only parameters to columns the insert feeds each from a
/// parameter of the same type (so equal bytes mean equal values).
pub(crate) fn fold(insert: &Bulk, update: &Bulk) -> Option<Vec<(usize, usize)>> {
    if !matches!(insert.effect, Effect::Upsert { .. })
        || !matches!(update.effect, Effect::Update { .. })
        || !matches!(update.collapse, Some(Collapse::Last { .. }))
        || insert.table != update.table
        || update.fed.is_empty()
        || insert.scope.as_ref()?.columns != update.scope.as_ref()?.columns
    {
        return None;
    }
    // Equal key bytes mean the same row only for the same key types.
    let (by_insert, by_update) = (insert.scope.as_ref()?, update.scope.as_ref()?);
    for (&i, &u) in by_insert.params.iter().zip(&by_update.params) {
        if insert.types.get(i)? != update.types.get(u)? {
            return None;
        }
    }
    update
        .fed
        .iter()
        .map(|(column, j)| {
            let &(_, k) = insert.fed.iter().find(|(fed, _)| fed == column)?;
            (insert.types.get(k)? == update.types.get(*j)?).then_some((k, *j))
        })
        .collect()
}

/// The columns `sets` (`a = ..., b = ...`) assigns (lower case); `None`
/// when a target is not a bare column name.
fn assigned_columns(sets: &str) -> Option<Vec<String>> {
    split_top(sets)
        .into_iter()
        .map(|assignment| {
            let (target, _) = assignment.split_once('=')?;
            let target = target.trim().to_ascii_lowercase();
            (!target.is_empty()
                && target
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_'))
            .then_some(target)
        })
        .collect()
}

/// What `lower` (a statement in lower case) may change when sent alone.
fn changes(lower: &str) -> Changes {
    let text = lower.trim().trim_end_matches(';');
    // Several statements: anything may come after the first.
    let mut quoted = false;
    let several = text.bytes().any(|b| {
        if b == b'\'' {
            quoted = !quoted;
        }
        b == b';' && !quoted
    });
    if several {
        return Changes::Unknown;
    }
    const WRITES: &[&str] = &[
        "insert", "update", "delete", "merge", "truncate", "copy", "alter", "drop", "create",
        "call", "do", "lock", "grant", "revoke", "comment", "cluster", "reindex", "vacuum",
    ];
    let writes = || words(text).any(|(word, _, _)| WRITES.contains(&word.as_str()));
    if text.starts_with("select ") && !unparsable(text) && !writes() {
        return Changes::Nothing;
    }
    if let Some(rest) = text.strip_prefix("update ")
        && !unparsable(text)
        && let Some((table, rest)) = leading_table(rest.trim_start())
        && let Some(rest) = rest.strip_prefix("set ")
    {
        // The assignments end where the FROM or WHERE begins; a subquery
        // among them (parentheses) is skipped whole.
        let sets = [split_at_word(rest, "from"), split_at_word(rest, "where")]
            .into_iter()
            .flatten()
            .map(|(sets, _)| sets)
            .min_by_key(|sets| sets.len())
            .unwrap_or(rest);
        // `IS [NOT] DISTINCT FROM` in a value would end them too early.
        let distinct = words(rest).any(|(word, _, _)| word == "distinct");
        return Changes::Update {
            table,
            assigned: assigned_columns(sets).filter(|_| !distinct),
        };
    }
    Changes::Unknown
}

/// `text` split at the first `word` outside parentheses and quotes: what
/// comes before it and after it.
fn split_at_word<'t>(text: &'t str, word: &str) -> Option<(&'t str, &'t str)> {
    let at = *word_positions(text, word).first()?;
    Some((&text[..at], &text[at + word.len()..]))
}

/// `text` split at each whole `word` outside parentheses and quotes.
fn split_at_words<'t>(text: &'t str, word: &str) -> Vec<&'t str> {
    let mut parts = Vec::new();
    let mut from = 0;
    for at in word_positions(text, word) {
        parts.push(&text[from..at]);
        from = at + word.len();
    }
    parts.push(&text[from..]);
    parts
}

/// Where `word` (any case, ASCII) stands as a whole word in `text`, outside
/// parentheses and quotes.
fn word_positions(text: &str, word: &str) -> Vec<usize> {
    let bytes = text.as_bytes();
    let part_of_word = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b'$';
    let (mut found, mut depth, mut quoted) = (Vec::new(), 0usize, false);
    for (at, &b) in bytes.iter().enumerate() {
        match b {
            b'\'' => quoted = !quoted,
            b'(' if !quoted => depth += 1,
            b')' if !quoted => depth = depth.saturating_sub(1),
            _ => {}
        }
        if quoted || depth > 0 || (at > 0 && part_of_word(bytes[at - 1])) {
            continue;
        }
        let end = at + word.len();
        if bytes
            .get(at..end)
            .is_some_and(|w| w.eq_ignore_ascii_case(word.as_bytes()))
            && bytes.get(end).is_none_or(|b| !part_of_word(*b))
        {
            found.push(at);
        }
    }
    found
}

/// The text inside the parentheses `text` starts with, and what follows.
fn parenthesized(text: &str) -> Option<(&str, &str)> {
    if !text.starts_with('(') {
        return None;
    }
    let mut depth = 0usize;
    let mut quoted = false;
    for (at, c) in text.char_indices() {
        match c {
            '\'' => quoted = !quoted,
            '(' if !quoted => depth += 1,
            ')' if !quoted => {
                depth -= 1;
                if depth == 0 {
                    return Some((&text[1..at], &text[at + 1..]));
                }
            }
            _ => {}
        }
    }
    None
}

/// `text` split at its commas outside parentheses and quotes.
fn split_top(text: &str) -> Vec<&str> {
    let (mut parts, mut depth, mut quoted, mut from) = (Vec::new(), 0usize, false, 0);
    for (at, c) in text.char_indices() {
        match c {
            '\'' => quoted = !quoted,
            '(' if !quoted => depth += 1,
            ')' if !quoted => depth = depth.saturating_sub(1),
            ',' if !quoted && depth == 0 => {
                parts.push(&text[from..at]);
                from = at + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[from..]);
    parts
}

/// `k` when `value` is `$k`, with the type of a single cast if it has one
/// (`$k::text`).
fn lone_parameter(value: &str) -> Option<(usize, Option<&str>)> {
    let digits = value.strip_prefix('$')?;
    let end = digits
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(digits.len());
    let k = digits[..end].parse().ok()?;
    match &digits[end..] {
        "" => Some((k, None)),
        after => {
            let cast = after.strip_prefix("::")?;
            cast.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_')
                .then_some((k, Some(cast)))
        }
    }
}

/// Whether `value` is a literal: `true`, `false`, `null`, an integer, or a
/// quoted string without quotes inside, each maybe cast to a plain type
/// name. (Its value is the same at every write.)
fn constant(value: &str) -> bool {
    let (literal, cast) = match value.split_once("::") {
        Some((literal, cast)) => (literal.trim(), Some(cast.trim())),
        None => (value, None),
    };
    let plain_cast = cast.is_none_or(|cast| {
        !cast.is_empty() && cast.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    });
    let digits = literal.strip_prefix('-').unwrap_or(literal);
    let quoted = literal.len() >= 2
        && literal.starts_with('\'')
        && literal.ends_with('\'')
        && !literal[1..literal.len() - 1].contains('\'');
    plain_cast
        && (["true", "false", "null"]
            .iter()
            .any(|word| literal.eq_ignore_ascii_case(word))
            || (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
            || quoted)
}

/// Functions a gathered statement may call: they read no table.
const PLAIN_FUNCTIONS: &[&str] = &[
    "coalesce", "nullif", "greatest", "least", "now", "lower", "upper",
];

/// Whether the values and the conflict clause read nothing but their own
/// row: besides parameters, literals, casts and operators, the values name
/// only the plain functions, `true`, `false` and `NULL`, and the conflict
/// clause has no subquery keyword (`TABLE`, `VALUES`, `FROM`, ...) and
/// calls no other function.
fn only_plain_expressions(values: &[&str], tail: &str) -> bool {
    let values_ok = values.iter().all(|value| {
        words(value).all(|(word, cast, called)| {
            cast || (called && PLAIN_FUNCTIONS.contains(&word.as_str()))
                || (!called && ["true", "false", "null"].contains(&word.as_str()))
        })
    });
    let tail_ok = words(tail).all(|(word, cast, called)| {
        ![
            "table", "values", "from", "join", "lateral", "with", "using",
        ]
        .contains(&word.as_str())
            && (cast || !called || word == "conflict" || PLAIN_FUNCTIONS.contains(&word.as_str()))
    });
    values_ok && tail_ok
}

/// The words of `text` outside quotes, lower case, each with whether it
/// follows `::` (a type) and whether `(` follows it (a call).
fn words(text: &str) -> impl Iterator<Item = (String, bool, bool)> + '_ {
    let bytes = text.as_bytes();
    let part_of_word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let (mut at, mut quoted) = (0, false);
    std::iter::from_fn(move || {
        while at < bytes.len() {
            let b = bytes[at];
            if b == b'\'' {
                quoted = !quoted;
            }
            let starts = !quoted
                && (b.is_ascii_alphabetic() || b == b'_')
                && (at == 0 || !(part_of_word(bytes[at - 1]) || bytes[at - 1] == b'$'));
            if !starts {
                at += 1;
                continue;
            }
            let from = at;
            while at < bytes.len() && part_of_word(bytes[at]) {
                at += 1;
            }
            return Some((
                text[from..at].to_ascii_lowercase(),
                text[..from].trim_end().ends_with("::"),
                text[at..].trim_start().starts_with('('),
            ));
        }
        None
    })
}

/// `value` with each `$k` read from the unnested column `<alias>.pk`;
/// `None` when it names a parameter the statement does not have.
fn renumbered(value: &str, parameters: usize, alias: &str) -> Option<String> {
    let mut out = String::with_capacity(value.len() + 8);
    let mut from = 0;
    for (at, len, k) in parameter_sites(value)? {
        if k == 0 || k > parameters {
            return None;
        }
        out.push_str(&value[from..at]);
        out.push_str(&format!("{alias}.p{k}"));
        from = at + len;
    }
    out.push_str(&value[from..]);
    Some(out)
}

/// One bulk parameter: the `$k` of every write, as a one-dimensional array
/// in PostgreSQL's binary format (the elements are already encoded).
#[derive(Debug)]
pub(crate) struct Column<'w> {
    pub(crate) element: Type,
    /// Borrowed from the queued writes, which outlive the statement.
    pub(crate) items: Vec<Option<&'w [u8]>>,
}

impl ToSql for Column<'_> {
    fn to_sql(
        &self,
        _: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        let length = |n: usize| i32::try_from(n).map_err(|_| "array too long");
        out.extend_from_slice(&1i32.to_be_bytes()); // dimensions
        let nulls = i32::from(self.items.iter().any(Option::is_none));
        out.extend_from_slice(&nulls.to_be_bytes());
        out.extend_from_slice(&self.element.oid().to_be_bytes());
        out.extend_from_slice(&length(self.items.len())?.to_be_bytes());
        out.extend_from_slice(&1i32.to_be_bytes()); // lower bound
        for item in &self.items {
            match item {
                Some(bytes) => {
                    out.extend_from_slice(&length(bytes.len())?.to_be_bytes());
                    out.extend_from_slice(bytes);
                }
                None => out.extend_from_slice(&(-1i32).to_be_bytes()),
            }
        }
        Ok(IsNull::No)
    }

    /// The statement casts each parameter to its array type.
    fn accepts(_: &Type) -> bool {
        true
    }

    tokio_postgres::types::to_sql_checked!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_insert_becomes_an_unnest_insert() {
        let bulk = plan(
            "INSERT INTO c360_timeline (tenant_id, position, occurred_at) \
             VALUES ($1, $2, $3::text::timestamptz) ON CONFLICT (tenant_id, position) DO NOTHING",
            &[Type::TEXT, Type::INT8, Type::TEXT],
        )
        .unwrap();
        assert_eq!(
            bulk.sql,
            "INSERT INTO c360_timeline (tenant_id, position, occurred_at) \
             SELECT u.p1, u.p2, u.p3::text::timestamptz \
             FROM unnest($1::\"text\"[], $2::\"int8\"[], $3::\"text\"[]) AS u(p1, p2, p3) \
             ON CONFLICT (tenant_id, position) DO NOTHING"
        );
        assert_eq!(bulk.key, None);
        assert_eq!(bulk.table(), "c360_timeline");
    }

    #[test]
    fn an_upsert_of_bare_parameters_copies_its_new_rows() {
        let copy = |sql: &str, types: &[Type]| plan(sql, types).and_then(|bulk| bulk.copy);
        // Each column a parameter alone, each taken once: the columns in
        // order, each with its parameter.
        assert_eq!(
            copy(
                "INSERT INTO t (a, b, c) VALUES ($2, $1, $3) ON CONFLICT (a) DO NOTHING",
                &[Type::TEXT, Type::INT8, Type::TIMESTAMPTZ],
            ),
            Some(CopyIn {
                sql: "COPY t (a, b, c) FROM STDIN (FORMAT binary)".to_owned(),
                params: vec![1, 0, 2],
            })
        );
        // A cast (the parameter's type may not be its column's), an
        // expression, a literal, a parameter taken twice: not copied.
        for sql in [
            "INSERT INTO t (a, b) VALUES ($1, $2::text::date) ON CONFLICT (a) DO NOTHING",
            "INSERT INTO t (a, b) VALUES ($1, $2::text) ON CONFLICT (a) DO NOTHING",
            "INSERT INTO t (a, b) VALUES ($1, COALESCE($2, '')) ON CONFLICT (a) DO NOTHING",
            "INSERT INTO t (a, b, c) VALUES ($1, $2, 0) ON CONFLICT (a) DO NOTHING",
            "INSERT INTO t (a, b, c) VALUES ($1, $2, $2) ON CONFLICT (a) DO NOTHING",
        ] {
            assert_eq!(copy(sql, &[Type::TEXT, Type::TEXT]), None, "{sql}");
        }
        // A plain INSERT's rows all may go by COPY; not those of one that
        // handles a conflict without naming its key (nothing tells its
        // rows new).
        assert_eq!(
            copy(
                "INSERT INTO t (a, b) VALUES ($1, $2)",
                &[Type::TEXT, Type::TEXT]
            ),
            Some(CopyIn {
                sql: "COPY t (a, b) FROM STDIN (FORMAT binary)".to_owned(),
                params: vec![0, 1],
            })
        );
        assert_eq!(
            copy(
                "INSERT INTO t (a, b) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                &[Type::TEXT, Type::TEXT]
            ),
            None
        );
    }

    #[test]
    fn typed_literals_move_with_the_parameters() {
        let bulk = plan(
            "INSERT INTO w (a, b, c, d) VALUES ($1, 0, '{}'::text[], $2) ON CONFLICT DO NOTHING",
            &[Type::TEXT, Type::INT8],
        )
        .unwrap();
        assert!(
            bulk.sql.contains("SELECT u.p1, 0, '{}'::text[], u.p2 FROM"),
            "{}",
            bulk.sql
        );
    }

    #[test]
    fn plain_functions_casts_and_conditions_are_allowed() {
        let bulk = plan(
            "INSERT INTO t (a, b, c) VALUES ($1::text, COALESCE($2, now()), $3::text::date) \
             ON CONFLICT (a) DO UPDATE SET b = CASE WHEN EXCLUDED.b IS NULL THEN t.b \
             ELSE greatest(t.b, EXCLUDED.b) END, c = EXCLUDED.c",
            &[Type::TEXT, Type::TIMESTAMPTZ, Type::TEXT],
        )
        .unwrap();
        assert_eq!(bulk.key, Some(vec![0]));
    }

    #[test]
    fn an_upsert_knows_the_parameters_of_its_key() {
        let bulk = plan(
            "INSERT INTO t (a, b, c) VALUES ($2, COALESCE($3, $1), $1) \
             ON CONFLICT (c, a) DO UPDATE SET b = EXCLUDED.b",
            &[Type::UUID, Type::TEXT, Type::TEXT],
        )
        .unwrap();
        assert_eq!(bulk.key, Some(vec![0, 1]));
        assert!(
            bulk.sql
                .contains("SELECT u.p2, COALESCE(u.p3, u.p1), u.p1 FROM")
        );
        assert!(
            bulk.sql
                .ends_with("ON CONFLICT (c, a) DO UPDATE SET b = EXCLUDED.b")
        );
    }

    #[test]
    fn statements_that_read_or_take_parameters_elsewhere_stay_single() {
        let text = [Type::TEXT, Type::TEXT];
        for sql in [
            // a parameter outside VALUES
            "INSERT INTO t (a, b) VALUES ($1, $2) ON CONFLICT (a) DO UPDATE SET b = $2",
            // reads another table
            "INSERT INTO t (a, b) SELECT $1, max(b) FROM u WHERE a = $2",
            "INSERT INTO t (a, b) VALUES ($1, (SELECT b FROM u WHERE a = $2))",
            // the key is computed
            "INSERT INTO t (a, b) VALUES (lower($1), $2) ON CONFLICT (a) DO UPDATE SET b = 1",
            "INSERT INTO t (a, b) VALUES ($1, $2) RETURNING a",
            // reads another table without the word SELECT
            "INSERT INTO t (a, b) VALUES ($1, (TABLE u LIMIT 1))",
            "INSERT INTO t (a, b) VALUES ($1, (VALUES ($2)))",
            "INSERT INTO t (a, b) VALUES ($1, lookup($2))",
            "INSERT INTO t (a, b) VALUES ($1, $2) ON CONFLICT (a) DO UPDATE SET b = lookup(t.b)",
            "INSERT INTO t (a, b) VALUES ($1, $2) ON CONFLICT (a) DO UPDATE SET b = (TABLE u)",
            // a key cast to another type
            "INSERT INTO t (a, b) VALUES ($1::text::uuid, $2) ON CONFLICT (a) DO UPDATE SET b = EXCLUDED.b",
            "INSERT INTO t (a, b) VALUES ($1::uuid, $2) ON CONFLICT (a) DO UPDATE SET b = EXCLUDED.b",
            // a bare literal takes its type from the column
            "INSERT INTO t (a, b, c) VALUES ($1, $2, NULL)",
        ] {
            assert!(plan(sql, &text).is_none(), "{sql}");
        }
        assert!(plan("INSERT INTO t (a) VALUES ($1)", &[Type::TEXT_ARRAY]).is_none());
        // a key whose equal values may differ in bytes (1.0 and 1)
        let numeric = [Type::NUMERIC, Type::TEXT];
        for sql in [
            "INSERT INTO t (a, b) VALUES ($1, $2) ON CONFLICT (a) DO UPDATE SET b = EXCLUDED.b",
            "UPDATE t SET b = $2 WHERE a = $1",
        ] {
            assert!(plan(sql, &numeric).is_none(), "{sql}");
        }
    }

    #[test]
    fn a_keyed_update_becomes_an_update_from_unnest() {
        let bulk = plan(
            "UPDATE sales_funnel_deals SET owner = $3, \
               closed_at = CASE WHEN $4 THEN $5 ELSE closed_at END \
             WHERE tenant_id = $1 AND deal_id = $2 AND exited_at IS NULL",
            &[
                Type::TEXT,
                Type::UUID,
                Type::TEXT,
                Type::BOOL,
                Type::TIMESTAMPTZ,
            ],
        )
        .unwrap();
        assert_eq!(
            bulk.sql,
            "UPDATE sales_funnel_deals SET owner = gathered_writes.p3, \
               closed_at = CASE WHEN gathered_writes.p4 THEN gathered_writes.p5 ELSE closed_at END \
             FROM unnest($1::\"text\"[], $2::\"uuid\"[], $3::\"text\"[], $4::\"bool\"[], \
             $5::\"timestamptz\"[]) AS gathered_writes(p1, p2, p3, p4, p5) \
             WHERE tenant_id = gathered_writes.p1 AND deal_id = gathered_writes.p2 \
             AND exited_at IS NULL"
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
                .replace("( ", "(")
        );
        assert_eq!(bulk.key, Some(vec![0, 1]));
        assert_eq!(bulk.table(), "sales_funnel_deals");
    }

    #[test]
    fn updates_that_read_or_have_no_key_stay_single() {
        let text = [Type::TEXT, Type::TEXT];
        for sql in [
            // no key: every write could touch the same rows
            "UPDATE t SET b = $2 WHERE a > $1",
            "UPDATE t SET b = $2 WHERE a <> $1",
            "UPDATE t SET b = $2",
            // OR: the conjuncts are not all conditions
            "UPDATE t SET b = $2 WHERE a = $1 OR b IS NULL",
            // reads another table
            "UPDATE t SET b = (SELECT max(b) FROM u) WHERE a = $1 AND c = $2",
            "UPDATE t SET b = $2 FROM u WHERE t.a = u.a AND u.b = $1",
            "UPDATE t SET b = lookup($2) WHERE a = $1",
            "UPDATE t SET b = $2 WHERE a = $1 RETURNING b",
            // a key cast to another type
            "UPDATE t SET b = $2 WHERE a = $1::uuid",
            // a row moved to another key, also where the text hides it
            "UPDATE t SET b = $2, A = $2 WHERE a = $1",
            "UPDATE t SET (b, a) = ($2, $2) WHERE a = $1",
            "UPDATE t SET \"a\" = $2 WHERE a = $1",
            // text the word checks cannot read: escapes, comments, BETWEEN
            "UPDATE t SET b = E'\\'' WHERE a = $1 AND b = (SELECT 1) AND c = $2",
            "UPDATE t SET b = $2 WHERE a = $1 -- AND (TABLE u)",
            "UPDATE t SET b = $2 /* FROM u */ WHERE a = $1",
            "UPDATE t SET b = $2 WHERE b BETWEEN $2 AND a = $1",
            // names that could be taken for the unnested columns
            "UPDATE t SET p1 = $2 WHERE a = $1",
            "UPDATE t SET b = $2 WHERE a = $1 AND gathered_writes IS NULL",
        ] {
            assert!(plan(sql, &text).is_none(), "{sql}");
        }
    }

    #[test]
    fn scoped_writes_name_their_columns_and_parameters() {
        let text3 = [Type::UUID, Type::TEXT, Type::TEXT];
        let scope = |sql: &str| plan(sql, &text3).and_then(|bulk| bulk.scope);
        let expected = Some(Scope {
            columns: vec!["a".into(), "c".into()],
            params: vec![1, 0],
        });
        assert_eq!(
            scope("INSERT INTO t (a, b, c) VALUES ($2, $3, $1) ON CONFLICT (c, a) DO NOTHING"),
            expected
        );
        assert_eq!(
            scope(
                "INSERT INTO t (a, b, c) VALUES ($2, $3, $1) ON CONFLICT (c, a) \
                 DO UPDATE SET b = EXCLUDED.b"
            ),
            expected
        );
        assert_eq!(
            scope("UPDATE t SET b = $3 WHERE c = $1 AND a = $2 AND b IS NULL"),
            expected
        );
        for sql in [
            // no conflict target: which rows it may meet is unknown
            "INSERT INTO t (a, b, c) VALUES ($2, $3, $1)",
            "INSERT INTO t (a, b, c) VALUES ($2, $3, $1) ON CONFLICT DO NOTHING",
            // moves a row to another key, or updates only some
            "INSERT INTO t (a, b, c) VALUES ($2, $3, $1) ON CONFLICT (a) DO UPDATE SET a = EXCLUDED.b",
            "INSERT INTO t (a, b, c) VALUES ($2, $3, $1) ON CONFLICT (a) DO UPDATE SET b = EXCLUDED.b \
             WHERE t.b IS NULL",
            "INSERT INTO t (a, b, c) VALUES ($2, $3, $1) ON CONFLICT (a) DO UPDATE SET (b, a) = (1, 2)",
        ] {
            assert_eq!(scope(sql), None, "{sql}");
        }
    }

    #[test]
    fn writes_of_one_key_collapse_only_where_one_stands_for_all() {
        let text4 = [Type::UUID, Type::TEXT, Type::TEXT, Type::TEXT];
        let collapse = |sql: &str| plan(sql, &text4).and_then(|bulk| bulk.collapse);
        let last = |keep: &[usize]| {
            Some(Collapse::Last {
                keep: keep.to_vec(),
            })
        };
        for (sql, expected) in [
            (
                "INSERT INTO t (a, b, c) VALUES ($1, $2, $3) ON CONFLICT (a) DO NOTHING",
                Some(Collapse::First),
            ),
            (
                "INSERT INTO t (a, b, c) VALUES ($1, $2, $3) ON CONFLICT (a) \
                 DO UPDATE SET c = excluded.c, B = EXCLUDED.b",
                last(&[]),
            ),
            // c is set when the row is inserted and kept after: its
            // parameters come from the first write
            (
                "INSERT INTO t (a, b, c) VALUES ($1, $2, COALESCE($3, $4::text)) \
                 ON CONFLICT (a) DO UPDATE SET b = EXCLUDED.b",
                last(&[2, 3]),
            ),
            ("UPDATE t SET b = $2, c = $3::text WHERE a = $1", last(&[])),
            // Literals are the same at every write.
            ("UPDATE t SET b = $2, c = false WHERE a = $1", last(&[])),
            (
                "UPDATE t SET b = 'x'::text, c = NULL, d = -3 WHERE a = $1",
                last(&[]),
            ),
            // A column, a call, or a quote inside a string: not a literal.
            ("UPDATE t SET b = c WHERE a = $1", None),
            ("UPDATE t SET b = now() WHERE a = $1", None),
            ("UPDATE t SET b = 'it''s' WHERE a = $1", None),
            // one parameter feeds a kept column and a set one
            (
                "INSERT INTO t (a, b, c) VALUES ($1, $2, COALESCE($3, $2)) \
                 ON CONFLICT (a) DO UPDATE SET b = EXCLUDED.b",
                None,
            ),
            // a value that depends on the row
            (
                "INSERT INTO t (a, b, c) VALUES ($1, $2, $3) ON CONFLICT (a) \
                 DO UPDATE SET b = EXCLUDED.b, c = coalesce(t.c, EXCLUDED.c)",
                None,
            ),
            (
                "INSERT INTO t (a, b, c) VALUES ($1, $2, $3) ON CONFLICT (a) \
                 DO UPDATE SET b = EXCLUDED.c, c = EXCLUDED.b",
                None,
            ),
            ("UPDATE t SET b = b || $2, c = $3 WHERE a = $1", None),
            ("UPDATE t SET b = coalesce($2, 'x') WHERE a = $1", None),
            // a condition besides the key: an earlier write may change
            // whether a later one applies
            ("UPDATE t SET b = $2 WHERE a = $1 AND c IS NULL", None),
            ("UPDATE t SET b = $2 WHERE a = $1 AND c = $3", last(&[])),
            // no scope: not gathered by key at all
            (
                "INSERT INTO t (a, b, c) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                None,
            ),
            ("INSERT INTO t (a, b, c) VALUES ($1, $2, $3)", None),
        ] {
            assert_eq!(collapse(sql), expected, "{sql}");
        }
    }

    #[test]
    fn a_keyed_delete_becomes_a_delete_using_unnest() {
        let bulk = plan(
            "DELETE FROM c360_about WHERE tenant_id = $1 AND stream_id = $2",
            &[Type::TEXT, Type::UUID],
        )
        .expect("gathered");
        assert_eq!(
            bulk.sql,
            "DELETE FROM c360_about USING unnest($1::\"text\"[], $2::\"uuid\"[]) \
             AS gathered_writes(p1, p2) \
             WHERE tenant_id = gathered_writes.p1 AND stream_id = gathered_writes.p2"
        );
        assert_eq!(
            bulk.scope,
            Some(Scope {
                columns: vec!["stream_id".into(), "tenant_id".into()],
                params: vec![1, 0],
            })
        );
        assert_eq!(bulk.collapse, Some(Collapse::First));
        assert!(bulk.needs_scope);
        for sql in [
            // a condition that is not a key's
            "DELETE FROM t WHERE a = $1 AND b IS NULL",
            "DELETE FROM t WHERE a = $1 AND b > $2",
            "DELETE FROM t WHERE a = $1 OR b = $2",
            "DELETE FROM t WHERE a = $1 AND b IN (SELECT b FROM u)",
            "DELETE FROM t",
            "DELETE FROM t WHERE a = $1 RETURNING a",
            "DELETE FROM t USING u WHERE a = $1",
            // a column named like an unnested parameter
            "DELETE FROM t WHERE p1 = $1",
        ] {
            assert!(plan(sql, &[Type::TEXT, Type::TEXT]).is_none(), "{sql}");
        }
    }

    #[test]
    fn words_split_only_outside_parentheses_and_quotes() {
        assert_eq!(
            split_at_words("a = 1 AND (b AND c) AND d = 'x and y'", "and"),
            vec!["a = 1 ", " (b AND c) ", " d = 'x and y'"]
        );
        assert_eq!(split_at_word("brand = 1", "and"), None);
        assert_eq!(split_at_word("x WHERE y", "where"), Some(("x ", " y")));
    }

    #[test]
    fn a_table_is_mentioned_only_as_a_whole_word() {
        let shape = shape("DELETE FROM c360_about_x WHERE a = $1", &[Type::TEXT]);
        assert!(!shape.mentions("c360_about"));
        assert!(shape.mentions("c360_about_x"));
        let shape = shape_of("UPDATE c360_about SET a = 1");
        assert!(shape.mentions("c360_about"));
    }

    fn shape_of(sql: &str) -> Arc<Shape> {
        shape(sql, &[])
    }

    #[test]
    fn a_keyed_update_of_parameters_folds_into_an_insert_of_its_row() {
        use Type as T;
        let insert = plan(
            "INSERT INTO deals (tenant_id, deal_id, stage, since, seen, note) \
             VALUES ($1, $2, $3, $4, $4, $5::text) ON CONFLICT (tenant_id, deal_id) DO NOTHING",
            &[T::TEXT, T::UUID, T::TEXT, T::TIMESTAMPTZ, T::TEXT],
        )
        .unwrap();
        // `since` and `seen` share $4: neither can take an UPDATE's value.
        assert_eq!(
            insert.fed,
            [("tenant_id", 0), ("deal_id", 1), ("stage", 2), ("note", 4)]
                .map(|(c, k)| (c.to_owned(), k))
        );
        let update = |sql: &str, types: &[Type]| plan(sql, types).unwrap();
        let stage = update(
            "UPDATE deals SET note = $4, stage = $3 WHERE deal_id = $2 AND tenant_id = $1",
            &[T::TEXT, T::UUID, T::TEXT, T::TEXT],
        );
        assert_eq!(fold(&insert, &stage), Some(vec![(4, 3), (2, 2)]));
        // Not: a column the insert does not feed alone, a value that is
        // not a parameter, a parameter of another type, a condition beyond
        // the key, a key that is not the conflict target's, a key
        // parameter of another type.
        for (sql, types) in [
            (
                "UPDATE deals SET since = $3 WHERE tenant_id = $1 AND deal_id = $2",
                &[T::TEXT, T::UUID, T::TIMESTAMPTZ][..],
            ),
            (
                "UPDATE deals SET stage = 'won' WHERE tenant_id = $1 AND deal_id = $2",
                &[T::TEXT, T::UUID][..],
            ),
            (
                "UPDATE deals SET stage = $3 WHERE tenant_id = $1 AND deal_id = $2",
                &[T::TEXT, T::UUID, T::VARCHAR][..],
            ),
            (
                "UPDATE deals SET stage = $3 WHERE tenant_id = $1 AND deal_id = $2 AND note IS NULL",
                &[T::TEXT, T::UUID, T::TEXT][..],
            ),
            (
                "UPDATE deals SET stage = $2 WHERE deal_id = $1",
                &[T::UUID, T::TEXT][..],
            ),
            (
                "UPDATE deals SET stage = $3 WHERE tenant_id = $1 AND deal_id = $2",
                &[T::VARCHAR, T::UUID, T::TEXT][..],
            ),
        ] {
            assert_eq!(fold(&insert, &update(sql, types)), None, "{sql}");
        }
        // Nor into an insert without a conflict target (its keys unknown).
        let blind = plan(
            "INSERT INTO deals (tenant_id, deal_id, stage) VALUES ($1, $2, $3)",
            &[T::TEXT, T::UUID, T::TEXT],
        )
        .unwrap();
        assert_eq!(fold(&blind, &stage), None);
    }
}
