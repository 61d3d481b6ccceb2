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
        let batches = events.ready_chunks(BATCH).map(move |chunk| {
            let _open = &permit;
            let mut events = Vec::with_capacity(chunk.len());
            for event in chunk {
                events.push(to_proto(event.map_err(ServiceError::from)?));
            }
            Ok(EventBatch { events })
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
        Ok(Response::new(ReadStreamReply {
            events: events.into_iter().map(to_proto).collect(),
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
