//! Catch-up subscriptions: history first, then live, without a gap or a
//! duplicate at the switch.
//!
//! The task reads the committed head (asked of the database, or as the last
//! notification announced it), reads the events up to it, and repeats;
//! when nothing is new it waits for a wake-up (an append in this process, a
//! NOTIFY from another, or the poll interval). Because positions commit in
//! order, "every event up to the head I read" is a complete prefix of the log,
//! so the next read can start exactly after it.
//!
//! Reads go in chunks of at most `chunk` events, each collected before the
//! connection goes back to the pool, and the channel to the consumer is
//! bounded: a slow consumer slows its reader, holding at most a chunk and a
//! channel's worth of events, and never holds a database connection.
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use deadpool_postgres::Pool;
use futures_util::Stream;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::read::{RecordedEvent, read_chunk};
use crate::{Filter, ReadError};

type Chunk = Result<Vec<RecordedEvent>, ReadError>;

/// Events in position order, history then live. Ends only on error or when the
/// store shuts down (or, for a replay, after its last position).
///
/// The reader hands over whole chunks, so the per-event cost of the channel
/// and of waking the consumer is paid once per chunk.
pub struct Subscription {
    chunks: mpsc::Receiver<Chunk>,
    current: std::vec::IntoIter<RecordedEvent>,
}

impl Stream for Subscription {
    type Item = Result<RecordedEvent, ReadError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(event) = self.current.next() {
                return Poll::Ready(Some(Ok(event)));
            }
            match self.chunks.poll_recv(cx) {
                Poll::Ready(Some(Ok(chunk))) => self.current = chunk.into_iter(),
                Poll::Ready(Some(Err(error))) => return Poll::Ready(Some(Err(error))),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

pub(crate) struct SubscriptionTask {
    pub pool: Pool,
    pub head: watch::Receiver<u64>,
    pub poll_interval: Duration,
    pub cancel: CancellationToken,
    pub buffer: usize,
    pub chunk: usize,
    /// After a wake-up, wait this long so a burst of commits is read at once.
    pub linger: Duration,
    /// Stop after this position instead of following live events (replay).
    pub until: Option<u64>,
}

impl SubscriptionTask {
    pub(crate) fn spawn(
        self,
        tasks: &tokio_util::task::TaskTracker,
        after: u64,
        filter: Filter,
    ) -> Subscription {
        // `buffer` events, in whole chunks (at least one).
        let (sender, chunks) = mpsc::channel(self.buffer.div_ceil(self.chunk).max(1));
        let span = tracing::info_span!("subscription", from_position = after);
        tasks.spawn(self.run(after, filter, sender).instrument(span));
        Subscription {
            chunks,
            current: Vec::new().into_iter(),
        }
    }

    async fn run(mut self, mut after: u64, filter: Filter, sender: mpsc::Sender<Chunk>) {
        // Where the head is, when known without asking the database: after
        // a notification, the position it announced (committed, like every
        // position below it). Asked at the start and after each quiet poll
        // interval (a notification may have been missed).
        let mut announced = false;
        loop {
            let notified = *self.head.borrow_and_update();
            let known = std::mem::take(&mut announced).then_some(notified);
            let result = self.read_once(after, known, &filter, &sender).await;
            match result {
                Ok(Some(next)) if self.until.is_some_and(|until| next >= until) => return,
                Ok(Some(next)) if next > after => {
                    after = next;
                    // Commits announced meanwhile are read next; none: wait.
                    announced = true;
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
                _ = self.head.changed() => {
                    // Let a burst of commits gather before reading them.
                    if !self.linger.is_zero() {
                        tokio::time::sleep(self.linger).await;
                    }
                    announced = true;
                }
                () = tokio::time::sleep(self.poll_interval) => {}
                () = sender.closed() => return,
                () = self.cancel.cancelled() => return,
            }
        }
    }

    /// Sends every event after `after` up to the committed head (or `until`);
    /// returns the position read up to (the new `after`), or `None` when the
    /// consumer is gone.
    async fn read_once(
        &self,
        mut after: u64,
        known: Option<u64>,
        filter: &Filter,
        sender: &mpsc::Sender<Chunk>,
    ) -> Result<Option<u64>, ReadError> {
        let head = match known {
            Some(head) => head,
            None => {
                let client = self.pool.get().await?;
                crate::store::committed_head(&client).await?
            }
        };
        let head = self.until.map_or(head, |until| head.min(until));
        while head > after {
            let events = {
                let client = self.pool.get().await?;
                read_chunk(&client, after, head, filter, self.chunk).await?
            };
            let complete = events.len() < self.chunk;
            let last = events.last().map(|e| e.global_position);
            if last.is_some() && sender.send(Ok(events)).await.is_err() {
                return Ok(None);
            }
            match last {
                Some(last) if !complete => after = last,
                _ => break,
            }
        }
        Ok(Some(head.max(after)))
    }
}
