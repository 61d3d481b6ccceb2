//! `crm.v1.EventLog`: replay and follow the log over gRPC.
//!
//! Subscriptions read the store in chunks into a bounded buffer and send what
//! is ready in batches; HTTP/2 flow control stops the sending when the client
//! stops reading, which stops the reader, so a slow client holds a bounded
//! amount of memory and no database connection. Open streams per process are
//! limited; at shutdown each ends with UNAVAILABLE so the client resumes
//! elsewhere from its last position.
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use crm_domain::TenantId;
use crm_event_store::{EventStore, Filter, RecordedEvent};
use crm_proto::v1::event_log_server::EventLog;
use crm_proto::v1::{
    Event, EventBatch, EventFilter, ReadAllRequest, ReadDirection, ReadStreamReply,
    ReadStreamRequest, SubscribeRequest,
};
use futures_util::{Stream, StreamExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::command::{Caller, ServiceError};

/// Most events in one `EventBatch`.
const BATCH: usize = 256;
/// Most encoded bytes of one `EventBatch` or `ReadStreamReply`, but always
/// at least one event: well under the 4 MiB a gRPC client takes by default,
/// so a run of large events cannot make a batch that the client refuses
/// (and that its resume would build again).
const BATCH_BYTES: usize = 1 << 20;
const MAX_STREAM_TYPES: usize = 20;
const MAX_EVENT_TYPES: usize = 50;
const MAX_NAME_LEN: usize = 128;
const DEFAULT_PAGE: u32 = 100;
const MAX_PAGE: u32 = 1000;

#[derive(Clone)]
pub struct EventLogService {
    store: EventStore,
    open: Arc<Semaphore>,
    shutdown: CancellationToken,
}

type Batches = Pin<Box<dyn Stream<Item = Result<EventBatch, Status>> + Send>>;

impl EventLogService {
    /// `shutdown` ends every open stream (with UNAVAILABLE) when cancelled.
    pub fn new(store: EventStore, max_open: usize, shutdown: CancellationToken) -> Self {
        Self {
            store,
            open: Arc::new(Semaphore::new(max_open)),
            shutdown,
        }
    }

    fn permit(&self) -> Result<OwnedSemaphorePermit, ServiceError> {
        self.open.clone().try_acquire_owned().map_err(|_| {
            ServiceError::ResourceExhausted(
                "too many open subscriptions on this server; retry later or elsewhere",
            )
        })
    }

    /// `after`, checked against the head.
    async fn start(&self, after: u64) -> Result<u64, ServiceError> {
        let head = self.store.head().await?;
        if after > head {
            return Err(ServiceError::OutOfRange {
                field: "after_position",
                current: head,
            });
        }
        Ok(head)
    }

    fn batches(
        &self,
        events: impl Stream<Item = Result<RecordedEvent, crm_event_store::ReadError>> + Send + 'static,
        permit: OwnedSemaphorePermit,
    ) -> Batches {
        let batches = SizedBatches {
            inner: Box::pin(events),
            held: None,
            failed: None,
            done: false,
        }
        .map(move |batch| {
            let _open = &permit;
            batch
        });
        Box::pin(UntilShutdown {
            inner: Box::pin(batches),
            shutdown: Box::pin(self.shutdown.clone().cancelled_owned()),
            done: false,
        })
    }
}

#[tonic::async_trait]
impl EventLog for EventLogService {
    type SubscribeStream = Batches;
    type ReadAllStream = Batches;

    async fn subscribe(
        &self,
        request: Request<SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let filter = filter(caller.tenant, request.filter)?;
        if request.from_now && request.after_position != 0 {
            return Err(ServiceError::invalid("after_position", "must be 0 with from_now").into());
        }
        let head = self.start(request.after_position).await?;
        let after = if request.from_now {
            head
        } else {
            request.after_position
        };
        let permit = self.permit()?;
        tracing::info!(after, "subscription opened");
        Ok(Response::new(
            self.batches(self.store.subscribe(after, filter), permit),
        ))
    }

    async fn read_all(
        &self,
        request: Request<ReadAllRequest>,
    ) -> Result<Response<Self::ReadAllStream>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let filter = filter(caller.tenant, request.filter)?;
        let head = self.start(request.after_position).await?;
        let permit = self.permit()?;
        let events = self.store.replay(request.after_position, head, filter);
        let limit = match request.max_count {
            0 => usize::MAX,
            n => usize::try_from(n).unwrap_or(usize::MAX),
        };
        Ok(Response::new(self.batches(events.take(limit), permit)))
    }

    async fn read_stream(
        &self,
        request: Request<ReadStreamRequest>,
    ) -> Result<Response<ReadStreamReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let stream_id = Uuid::parse_str(&request.stream_id)
            .map_err(|_| ServiceError::invalid("stream_id", "must be a UUID"))?;
        let count = match request.max_count {
            0 => DEFAULT_PAGE,
            n if n <= MAX_PAGE => n,
            _ => return Err(ServiceError::invalid("max_count", "must be 0 to 1000").into()),
        };
        let backward = match ReadDirection::try_from(request.direction) {
            Ok(ReadDirection::Unspecified | ReadDirection::Forward) => false,
            Ok(ReadDirection::Backward) => true,
            Err(_) => {
                return Err(ServiceError::invalid("direction", "must be a ReadDirection").into());
            }
        };
        let current = self
            .store
            .stream_version(&caller.tenant, stream_id)
            .await
            .map_err(ServiceError::from)?
            .ok_or(ServiceError::Domain(crm_domain::DomainError::NotFound))?;
        if request.from_version > current {
            return Err(ServiceError::OutOfRange {
                field: "from_version",
                current,
            }
            .into());
        }
        let (events, next_version) = if backward {
            let from = if request.from_version == 0 {
                current
            } else {
                request.from_version
            };
            let events = self
                .store
                .read_stream_backward(&caller.tenant, stream_id, from, u64::from(count))
                .await
                .map_err(ServiceError::from)?;
            let next = match events.last() {
                Some(last) if last.stream_version > 1 => last.stream_version - 1,
                _ => 0,
            };
            (events, next)
        } else {
            let from = request.from_version.max(1);
            let events = self
                .store
                .read_stream(&caller.tenant, stream_id, from, u64::from(count))
                .await
                .map_err(ServiceError::from)?;
            let next = match events.last() {
                Some(last) if last.stream_version < current => last.stream_version + 1,
                _ => 0,
            };
            (events, next)
        };
        let mut events: Vec<Event> = events.into_iter().map(to_proto).collect();
        let kept = within_bytes(&events);
        let next_version = if kept < events.len() {
            // Cut by size: the next page starts at the first event left out.
            events[kept].stream_version
        } else {
            next_version
        };
        events.truncate(kept);
        Ok(Response::new(ReadStreamReply {
            events,
            stream_version: current,
            next_version,
        }))
    }
}

/// The tenant's filter, validated.
fn filter(tenant: TenantId, filter: Option<EventFilter>) -> Result<Filter, ServiceError> {
    let filter = filter.unwrap_or_default();
    let names = |field: &'static str, values: Vec<String>, max: usize| {
        if values.len() > max {
            return Err(ServiceError::invalid(field, "has too many entries"));
        }
        for (i, value) in values.iter().enumerate() {
            let ok = !value.is_empty()
                && value.len() <= MAX_NAME_LEN
                && value
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !ok {
                return Err(ServiceError::invalid(
                    format!("{field}[{i}]"),
                    "must be 1 to 128 of [A-Za-z0-9_]",
                ));
            }
        }
        Ok(values)
    };
    let stream_id = match filter.stream_id.as_str() {
        "" => None,
        id => Some(
            Uuid::parse_str(id)
                .map_err(|_| ServiceError::invalid("filter.stream_id", "must be a UUID"))?,
        ),
    };
    Ok(Filter {
        tenant_id: Some(tenant),
        stream_types: names("filter.stream_types", filter.stream_types, MAX_STREAM_TYPES)?,
        event_types: names("filter.event_types", filter.event_types, MAX_EVENT_TYPES)?,
        stream_id,
    })
}

fn to_proto(event: RecordedEvent) -> Event {
    Event {
        global_position: event.global_position,
        event_id: event.event_id.to_string(),
        tenant_id: event.tenant_id,
        stream_type: event.stream_type,
        stream_id: event.stream_id.to_string(),
        stream_version: event.stream_version,
        event_type: event.event_type,
        schema_version: event.schema_version,
        payload_json: event.payload.0,
        metadata_json: event.metadata.0,
        recorded_at: jiff::Timestamp::try_from(event.recorded_at)
            .map(|t| t.to_string())
            .unwrap_or_default(),
    }
}

/// How many of `events`, from the first, fit in [`BATCH_BYTES`] (at least
/// one).
fn within_bytes(events: &[Event]) -> usize {
    use prost::Message;
    let mut bytes = 0;
    for (i, event) in events.iter().enumerate() {
        bytes += event.encoded_len();
        if i > 0 && bytes > BATCH_BYTES {
            return i;
        }
    }
    events.len()
}

/// Events into `EventBatch`es of what is ready now, at most [`BATCH`]
/// events and [`BATCH_BYTES`] bytes each (but always one event). An error
/// ends the stream after the events before it.
struct SizedBatches<S> {
    inner: Pin<Box<S>>,
    /// The event that did not fit the last batch: the next one starts with it.
    held: Option<Event>,
    failed: Option<Status>,
    done: bool,
}

impl<S> Stream for SizedBatches<S>
where
    S: Stream<Item = Result<RecordedEvent, crm_event_store::ReadError>>,
{
    type Item = Result<EventBatch, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        use prost::Message;
        let this = self.get_mut();
        if let Some(status) = this.failed.take() {
            this.done = true;
            return Poll::Ready(Some(Err(status)));
        }
        let mut events = Vec::new();
        let mut bytes = 0;
        if let Some(event) = this.held.take() {
            bytes += event.encoded_len();
            events.push(event);
        }
        while !this.done && events.len() < BATCH {
            match this.inner.as_mut().poll_next(cx) {
                Poll::Ready(Some(Ok(event))) => {
                    let event = to_proto(event);
                    let len = event.encoded_len();
                    if !events.is_empty() && bytes + len > BATCH_BYTES {
                        this.held = Some(event);
                        break;
                    }
                    bytes += len;
                    events.push(event);
                }
                Poll::Ready(Some(Err(error))) => {
                    let status = Status::from(ServiceError::from(error));
                    if events.is_empty() {
                        this.done = true;
                        return Poll::Ready(Some(Err(status)));
                    }
                    this.failed = Some(status);
                    break;
                }
                Poll::Ready(None) => this.done = true,
                Poll::Pending => break,
            }
        }
        if !events.is_empty() {
            Poll::Ready(Some(Ok(EventBatch { events })))
        } else if this.done {
            Poll::Ready(None)
        } else {
            Poll::Pending
        }
    }
}

/// Ends the inner stream with UNAVAILABLE when the server shuts down, so
/// graceful shutdown does not wait on streams that never end.
struct UntilShutdown {
    inner: Batches,
    shutdown: Pin<Box<WaitForCancellationFutureOwned>>,
    done: bool,
}

impl Stream for UntilShutdown {
    type Item = Result<EventBatch, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        if self.shutdown.as_mut().poll(cx).is_ready() {
            self.done = true;
            return Poll::Ready(Some(Err(Status::unavailable(
                "the server is shutting down; resume from the last position received",
            ))));
        }
        self.inner.as_mut().poll_next(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crm_event_store::{JsonText, ReadError};

    fn event(position: u64, payload_bytes: usize) -> Result<RecordedEvent, ReadError> {
        Ok(RecordedEvent {
            global_position: position,
            event_id: Uuid::from_u128(u128::from(position)),
            tenant_id: "acme".into(),
            stream_type: "activity".into(),
            stream_id: Uuid::from_u128(7),
            stream_version: position,
            event_type: "ActivityLogged".into(),
            schema_version: 1,
            payload: JsonText(format!("\"{}\"", "x".repeat(payload_bytes))),
            metadata: JsonText("{}".into()),
            recorded_at: std::time::SystemTime::UNIX_EPOCH,
            decoded: Default::default(),
        })
    }

    async fn batches(
        events: Vec<Result<RecordedEvent, ReadError>>,
    ) -> Vec<Result<EventBatch, Status>> {
        SizedBatches {
            inner: Box::pin(futures_util::stream::iter(events)),
            held: None,
            failed: None,
            done: false,
        }
        .collect()
        .await
    }

    #[tokio::test]
    async fn batches_hold_at_most_a_mebibyte_and_always_one_event() {
        use prost::Message;
        // 100 events of 45 KB: 256 of them in one batch would be 11 MB.
        let events = (1..=100).map(|p| event(p, 45_000)).collect();
        let got = batches(events).await;
        let mut positions = Vec::new();
        for batch in &got {
            let batch = batch.as_ref().expect("batch");
            assert!(!batch.events.is_empty());
            assert!(
                batch.encoded_len() <= BATCH_BYTES + 64,
                "{}",
                batch.encoded_len()
            );
            positions.extend(batch.events.iter().map(|e| e.global_position));
        }
        assert_eq!(
            positions,
            (1..=100).collect::<Vec<_>>(),
            "in order, none lost"
        );
        assert!(got.len() >= 5, "{} batches", got.len());
        // One event larger than the budget still goes, alone.
        let got = batches(vec![event(1, 10), event(2, 2 << 20), event(3, 10)]).await;
        let sizes: Vec<usize> = got
            .iter()
            .map(|b| b.as_ref().unwrap().events.len())
            .collect();
        assert_eq!(sizes, [1, 1, 1]);
        // Small events: at most BATCH per batch.
        let got = batches((1..=300).map(|p| event(p, 10)).collect()).await;
        let sizes: Vec<usize> = got
            .iter()
            .map(|b| b.as_ref().unwrap().events.len())
            .collect();
        assert_eq!(sizes, [BATCH, 300 - BATCH]);
    }

    #[tokio::test]
    async fn an_error_ends_the_batches_after_the_events_before_it() {
        let got = batches(vec![
            event(1, 10),
            event(2, 10),
            Err(ReadError::Corrupt("bad row".into())),
            event(4, 10),
        ])
        .await;
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].as_ref().unwrap().events.len(), 2);
        assert!(got[1].is_err());
    }

    #[test]
    fn a_stream_page_is_cut_by_size_too() {
        let events: Vec<Event> = (1..=40)
            .map(|p| to_proto(event(p, 45_000).unwrap()))
            .collect();
        let kept = within_bytes(&events);
        assert!((20..40).contains(&kept), "{kept}");
        assert_eq!(within_bytes(&events[..1]), 1);
        assert_eq!(within_bytes(&[]), 0);
    }
}
