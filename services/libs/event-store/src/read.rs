//! Reads: one stream forward from a version, and the whole log from a position,
//! streamed row by row from the server (no paging), so a reader runs close to
//! the speed of a plain SELECT.
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::SystemTime;

use crm_domain::TenantId;
use deadpool_postgres::Object;
use futures_util::Stream;
use tokio_postgres::{Row, RowStream};
use uuid::Uuid;

use crate::{JsonText, ReadError};

/// An event as stored, with its full envelope.
#[derive(Clone, Debug, PartialEq)]
pub struct RecordedEvent {
    pub global_position: u64,
    pub event_id: Uuid,
    pub tenant_id: String,
    pub stream_type: String,
    pub stream_id: Uuid,
    pub stream_version: u64,
    pub event_type: String,
    pub schema_version: u32,
    pub payload: JsonText,
    pub metadata: JsonText,
    pub recorded_at: SystemTime,
    /// The payload as a reader decoded it, for the others that share this
    /// event (see [`Decoded`]); empty as read.
    pub decoded: Decoded,
}

/// What an event's payload was decoded to, kept with the event so that the
/// readers sharing one event (a rebuild hands each event to every read
/// model) decode it once: the first type asked for is kept, others are
/// decoded each time. An event as read keeps nothing ([`Decoded::shared`]
/// makes one that does). Not part of the event's value: a clone starts
/// empty and any two are equal.
#[derive(Default)]
pub struct Decoded {
    keep: bool,
    kept: std::sync::OnceLock<std::sync::Arc<dyn std::any::Any + Send + Sync>>,
}

/// A payload decoded by [`Decoded::get_or_decode`]: shared with the event's
/// other readers, or this reader's own.
pub enum DecodedAs<T> {
    Shared(std::sync::Arc<T>),
    Own(T),
}

impl<T> std::ops::Deref for DecodedAs<T> {
    type Target = T;

    fn deref(&self) -> &T {
        match self {
            Self::Shared(shared) => shared,
            Self::Own(own) => own,
        }
    }
}

impl Decoded {
    /// A memo that keeps the first payload decoded, for an event that
    /// several readers share.
    pub fn shared() -> Self {
        Self {
            keep: true,
            kept: std::sync::OnceLock::new(),
        }
    }

    /// The payload as a `T`, by `decode` (`Ok(None)`: not a `T`'s) unless
    /// a `T` is kept already; where this memo keeps, the first `T` decoded
    /// is kept.
    pub fn get_or_decode<T: std::any::Any + Send + Sync, E>(
        &self,
        decode: impl FnOnce() -> Result<Option<T>, E>,
    ) -> Result<Option<DecodedAs<T>>, E> {
        if !self.keep {
            return Ok(decode()?.map(DecodedAs::Own));
        }
        if let Some(kept) = self.kept.get() {
            if let Ok(kept) = std::sync::Arc::clone(kept).downcast::<T>() {
                return Ok(Some(DecodedAs::Shared(kept)));
            }
            return Ok(decode()?.map(DecodedAs::Own));
        }
        let Some(decoded) = decode()? else {
            return Ok(None);
        };
        let decoded = std::sync::Arc::new(decoded);
        // Another reader may have kept one meanwhile: either serves.
        let _ = self.kept.set(decoded.clone());
        Ok(Some(DecodedAs::Shared(decoded)))
    }
}

impl Clone for Decoded {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl PartialEq for Decoded {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl std::fmt::Debug for Decoded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.kept.get() {
            Some(_) => "Decoded(kept)",
            None => "Decoded(empty)",
        })
    }
}

/// Which events a log read returns. Empty lists mean "all".
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub tenant_id: Option<TenantId>,
    pub stream_types: Vec<String>,
    pub event_types: Vec<String>,
    pub stream_id: Option<Uuid>,
}

impl Filter {
    pub fn tenant(tenant_id: TenantId) -> Self {
        Self {
            tenant_id: Some(tenant_id),
            ..Self::default()
        }
    }

    pub(crate) fn is_everything(&self) -> bool {
        self.tenant_id.is_none()
            && self.stream_types.is_empty()
            && self.event_types.is_empty()
            && self.stream_id.is_none()
    }
}

/// The envelope columns in the order `decode` reads them.
macro_rules! select_events {
    ($($rest:literal),*) => {
        concat!(
            "SELECT global_position, event_id, tenant_id, stream_type, stream_id, \
             stream_version, event_type, schema_version, payload, metadata, recorded_at \
             FROM events ",
            $($rest),*
        )
    };
}
pub(crate) use select_events;

/// Events after `$1` up to and including `$2`, filtered. The `IS NULL` /
/// `cardinality` guards fold away when the plan is made for real values.
macro_rules! filtered_range {
    ($($rest:literal),*) => {
        select_events!(
            "WHERE global_position > $1 AND global_position <= $2 \
               AND ($3::text IS NULL OR tenant_id = $3) \
               AND (cardinality($4::text[]) = 0 OR stream_type = ANY($4)) \
               AND (cardinality($5::text[]) = 0 OR event_type = ANY($5)) \
               AND ($6::uuid IS NULL OR stream_id = $6) \
             ORDER BY global_position"
            $(, $rest)*
        )
    };
}

pub(crate) const READ_RANGE: &str = filtered_range!();

/// The same without filters: a plain primary-key range scan.
pub(crate) const READ_RANGE_ALL: &str =
    select_events!("WHERE global_position > $1 AND global_position <= $2 ORDER BY global_position");

/// The same, at most `$7` rows (filtered) or `$3` (unfiltered), for chunked
/// reads.
const READ_CHUNK: &str = filtered_range!(" LIMIT $7");
const READ_CHUNK_ALL: &str = select_events!(
    "WHERE global_position > $1 AND global_position <= $2 ORDER BY global_position LIMIT $3"
);

/// At most `limit` events after `after` up to `up_to`, filtered, collected.
pub(crate) async fn read_chunk(
    client: &deadpool_postgres::Client,
    after: u64,
    up_to: u64,
    filter: &Filter,
    limit: usize,
) -> Result<Vec<RecordedEvent>, ReadError> {
    let after = to_i64(after, "from_position")?;
    let up_to = to_i64(up_to, "up_to")?;
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let rows = if filter.is_everything() {
        let statement = client.prepare_cached(READ_CHUNK_ALL).await?;
        client.query(&statement, &[&after, &up_to, &limit]).await?
    } else {
        let statement = client.prepare_cached(READ_CHUNK).await?;
        let tenant = filter.tenant_id.as_ref().map(TenantId::as_str);
        client
            .query(
                &statement,
                &[
                    &after,
                    &up_to,
                    &tenant,
                    &filter.stream_types,
                    &filter.event_types,
                    &filter.stream_id,
                    &limit,
                ],
            )
            .await?
    };
    rows.iter().map(decode).collect()
}

/// A row of the envelope columns in their order (as [`crate::READ_STREAM`]
/// selects them), as the event it stores.
pub fn decode(row: &Row) -> Result<RecordedEvent, ReadError> {
    let position: i64 = row.try_get(0)?;
    let version: i64 = row.try_get(5)?;
    let schema_version: i32 = row.try_get(7)?;
    let corrupt = |what: &str| ReadError::Corrupt(format!("{what} out of range at {position}"));
    Ok(RecordedEvent {
        global_position: u64::try_from(position).map_err(|_| corrupt("position"))?,
        event_id: row.try_get(1)?,
        tenant_id: row.try_get(2)?,
        stream_type: row.try_get(3)?,
        stream_id: row.try_get(4)?,
        stream_version: u64::try_from(version).map_err(|_| corrupt("stream_version"))?,
        event_type: row.try_get(6)?,
        schema_version: u32::try_from(schema_version).map_err(|_| corrupt("schema_version"))?,
        payload: row.try_get(8)?,
        metadata: row.try_get(9)?,
        recorded_at: row.try_get(10)?,
        decoded: Decoded::default(),
    })
}

/// Starts a streamed range read on `client`.
pub(crate) async fn read_range(
    client: Object,
    after: u64,
    up_to: u64,
    filter: &Filter,
) -> Result<EventStream, ReadError> {
    let after = to_i64(after, "from_position")?;
    let up_to = to_i64(up_to, "up_to")?;
    let rows = if filter.is_everything() {
        let statement = client.prepare_cached(READ_RANGE_ALL).await?;
        client
            .query_raw(
                &statement,
                [&after as &(dyn tokio_postgres::types::ToSql + Sync), &up_to],
            )
            .await?
    } else {
        let statement = client.prepare_cached(READ_RANGE).await?;
        let tenant = filter.tenant_id.as_ref().map(TenantId::as_str);
        client
            .query_raw(
                &statement,
                [
                    &after as &(dyn tokio_postgres::types::ToSql + Sync),
                    &up_to,
                    &tenant,
                    &filter.stream_types,
                    &filter.event_types,
                    &filter.stream_id,
                ],
            )
            .await?
    };
    Ok(EventStream {
        rows: Box::pin(rows),
        _client: client,
    })
}

pub(crate) fn to_i64(value: u64, field: &'static str) -> Result<i64, ReadError> {
    i64::try_from(value).map_err(|_| ReadError::Invalid {
        field,
        rule: "must be below 2^63",
    })
}

/// Events streamed from the server in position order. Holds its connection
/// until dropped.
pub struct EventStream {
    rows: Pin<Box<RowStream>>,
    _client: Object,
}

impl Stream for EventStream {
    type Item = Result<RecordedEvent, ReadError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match ready!(self.rows.as_mut().poll_next(cx)) {
            Some(Ok(row)) => Poll::Ready(Some(decode(&row))),
            Some(Err(error)) => Poll::Ready(Some(Err(error.into()))),
            None => Poll::Ready(None),
        }
    }
}

#[cfg(test)]
mod decoded_tests {
    use super::{Decoded, DecodedAs};

    #[test]
    fn a_shared_memo_decodes_once_per_event_and_an_unshared_one_every_time() {
        let mut calls = 0;
        let mut decode = |n: u32| {
            calls += 1;
            Ok::<_, ()>(Some(n))
        };
        let shared = Decoded::shared();
        let first = shared.get_or_decode(|| decode(7)).unwrap().unwrap();
        assert!(matches!(first, DecodedAs::Shared(_)));
        // The kept value is given again, not decoded.
        let again = shared.get_or_decode(|| decode(8)).unwrap().unwrap();
        assert!(matches!(again, DecodedAs::Shared(_)));
        assert_eq!((*first, *again), (7, 7));
        // Another type is decoded, and not kept.
        let other = shared
            .get_or_decode(|| Ok::<_, ()>(Some("x")))
            .unwrap()
            .unwrap();
        assert!(matches!(other, DecodedAs::Own("x")));
        // Not a T's: nothing kept.
        let none = Decoded::shared();
        assert!(
            none.get_or_decode(|| Ok::<Option<u32>, ()>(None))
                .unwrap()
                .is_none()
        );
        assert!(matches!(
            none.get_or_decode(|| decode(9)).unwrap(),
            Some(DecodedAs::Shared(_))
        ));
        // An event as read keeps nothing.
        let own = Decoded::default();
        assert!(matches!(
            own.get_or_decode(|| decode(1)).unwrap(),
            Some(DecodedAs::Own(1))
        ));
        assert!(matches!(
            own.get_or_decode(|| decode(2)).unwrap(),
            Some(DecodedAs::Own(2))
        ));
        assert_eq!(calls, 4);
        // A clone starts empty.
        let clone = shared.clone();
        assert!(matches!(
            clone.get_or_decode(|| Ok::<_, ()>(Some(3u32))).unwrap(),
            Some(DecodedAs::Own(3))
        ));
    }
}
