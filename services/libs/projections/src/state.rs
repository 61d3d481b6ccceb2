//! Read models that keep an aggregate's state per row: the domain's own
//! `evolve` decides what an event means, the projection only derives columns.
//!
//! A row's `state` is the fold of its stream's events up to the row's
//! `position`. Where only the projection itself reads it back (to evolve it
//! at the stream's next event), a rebuild leaves it out ([`cached`]: NULL),
//! and the next event derives it from the stream's earlier events in the
//! store instead ([`evolve_row`]). Serializing every row's state into a
//! rebuild's tables cost about a sixth of the rebuild's time
//! (`docs/benchmarks.md`); after a rebuild each stream pays one read of
//! its own events, once, at its next event.
use crm_domain::{Aggregate, DomainEvent};
use crm_event_store::RecordedEvent;

use crate::runtime::ApplyError;

/// Decodes `event` as one of `A`'s, loads the row's stored state with
/// `select` (`$1` tenant, `$2` stream id, one `state` column; a NULL state,
/// left out by a rebuild, is folded from the stream's earlier events in the
/// store) and evolves it. `None` when the event is not `A`'s.
pub(crate) async fn evolve_row<A: Aggregate + Send + 'static>(
    tx: &crate::Tx<'_>,
    select: &'static str,
    event: &RecordedEvent,
) -> Result<Option<(A, crm_event_store::DecodedAs<A::Event>)>, ApplyError>
where
    A::Event: Send + Sync + 'static,
{
    if event.stream_type != A::STREAM_TYPE {
        return Ok(None);
    }
    let malformed = |reason: String| ApplyError::Payload {
        event_type: event.event_type.clone(),
        reason,
    };
    let Some(decoded) = decoded::<A::Event>(event)? else {
        return Ok(None);
    };
    if let Some(state) = tx
        .cache()
        .and_then(|cache| cache.take::<A>(select, &event.tenant_id, event.stream_id))
    {
        return Ok(Some((state.evolve(&decoded), decoded)));
    }
    if first_of_stream(event) {
        return Ok(Some((A::default().evolve(&decoded), decoded)));
    }
    let stored = tx
        .query_opt(select, &[&event.tenant_id, &event.stream_id])
        .await?;
    let state: A = match stored {
        Some(row) => match row.try_get::<_, Option<serde_json::Value>>(0)? {
            Some(state) => serde_json::from_value(state)
                .map_err(|e| malformed(format!("stored state: {e}")))?,
            None => replayed::<A>(tx, event).await?,
        },
        None => A::default(),
    };
    let evolved = state.evolve(&decoded);
    Ok(Some((evolved, decoded)))
}

/// The state of `event`'s stream just before it: its earlier events, read
/// from the store in the projection's transaction, folded from the start.
/// An earlier event that does not decode is a poison event, as it would
/// have been when it was applied.
async fn replayed<A: Aggregate>(
    tx: &crate::Tx<'_>,
    event: &RecordedEvent,
) -> Result<A, ApplyError> {
    let earlier = i64::try_from(event.stream_version.saturating_sub(1)).unwrap_or(i64::MAX);
    let rows = tx
        .query(
            crm_event_store::READ_STREAM,
            &[&event.tenant_id, &event.stream_id, &1_i64, &earlier],
        )
        .await?;
    let mut state = A::default();
    for row in &rows {
        let earlier = crm_event_store::decode_row(row).map_err(|e| ApplyError::Payload {
            event_type: event.event_type.clone(),
            reason: format!("the stream's earlier events: {e}"),
        })?;
        if let Some(decoded) = decode::<A::Event>(&earlier)? {
            state = state.evolve(&decoded);
        }
    }
    Ok(state)
}

/// Whether `event` is its stream's first: a row kept for the stream cannot
/// exist yet (only the stream's own events write its row, each event is
/// applied once, and a rebuild's tables start empty), so there is nothing to
/// read.
pub(crate) fn first_of_stream(event: &RecordedEvent) -> bool {
    event.stream_version == 1
}

/// A state [`evolve_row`] gave, which a rebuild puts back into its cache
/// (moved, not cloned) when the projection is done with it: once the guard
/// goes out of scope, whichever way the projection's code leaves.
pub(crate) struct Kept<'c, A: Send + 'static> {
    state: Option<A>,
    cache: Option<&'c crate::runtime::StateCache>,
    select: &'static str,
    event: &'c RecordedEvent,
}

impl<A: Send + 'static> std::ops::Deref for Kept<'_, A> {
    type Target = A;

    fn deref(&self) -> &A {
        self.state
            .as_ref()
            .expect("a kept state is there until dropped")
    }
}

impl<A: Send + 'static> Drop for Kept<'_, A> {
    fn drop(&mut self) {
        if let (Some(cache), Some(state)) = (self.cache, self.state.take()) {
            cache.put(
                self.select,
                &self.event.tenant_id,
                self.event.stream_id,
                state,
            );
        }
    }
}

/// `state`, to be written to the row `select` (given to [`evolve_row`])
/// reads for `event`'s stream: a rebuild remembers it once the returned
/// guard is dropped (write the row before a later event of the stream is
/// applied, as every projection does within its `apply`).
pub(crate) fn kept<'c, A: Send + 'static>(
    tx: &'c crate::Tx<'_>,
    select: &'static str,
    event: &'c RecordedEvent,
    state: A,
) -> Kept<'c, A> {
    Kept {
        state: Some(state),
        cache: tx.cache(),
        select,
        event,
    }
}

/// After `state` has been written to the row `select` (given to
/// [`evolve_row`]) reads for `event`'s stream: a rebuild remembers it.
pub(crate) fn written<A: Send + 'static>(
    tx: &crate::Tx<'_>,
    select: &'static str,
    event: &RecordedEvent,
    state: A,
) {
    if let Some(cache) = tx.cache() {
        cache.put(select, &event.tenant_id, event.stream_id, state);
    }
}

/// [`decode`], decoded once for all the read models given this event when
/// they share it (a rebuild's: see [`crm_event_store::Decoded`]).
pub(crate) fn decoded<E: DomainEvent + Send + Sync + 'static>(
    event: &RecordedEvent,
) -> Result<Option<crm_event_store::DecodedAs<E>>, ApplyError> {
    event.decoded.get_or_decode(|| decode::<E>(event))
}

/// `event` as one of `E`'s, or `None` when it is not; a payload that does
/// not decode is a poison event.
pub fn decode<E: DomainEvent>(event: &RecordedEvent) -> Result<Option<E>, ApplyError> {
    let mut payload = serde_json::Deserializer::from_str(event.payload.as_str());
    E::decode(&event.event_type, event.schema_version, &mut payload).map_err(|e| {
        ApplyError::Payload {
            event_type: event.event_type.clone(),
            reason: e.to_string(),
        }
    })
}

/// `state` as a `json` parameter, serialized straight into the message
/// (no `serde_json::Value` tree on the way) and stored as written: `json`,
/// not `jsonb`, whose parse and rebuild at every write cost twice as much
/// (1.29 s against 0.75 s for 154,000 rows of 724 bytes). A `jsonb` column
/// left by an earlier version takes the same parameter and reads back the
/// same; it becomes `json` at the projection's next rebuild (not converted
/// in place: that would lock the table, and break the cached statements of
/// a running older projector).
/// `state` as the `json` parameter of a row's `state` that only the
/// projection reads back ([`evolve_row`]): [`stored`] when applied live,
/// NULL in a rebuild (see the module's docs). A column queries read takes
/// [`stored`].
pub(crate) fn cached<'s, T: serde::Serialize + std::fmt::Debug>(
    tx: &crate::Tx<'_>,
    state: &'s T,
) -> Option<tokio_postgres::types::Json<&'s T>> {
    tx.cache().is_none().then(|| stored(state))
}

pub(crate) fn stored<T: serde::Serialize + std::fmt::Debug>(
    state: &T,
) -> tokio_postgres::types::Json<&T> {
    tokio_postgres::types::Json(state)
}

/// `time` as a `timestamptz` holds it: whole microseconds, cut toward
/// 2000-01-01 (PostgreSQL's epoch), as tokio-postgres sends it.
pub(crate) fn to_microseconds(time: std::time::SystemTime) -> std::time::SystemTime {
    use std::time::{Duration, UNIX_EPOCH};
    let epoch = UNIX_EPOCH + Duration::from_secs(946_684_800);
    let cut = |d: Duration| Duration::new(d.as_secs(), d.subsec_micros() * 1_000);
    match time.duration_since(epoch) {
        Ok(after) => epoch + cut(after),
        Err(before) => epoch - cut(before.duration()),
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn times_are_cut_to_the_microsecond_toward_2000() {
        let after = UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789);
        assert_eq!(
            super::to_microseconds(after),
            UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_000)
        );
        // 1999-12-31T23:59:59.000000500 is 0.9999995 s before 2000: it
        // keeps 0.999999 s of that, so goes up.
        let before = UNIX_EPOCH + Duration::new(946_684_799, 500);
        assert_eq!(
            super::to_microseconds(before),
            UNIX_EPOCH + Duration::new(946_684_799, 1_000)
        );
    }
}
