//! Catch-up subscriptions: history first, then live, without a gap or a
//! duplicate at the switch.
//!
//! The task reads the committed head, streams the events up to it, and repeats;
//! when nothing is new it waits for a wake-up (an append in this process, a
//! NOTIFY from another, or the poll interval). Because positions commit in
//! order, "every event up to the head I read" is a complete prefix of the log,
//! so the next read can start exactly after it. The channel to the consumer is
//! bounded: a slow consumer slows the reader instead of filling memory.
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use deadpool_postgres::Pool;
use futures_util::{Stream, StreamExt};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::read::{RecordedEvent, read_range};
use crate::{Filter, ReadError};

/// Events in position order, history then live. Ends only on error or when the
/// store shuts down.
pub struct Subscription {
    events: mpsc::Receiver<Result<RecordedEvent, ReadError>>,
}

impl Stream for Subscription {
    type Item = Result<RecordedEvent, ReadError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.events.poll_recv(cx)
    }
}

pub(crate) struct SubscriptionTask {
    pub pool: Pool,
    pub head: watch::Receiver<u64>,
    pub poll_interval: Duration,
    pub cancel: CancellationToken,
    pub buffer: usize,
}

impl SubscriptionTask {
    pub(crate) fn spawn(
        self,
        tasks: &tokio_util::task::TaskTracker,
        after: u64,
        filter: Filter,
    ) -> Subscription {
        let (sender, events) = mpsc::channel(self.buffer);
        let span = tracing::info_span!("subscription", from_position = after);
        tasks.spawn(self.run(after, filter, sender).instrument(span));
        Subscription { events }
    }

    async fn run(
        mut self,
        mut after: u64,
        filter: Filter,
        sender: mpsc::Sender<Result<RecordedEvent, ReadError>>,
    ) {
        loop {
            self.head.borrow_and_update();
            let result = self.read_once(after, &filter, &sender).await;
            match result {
                Ok(Some(next)) if next > after => {
                    after = next;
                    continue;
                }
                Ok(Some(_)) => {}
                Ok(None) => return,
                Err(error) => {
                    let _ = sender.send(Err(error)).await;
                    return;
                }
            }
            tokio::select! {
                _ = self.head.changed() => {}
                () = tokio::time::sleep(self.poll_interval) => {}
                () = sender.closed() => return,
                () = self.cancel.cancelled() => return,
            }
        }
    }

    /// Sends every event after `after` up to the committed head; returns the
    /// head read (the new `after`), or `None` when the consumer is gone.
    async fn read_once(
        &self,
        after: u64,
        filter: &Filter,
        sender: &mpsc::Sender<Result<RecordedEvent, ReadError>>,
    ) -> Result<Option<u64>, ReadError> {
        let client = self.pool.get().await?;
        let head = crate::store::committed_head(&client).await?;
        if head <= after {
            return Ok(Some(after));
        }
        let mut events = read_range(client, after, head, filter).await?;
        while let Some(event) = events.next().await {
            let event = event?;
            if sender.send(Ok(event)).await.is_err() {
                return Ok(None);
            }
        }
        Ok(Some(head))
    }
}
