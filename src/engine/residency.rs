//! Which keys stay in memory. The window is a cache over PostgreSQL, except for keys
//! whose changes are not durable yet: they are pinned until the checkpoint that writes
//! them is acknowledged ([`PairEngine::checkpointed`]), since storage cannot give them
//! back before then, and they stay deadline candidates because the sweep reads storage
//! too. The rest is given up when the window is over its bounds ([`PairEngine::evict`]).

use std::collections::VecDeque;

use super::window::{Id, KeyState, Window};
use super::PairEngine;

/// A key's pin: the generation that last changed it, in one byte (0: not pinned). At
/// most two generations are unacknowledged at once, so 255 tags never collide.
fn pin_tag(generation: u64) -> u8 {
    (generation % 255) as u8 + 1
}

/// The keys changed by batches whose changes are not durable yet.
#[derive(Debug)]
pub(super) struct Pins {
    /// Numbers the batches of changes handed out; keys touched now are pinned with it.
    generation: u64,
    /// Keys changed in this batch (the deadline candidates besides swept ones).
    dirty: Vec<Id>,
    /// Keys of batches handed out but not yet acknowledged durable, oldest first. The
    /// pipeline applies a batch while the previous one is still committing, so up to
    /// two generations are pinned at once.
    unacknowledged: VecDeque<(u64, Vec<Id>)>,
}

impl Default for Pins {
    fn default() -> Self {
        Self {
            generation: 1,
            dirty: Vec::new(),
            unacknowledged: VecDeque::new(),
        }
    }
}

impl Pins {
    /// Marks a key changed in this batch: a deadline candidate, not evictable.
    pub(super) fn touch(&mut self, key: &Id, state: &mut KeyState) {
        let pin = pin_tag(self.generation);
        if state.pin != pin {
            state.pin = pin;
            self.dirty.push(key.clone());
        }
    }

    /// The keys changed by this batch or by one not yet durable, possibly repeated.
    pub(super) fn changed_keys(&self) -> impl Iterator<Item = &Id> {
        self.dirty
            .iter()
            .chain(self.unacknowledged.iter().flat_map(|(_, keys)| keys))
    }

    /// Ends this batch's generation: its keys wait for the acknowledgement of the
    /// number returned.
    pub(super) fn seal_generation(&mut self) -> u64 {
        let sealed = self.generation;
        if !self.dirty.is_empty() {
            let keys = std::mem::take(&mut self.dirty);
            self.unacknowledged.push_back((sealed, keys));
        }
        self.generation += 1;
        sealed
    }

    /// Unpins the keys of `generation` and of every earlier one, unless a later
    /// generation pinned them since.
    fn release(&mut self, generation: u64, keys: &mut Window) {
        while let Some((oldest, _)) = self.unacknowledged.front() {
            if *oldest > generation {
                break;
            }
            let Some((oldest, pinned)) = self.unacknowledged.pop_front() else {
                break;
            };
            let pin = pin_tag(oldest);
            for key in pinned {
                if let Some(state) = keys.get_mut(&key) {
                    if state.pin == pin {
                        state.pin = 0;
                    }
                }
            }
        }
    }
}

impl PairEngine {
    /// The changes of `generation` (and of every earlier one) are durable: their keys
    /// may be evicted again, unless a later batch changed them since.
    pub fn checkpointed(&mut self, generation: u64) {
        self.pins.release(generation, &mut self.keys);
    }

    /// Evicts down to 90% of the bounds when over them, in [`KeyState::eviction_rank`]
    /// order: closed keys, then keys open only through a fired deadline, then pending
    /// ones. Evicted keys stay in PostgreSQL and come back through lookups and sweeps.
    /// Keys not yet checkpointed stay. Called before a batch's keys are loaded, never
    /// between loading and applying them.
    pub fn evict(&mut self) {
        let window = self.config.window;
        if self.keys.len() <= window.max_items && self.bytes <= window.max_bytes {
            return;
        }
        let target_items = window.max_items - window.max_items / 10;
        let target_bytes = window.max_bytes - window.max_bytes / 10;
        for rank in 0..=KeyState::MAX_EVICTION_RANK {
            let mut freed = 0usize;
            let mut remaining = self.keys.len();
            self.keys.retain(|key, state| {
                let over = remaining > target_items || self.bytes - freed > target_bytes;
                if over && state.pin == 0 && state.eviction_rank() <= rank {
                    freed += state.bytes(key);
                    remaining -= 1;
                    return false;
                }
                true
            });
            self.bytes -= freed;
            if self.keys.len() <= target_items && self.bytes <= target_bytes {
                break;
            }
        }
    }
}
