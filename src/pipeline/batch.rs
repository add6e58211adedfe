//! Collecting a batch: the data deliveries up to a size or a wait, ended early by a
//! control delivery, which is handled once the batch is done.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::oneshot;

use super::Pipeline;
use crate::consumer::{Control, Data, Delivery};
use crate::event::Topic;

/// How often the loop turns when nothing arrives, to advance watermarks on idle input.
pub(super) const TICK: Duration = Duration::from_millis(250);

/// How big a batch may grow.
pub(super) struct Batching {
    pub max_messages: usize,
    pub max_wait: Duration,
}

/// The data deliveries of one batch, in order.
#[derive(Default)]
pub(super) struct Batch {
    pub items: Vec<Data>,
    pub messages: usize,
}

impl Pipeline {
    /// Gathers a batch: up to `max_messages` messages or `max_wait`, ended early by a
    /// control delivery, which is returned to be handled after the batch. A closed
    /// channel is a stop nobody waits for.
    pub(super) async fn collect(
        &mut self,
        deliveries: &mut mpsc::Receiver<Delivery>,
    ) -> (Batch, Option<Control>) {
        let first = match tokio::time::timeout(TICK, deliveries.recv()).await {
            Err(_) => return (Batch::default(), None),
            Ok(None) => {
                let (done, _) = oneshot::channel();
                return (Batch::default(), Some(Control::Stop { done }));
            }
            Ok(Some(delivery)) => delivery,
        };
        // Sized once a delivery is in hand, not on every idle tick.
        let mut batch = Batch {
            items: Vec::with_capacity(self.batching.max_messages.min(8192)),
            messages: 0,
        };
        let deadline = tokio::time::Instant::now() + self.batching.max_wait;
        let mut next = Some(first);
        while let Some(delivery) = next.take() {
            match delivery {
                Delivery::Data(data) => {
                    batch.messages +=
                        usize::from(matches!(data, Data::Message(_) | Data::Announcement(_)));
                    batch.items.push(data);
                }
                Delivery::Control(control) => return (batch, Some(control)),
            }
            if batch.messages >= self.batching.max_messages {
                break;
            }
            next = match deliveries.try_recv() {
                Ok(delivery) => Some(delivery),
                Err(TryRecvError::Disconnected) => None,
                // Waits for more only while the previous batch commits: this batch's
                // commit cannot start before that one ends, so the batch closes when
                // it does (or at the deadline). With nothing committing, waiting
                // would only add latency. So under load batches grow to what arrives
                // during one commit (group commit), and a quiet stream is committed
                // message by message as it comes.
                Err(TryRecvError::Empty) => self.commit.wait_for_more(deliveries, deadline).await,
            };
        }
        (batch, None)
    }
}

impl Batch {
    /// One span per batch naming the partitions and offset ranges it covers, so every
    /// log line inside (retries, fencing) says which input it concerns.
    pub fn span(&self) -> tracing::Span {
        if self.messages == 0 {
            return tracing::debug_span!("tick");
        }
        let mut ranges: BTreeMap<(Topic, i32), (i64, i64)> = BTreeMap::new();
        for item in &self.items {
            let (topic, partition, offset) = match item {
                Data::Message(m) => (m.input.into(), m.partition, m.offset),
                Data::Announcement(a) => (Topic::Payouts, a.partition, a.offset),
                _ => continue,
            };
            let range = ranges.entry((topic, partition)).or_insert((offset, offset));
            range.0 = range.0.min(offset);
            range.1 = range.1.max(offset);
        }
        let ranges: Vec<String> = ranges
            .iter()
            .map(|((input, partition), (first, last))| {
                format!("{input}/{partition}:{first}-{last}")
            })
            .collect();
        tracing::info_span!("batch", messages = self.messages, offsets = %ranges.join(","))
    }
}
