//! Rebalances under the next-generation group protocol (KIP-848,
//! `RECON_GROUP_PROTOCOL=consumer`), which hands partitions over incrementally.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{Offset, TopicPartitionList};

use super::poller::REWIND_TIMEOUT;
use super::rebalance::RebalanceContext;
use crate::event::Input;
use crate::pair::PerInput;

impl RebalanceContext {
    /// The next-generation group protocol (KIP-848, `RECON_GROUP_PROTOCOL=consumer`)
    /// hands partitions over incrementally: each callback names only the partitions
    /// added or taken away, and librdkafka needs every one of them applied
    /// (`incremental_assign`/`incremental_unassign`) before it acknowledges the change
    /// to the coordinator. The two partitions of a pair may arrive (or leave) in
    /// different callbacks while the coordinator moves them. A pair is owned (epoch
    /// taken, offsets loaded) and read only while both partitions are granted; a lone
    /// half stays assigned but paused, and whatever it fetched meanwhile is dropped by
    /// the pipeline (it owns no such pair). When the other half arrives, both are
    /// sought to the stored offsets and resumed.
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
        let halves: Vec<(Input, i32)> = tpl
            .elements()
            .iter()
            .map(|element| (self.input_of(element.topic()), element.partition()))
            .collect();
        let (changed, lone) = {
            let Ok(mut granted) = self.granted.lock() else {
                tracing::error!("granted-partition set poisoned; stopping");
                self.failed.store(true, Ordering::SeqCst);
                return;
            };
            let changed = regrant(&mut granted, halves.iter().copied(), granting);
            // Halves whose co-partition is not (or no longer) granted.
            let lone: Vec<(Input, i32)> = granted
                .iter()
                .filter(|(_, held)| held.payments != held.settlements)
                .map(|(&pair, held)| {
                    (
                        if held.payments {
                            Input::Payments
                        } else {
                            Input::Settlements
                        },
                        pair,
                    )
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
        halves: &[(Input, i32)],
        whole: &[i32],
        lone: &[(Input, i32)],
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
        let offset_of = |input: Input, pair: i32| {
            positions
                .iter()
                .find(|p| p.pair == pair)
                .and_then(|p| p.next_offsets[input])
                .map_or(Offset::Beginning, Offset::Offset)
        };
        let mut assignment = TopicPartitionList::new();
        for &(input, pair) in halves {
            let offset = if whole.contains(&pair) {
                offset_of(input, pair)
            } else {
                Offset::Invalid
            };
            if let Err(error) = assignment.add_partition_offset(self.topic(input), pair, offset) {
                tracing::error!(%error, pair, "bad partition offset");
            }
        }
        if let Err(error) = consumer.incremental_assign(&assignment) {
            tracing::error!(%error, "incremental assign failed");
            self.failed.store(true, Ordering::SeqCst);
            return;
        }
        self.seed_positions(&positions);
        // A half granted earlier, alone and paused until now, reads from the stored
        // offset like the half that just arrived.
        let mut resumed = TopicPartitionList::new();
        for position in &positions {
            for input in Input::ALL {
                let topic = self.topic(input);
                if !halves.contains(&(input, position.pair)) {
                    let offset = offset_of(input, position.pair);
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
        lone: &[(Input, i32)],
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
    fn pause_lone(&self, consumer: &BaseConsumer<Self>, lone: &[(Input, i32)]) {
        if lone.is_empty() {
            return;
        }
        let mut paused = TopicPartitionList::new();
        for &(input, pair) in lone {
            paused.add_partition(self.topic(input), pair);
        }
        if let Err(error) = consumer.pause(&paused) {
            tracing::warn!(%error, "pausing a lone half failed");
        }
    }
}

/// Applies one incremental grant (or revocation) of partition halves to the granted
/// set; returns the pairs that became whole (granting) or stopped being whole
/// (revoking), in order. A half alone changes no pair.
fn regrant(
    granted: &mut HashMap<i32, PerInput<bool>>,
    halves: impl IntoIterator<Item = (Input, i32)>,
    granting: bool,
) -> Vec<i32> {
    let mut changed = Vec::new();
    for (input, pair) in halves {
        let held = granted.entry(pair).or_default();
        let was_whole = held.payments && held.settlements;
        held[input] = granting;
        if was_whole != (held.payments && held.settlements) {
            changed.push(pair);
        }
        if !held.payments && !held.settlements {
            granted.remove(&pair);
        }
    }
    changed.sort_unstable();
    changed.dedup();
    changed
}

#[cfg(test)]
mod tests {
    use super::{regrant, Input};
    use std::collections::HashMap;

    #[test]
    fn an_incremental_grant_owns_a_pair_only_once_both_halves_are_granted() {
        use Input::{Payments as P, Settlements as S};
        let mut granted = HashMap::new();
        assert_eq!(
            regrant(&mut granted, [(P, 0), (S, 0), (P, 1)], true),
            vec![0]
        );
        assert_eq!(regrant(&mut granted, [(P, 2)], true), Vec::<i32>::new());
        assert_eq!(regrant(&mut granted, [(S, 2), (S, 1)], true), vec![1, 2]);
        // A half taken away breaks its pair; the other half alone changes nothing.
        assert_eq!(regrant(&mut granted, [(S, 1)], false), vec![1]);
        assert_eq!(regrant(&mut granted, [(P, 1)], false), Vec::<i32>::new());
        assert!(!granted.contains_key(&1));
        assert_eq!(
            regrant(&mut granted, [(P, 0), (S, 0), (P, 2)], false),
            vec![0, 2]
        );
        assert_eq!(
            granted.len(),
            1,
            "the lone settlements half of pair 2 stays granted"
        );
    }
}
