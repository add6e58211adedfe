//! Progress and pacing of the partitions the poll thread reads: whether each has
//! anything left to read (reported to the pipeline, for the watermark's idle rule), and
//! keeping each pair's two topics in step by Kafka timestamp while both have a backlog,
//! by pausing the partition that runs ahead. Only the order of reading changes:
//! results never depend on it.

use std::collections::HashSet;

use rdkafka::consumer::Consumer;
use rdkafka::{Offset, TopicPartitionList};

use super::client::{cached_watermarks, KafkaConsumer};
use super::delivery::PartitionProgress;
use super::poller::Reader;
use crate::event::{Input, Topic};

/// How far (in Kafka timestamps) one topic of a pair is read ahead of the other while
/// the other still has messages to read. librdkafka fetches partitions independently
/// and hands over thousands of messages of one at a time: in a long backlog one topic
/// ran ahead of the other by up to 20k messages, so settlements met payments long
/// evicted (a lookup and an update each) and memory grew with the backlog's length.
const MAX_LEAD_MS: i64 = 1000;

impl Reader {
    /// Whether this thread has read everything the broker last reported.
    fn caught_up(&self, consumer: &KafkaConsumer, input: Input, partition: i32) -> bool {
        let name = self.topics.name(input.into()).unwrap_or_default();
        let watermarks = cached_watermarks(consumer, name, partition);
        self.caught_up_to(input.into(), partition, watermarks)
    }

    fn caught_up_to(&self, topic: Topic, partition: i32, (low, high): (i64, i64)) -> bool {
        match self.positions.get(&(topic, partition)) {
            Some(&position) => high >= 0 && position >= high,
            // Nothing read since assignment: caught up only if the partition is empty.
            None => high >= 0 && low >= 0 && high == low,
        }
    }

    /// Moves each partition's position past what librdkafka consumed without handing
    /// it over: transaction markers. A transactional producer's commit marker takes an
    /// offset, so after the last message of a transaction the high watermark is one
    /// past the next offset this thread saw, and the partition would never count as
    /// caught up (the idle rule, and resuming a partition paused to keep in step, wait
    /// for that). librdkafka advances its application position past control records;
    /// a seek resets that position, so it never reports a place before a rewind.
    fn merge_client_positions(&mut self, consumer: &KafkaConsumer) {
        let Ok(positions) = consumer.position() else {
            return;
        };
        for element in positions.elements() {
            let Offset::Offset(offset) = element.offset() else {
                continue;
            };
            let Some(topic) = self.topic_of(element.topic()) else {
                continue;
            };
            let key = (topic, element.partition());
            let position = self.positions.entry(key).or_insert(offset);
            *position = (*position).max(offset);
        }
    }

    /// Pauses a topic's partition that runs more than [`MAX_LEAD_MS`] ahead of its
    /// co-partition while that one has a backlog; resumes it once the other has caught
    /// up to half that lead, or has nothing left to read. Only the two inputs are
    /// kept in step: the payouts partition is sparse and never paused.
    pub(super) fn keep_in_step(&mut self, consumer: &KafkaConsumer, partition: i32) {
        for input in Input::ALL {
            let other = input.other();
            let key = (Topic::from(input), partition);
            let (Some(&mine), Some(&theirs)) = (
                self.last_timestamps.get(&key),
                self.last_timestamps.get(&(other.into(), partition)),
            ) else {
                continue;
            };
            let paused = self.paused.contains(&key);
            // Saturating: Kafka timestamps are the producers' and may be anything.
            match step(mine.saturating_sub(theirs), paused, || {
                self.caught_up(consumer, other, partition)
            }) {
                Some(true) if self.pause_or_resume(consumer, key, true) => {
                    self.paused.insert(key);
                    metrics::counter!(crate::telemetry::metrics::TOPIC_PAUSES, "topic" => input.label())
                        .increment(1);
                }
                Some(false) if self.pause_or_resume(consumer, key, false) => {
                    self.paused.remove(&key);
                }
                _ => {}
            }
        }
    }

    /// Forgets partitions a rebalance took away (an assignment resumes whatever it
    /// assigns) and re-checks paused partitions whose co-partition went quiet.
    pub(super) fn review_paused(&mut self, consumer: &KafkaConsumer) {
        if self.paused.is_empty() {
            return;
        }
        let Some(assigned) = self.assigned(consumer) else {
            return;
        };
        self.paused.retain(|key| assigned.contains(key));
        let partitions: HashSet<i32> = self.paused.iter().map(|&(_, p)| p).collect();
        for partition in partitions {
            self.keep_in_step(consumer, partition);
        }
    }

    pub(super) fn pause_or_resume(
        &self,
        consumer: &KafkaConsumer,
        (topic, partition): (Topic, i32),
        pause: bool,
    ) -> bool {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(self.topics.name(topic).unwrap_or_default(), partition);
        let result = if pause {
            consumer.pause(&tpl)
        } else {
            consumer.resume(&tpl)
        };
        match result {
            Ok(()) => {
                tracing::debug!(%topic, partition, pause, "keeping the pair's topics in step");
                true
            }
            Err(error) => {
                tracing::warn!(%error, %topic, partition, pause, "pause/resume failed");
                false
            }
        }
    }

    /// For every assigned partition: is there anything left to read?
    pub(super) fn progress(&mut self, consumer: &KafkaConsumer) -> Vec<PartitionProgress> {
        let Ok(assignment) = consumer.assignment() else {
            return Vec::new();
        };
        self.merge_client_positions(consumer);
        let mut progress = Vec::new();
        for element in assignment.elements() {
            let Some(topic) = self.topic_of(element.topic()) else {
                continue;
            };
            let partition = element.partition();
            let watermarks = cached_watermarks(consumer, element.topic(), partition);
            progress.push(PartitionProgress {
                topic,
                partition,
                caught_up: self.caught_up_to(topic, partition, watermarks),
                high_watermark: watermarks.1,
            });
        }
        progress
    }
}

/// What to do with a partition `lead_ms` (Kafka timestamps) ahead of its co-partition:
/// pause it (`Some(true)`) when more than [`MAX_LEAD_MS`] ahead while the other still
/// has messages to read, resume it (`Some(false)`) once within half that or the other
/// has caught up, else leave it (the gap between the two keeps it from flapping).
fn step(lead_ms: i64, paused: bool, other_caught_up: impl FnOnce() -> bool) -> Option<bool> {
    if !paused {
        (lead_ms > MAX_LEAD_MS && !other_caught_up()).then_some(true)
    } else {
        (lead_ms <= MAX_LEAD_MS / 2 || other_caught_up()).then_some(false)
    }
}

#[cfg(test)]
mod tests {
    use super::{step, MAX_LEAD_MS};

    #[test]
    fn a_partition_ahead_of_a_backlogged_co_partition_is_paused() {
        assert_eq!(step(MAX_LEAD_MS + 1, false, || false), Some(true));
        // Not while the other has nothing left to read, nor within the lead.
        assert_eq!(step(MAX_LEAD_MS + 1, false, || true), None);
        assert_eq!(step(MAX_LEAD_MS, false, || false), None);
        assert_eq!(step(-10 * MAX_LEAD_MS, false, || false), None);
    }

    #[test]
    fn a_paused_partition_resumes_within_half_the_lead_or_once_the_other_caught_up() {
        assert_eq!(step(MAX_LEAD_MS / 2, true, || false), Some(false));
        assert_eq!(step(10 * MAX_LEAD_MS, true, || true), Some(false));
        // Between half the lead and the lead it stays paused: no flapping.
        assert_eq!(step(MAX_LEAD_MS / 2 + 1, true, || false), None);
        assert_eq!(step(MAX_LEAD_MS, true, || false), None);
    }
}
