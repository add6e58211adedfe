//! Rebalances under the next-generation group protocol (KIP-848,
//! `RECON_GROUP_PROTOCOL=consumer`), which hands partitions over incrementally.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{Offset, TopicPartitionList};

use super::poller::REWIND_TIMEOUT;
use super::rebalance::RebalanceContext;
use crate::event::Topic;
use crate::pair::PerTopic;

impl RebalanceContext {
    /// The next-generation group protocol (KIP-848, `RECON_GROUP_PROTOCOL=consumer`)
    /// hands partitions over incrementally: each callback names only the partitions
    /// added or taken away, and librdkafka needs every one of them applied
    /// (`incremental_assign`/`incremental_unassign`) before it acknowledges the change
    /// to the coordinator. The two partitions of a pair may arrive (or leave) in
    /// different callbacks while the coordinator moves them. A pair is owned (epoch
    /// taken, offsets loaded) and read only while its partition of every topic this
    /// worker reads is granted; a partition whose pair is not whole stays assigned but
    /// paused, and whatever it fetched meanwhile is dropped by the pipeline (it owns
    /// no such pair). When the pair becomes whole, all its partitions are sought to
    /// the stored offsets and resumed.
    pub(super) fn rebalance_incrementally(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &TopicPartitionList,
    ) {
        let granting = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => true,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => false,
            other => {
                tracing::error!(error = ?other, "rebalance error");
                return;
            }
        };
        let halves: Vec<(Topic, i32)> = tpl
            .elements()
            .iter()
            .filter_map(|element| Some((self.topic_of(element.topic())?, element.partition())))
            .collect();
        let active: Vec<Topic> = self.topics.active().collect();
        let (changed, lone) = {
            let Ok(mut granted) = self.granted.lock() else {
                tracing::error!("granted-partition set poisoned; stopping");
                self.failed.store(true, Ordering::SeqCst);
                return;
            };
            let changed = regrant(&mut granted, &active, halves.iter().copied(), granting);
            // Granted partitions whose pair is not (or no longer) whole.
            let lone: Vec<(Topic, i32)> = granted
                .iter()
                .filter(|(_, held)| !active.iter().all(|&t| held[t]))
                .flat_map(|(&pair, held)| {
                    active.iter().filter(|&&t| held[t]).map(move |&t| (t, pair))
                })
                .collect();
            (changed, lone)
        };
        if granting {
            self.grant_incrementally(consumer, &halves, &changed, &lone);
        } else {
            self.revoke_incrementally(consumer, tpl, &changed, &lone);
        }
    }

    fn grant_incrementally(
        &self,
        consumer: &BaseConsumer<Self>,
        halves: &[(Topic, i32)],
        whole: &[i32],
        lone: &[(Topic, i32)],
    ) {
        let positions = if whole.is_empty() {
            Vec::new()
        } else {
            tracing::info!(pairs = ?whole, "partition pairs assigned (incremental)");
            match self.take_ownership(whole) {
                Ok(positions) => positions,
                Err(error) => {
                    tracing::error!(%error, pairs = ?whole, "could not take ownership of partition pairs; stopping");
                    self.failed.store(true, Ordering::SeqCst);
                    Vec::new()
                }
            }
        };
        let offset_of = |topic: Topic, pair: i32| {
            positions
                .iter()
                .find(|p| p.pair == pair)
                .and_then(|p| p.next_offsets[topic])
                .map_or(Offset::Beginning, Offset::Offset)
        };
        let mut assignment = TopicPartitionList::new();
        for &(topic, pair) in halves {
            let offset = if whole.contains(&pair) {
                offset_of(topic, pair)
            } else {
                Offset::Invalid
            };
            if let Err(error) = assignment.add_partition_offset(self.topic(topic), pair, offset) {
                tracing::error!(%error, pair, "bad partition offset");
            }
        }
        if let Err(error) = consumer.incremental_assign(&assignment) {
            tracing::error!(%error, "incremental assign failed");
            self.failed.store(true, Ordering::SeqCst);
            return;
        }
        self.seed_positions(&positions);
        // A partition granted earlier, alone and paused until now, reads from the
        // stored offset like the ones that just arrived.
        let mut resumed = TopicPartitionList::new();
        for position in &positions {
            for role in self.topics.active() {
                let topic = self.topic(role);
                if !halves.contains(&(role, position.pair)) {
                    let offset = offset_of(role, position.pair);
                    if let Err(error) = consumer.seek(topic, position.pair, offset, REWIND_TIMEOUT)
                    {
                        tracing::error!(%error, topic, pair = position.pair, "seek of the earlier half failed; stopping");
                        self.failed.store(true, Ordering::SeqCst);
                    }
                }
                resumed.add_partition(topic, position.pair);
            }
        }
        if let Err(error) = consumer.resume(&resumed) {
            tracing::warn!(%error, "resume after assign failed");
        }
        self.pause_lone(consumer, lone);
    }

    fn revoke_incrementally(
        &self,
        consumer: &BaseConsumer<Self>,
        revoked: &TopicPartitionList,
        broken: &[i32],
        lone: &[(Topic, i32)],
    ) {
        if !broken.is_empty() {
            tracing::info!(pairs = ?broken, "partition pairs revoked (incremental)");
            self.hand_back(consumer, broken.to_vec());
        }
        if let Err(error) = consumer.incremental_unassign(revoked) {
            tracing::warn!(%error, "incremental unassign failed");
        }
        self.pause_lone(consumer, lone);
    }

    /// Lone halves fetch nothing worth reading: their pair is not owned.
    fn pause_lone(&self, consumer: &BaseConsumer<Self>, lone: &[(Topic, i32)]) {
        if lone.is_empty() {
            return;
        }
        let mut paused = TopicPartitionList::new();
        for &(topic, pair) in lone {
            paused.add_partition(self.topic(topic), pair);
        }
        if let Err(error) = consumer.pause(&paused) {
            tracing::warn!(%error, "pausing a lone half failed");
        }
    }
}

/// Applies one incremental grant (or revocation) of partitions to the granted set;
/// returns the pairs that became whole (granting) or stopped being whole (revoking),
/// in order. A pair is whole when its partition of every `active` topic is granted.
fn regrant(
    granted: &mut HashMap<i32, PerTopic<bool>>,
    active: &[Topic],
    partitions: impl IntoIterator<Item = (Topic, i32)>,
    granting: bool,
) -> Vec<i32> {
    let mut changed = Vec::new();
    for (topic, pair) in partitions {
        let held = granted.entry(pair).or_default();
        let whole = |held: &PerTopic<bool>| active.iter().all(|&t| held[t]);
        let was_whole = whole(held);
        held[topic] = granting;
        if was_whole != whole(held) {
            changed.push(pair);
        }
        if !active.iter().any(|&t| held[t]) {
            granted.remove(&pair);
        }
    }
    changed.sort_unstable();
    changed.dedup();
    changed
}

#[cfg(test)]
mod tests {
    use super::{regrant, Topic};
    use std::collections::HashMap;

    const TWO: [Topic; 2] = [Topic::Payments, Topic::Settlements];

    #[test]
    fn an_incremental_grant_owns_a_pair_only_once_both_halves_are_granted() {
        use Topic::{Payments as P, Settlements as S};
        let mut granted = HashMap::new();
        assert_eq!(
            regrant(&mut granted, &TWO, [(P, 0), (S, 0), (P, 1)], true),
            vec![0]
        );
        assert_eq!(
            regrant(&mut granted, &TWO, [(P, 2)], true),
            Vec::<i32>::new()
        );
        assert_eq!(
            regrant(&mut granted, &TWO, [(S, 2), (S, 1)], true),
            vec![1, 2]
        );
        // A half taken away breaks its pair; the other half alone changes nothing.
        assert_eq!(regrant(&mut granted, &TWO, [(S, 1)], false), vec![1]);
        assert_eq!(
            regrant(&mut granted, &TWO, [(P, 1)], false),
            Vec::<i32>::new()
        );
        assert!(!granted.contains_key(&1));
        assert_eq!(
            regrant(&mut granted, &TWO, [(P, 0), (S, 0), (P, 2)], false),
            vec![0, 2]
        );
        assert_eq!(
            granted.len(),
            1,
            "the lone settlements half of pair 2 stays granted"
        );
    }

    #[test]
    fn with_payouts_a_pair_is_whole_only_with_its_three_partitions() {
        use Topic::{Payments as P, Payouts as O, Settlements as S};
        let all = Topic::ALL;
        let mut granted = HashMap::new();
        assert_eq!(
            regrant(&mut granted, &all, [(P, 0), (S, 0)], true),
            Vec::<i32>::new()
        );
        assert_eq!(regrant(&mut granted, &all, [(O, 0), (O, 1)], true), vec![0]);
        // Losing only the payouts partition breaks the pair too.
        assert_eq!(regrant(&mut granted, &all, [(O, 0)], false), vec![0]);
        assert_eq!(
            regrant(&mut granted, &all, [(O, 1)], false),
            Vec::<i32>::new()
        );
        assert!(!granted.contains_key(&1));
        assert!(
            granted.contains_key(&0),
            "the inputs of pair 0 stay granted, alone"
        );
    }
}
