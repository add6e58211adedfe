//! Partition-pair vocabulary shared by the consumer, the pipeline and the store.
//!
//! Partition `p` of the payments topic and partition `p` of the settlements topic form
//! pair `p`, the unit of ownership, matching and checkpointing. This module owns the
//! types every layer uses to talk about a pair, so none of them has to import another
//! layer for them: a value per input ([`PerInput`], indexed by [`Input`] rather than by
//! position) and where a pair stands when a worker takes it ([`PairPosition`]).

use std::ops::{Index, IndexMut};

use crate::event::{Input, Micros, Topic};

/// One value for each input of a partition pair.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct PerInput<T> {
    pub payments: T,
    pub settlements: T,
}

impl<T> PerInput<T> {
    pub const fn new(payments: T, settlements: T) -> Self {
        Self {
            payments,
            settlements,
        }
    }

    /// The value of each input computed from the input.
    pub fn from_fn(mut value_of: impl FnMut(Input) -> T) -> Self {
        Self::new(value_of(Input::Payments), value_of(Input::Settlements))
    }

    pub fn map<U>(self, mut f: impl FnMut(T) -> U) -> PerInput<U> {
        PerInput::new(f(self.payments), f(self.settlements))
    }

    /// Each input with a reference to its value, payments first.
    pub fn iter(&self) -> impl Iterator<Item = (Input, &T)> {
        [
            (Input::Payments, &self.payments),
            (Input::Settlements, &self.settlements),
        ]
        .into_iter()
    }
}

impl<T> Index<Input> for PerInput<T> {
    type Output = T;

    fn index(&self, input: Input) -> &T {
        match input {
            Input::Payments => &self.payments,
            Input::Settlements => &self.settlements,
        }
    }
}

impl<T> IndexMut<Input> for PerInput<T> {
    fn index_mut(&mut self, input: Input) -> &mut T {
        match input {
            Input::Payments => &mut self.payments,
            Input::Settlements => &mut self.settlements,
        }
    }
}

/// `[payments, settlements]`, the order of [`Input::ALL`].
impl<T> From<[T; 2]> for PerInput<T> {
    fn from([payments, settlements]: [T; 2]) -> Self {
        Self::new(payments, settlements)
    }
}

/// Compares with `[payments, settlements]`, so tests can state values as arrays.
impl<T: PartialEq> PartialEq<[T; 2]> for PerInput<T> {
    fn eq(&self, [payments, settlements]: &[T; 2]) -> bool {
        self.payments == *payments && self.settlements == *settlements
    }
}

/// One value for each topic a pair reads: its two inputs and its payouts partition
/// (contract §7). Positions are per topic; indexing by an [`Input`] reads the input's
/// topic, so code about matching needs no conversion.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct PerTopic<T> {
    pub payments: T,
    pub settlements: T,
    pub payouts: T,
}

impl<T> PerTopic<T> {
    pub fn from_fn(mut value_of: impl FnMut(Topic) -> T) -> Self {
        Self {
            payments: value_of(Topic::Payments),
            settlements: value_of(Topic::Settlements),
            payouts: value_of(Topic::Payouts),
        }
    }

    /// Each topic with a reference to its value, in the order of [`Topic::ALL`].
    pub fn iter(&self) -> impl Iterator<Item = (Topic, &T)> {
        [
            (Topic::Payments, &self.payments),
            (Topic::Settlements, &self.settlements),
            (Topic::Payouts, &self.payouts),
        ]
        .into_iter()
    }

    /// The two inputs' values.
    pub fn inputs(&self) -> PerInput<T>
    where
        T: Copy,
    {
        PerInput::new(self.payments, self.settlements)
    }
}

impl<T> Index<Topic> for PerTopic<T> {
    type Output = T;

    fn index(&self, topic: Topic) -> &T {
        match topic {
            Topic::Payments => &self.payments,
            Topic::Settlements => &self.settlements,
            Topic::Payouts => &self.payouts,
        }
    }
}

impl<T> IndexMut<Topic> for PerTopic<T> {
    fn index_mut(&mut self, topic: Topic) -> &mut T {
        match topic {
            Topic::Payments => &mut self.payments,
            Topic::Settlements => &mut self.settlements,
            Topic::Payouts => &mut self.payouts,
        }
    }
}

impl<T> Index<Input> for PerTopic<T> {
    type Output = T;

    fn index(&self, input: Input) -> &T {
        &self[Topic::from(input)]
    }
}

impl<T> IndexMut<Input> for PerTopic<T> {
    fn index_mut(&mut self, input: Input) -> &mut T {
        &mut self[Topic::from(input)]
    }
}

/// `[payments, settlements]`, no payouts value: what tests about the inputs state.
impl<T: Default> From<[T; 2]> for PerTopic<T> {
    fn from([payments, settlements]: [T; 2]) -> Self {
        Self {
            payments,
            settlements,
            payouts: T::default(),
        }
    }
}

/// Compares with `[payments, settlements]` and no payouts value.
impl<T: PartialEq + Default> PartialEq<[T; 2]> for PerTopic<T> {
    fn eq(&self, [payments, settlements]: &[T; 2]) -> bool {
        self.payments == *payments
            && self.settlements == *settlements
            && self.payouts == T::default()
    }
}

/// The names of the topics a worker reads; the payouts topic only when configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicNames {
    pub payments: String,
    pub settlements: String,
    pub payouts: Option<String>,
}

impl TopicNames {
    /// The name of `topic`, if this worker reads it.
    pub fn name(&self, topic: Topic) -> Option<&str> {
        match topic {
            Topic::Payments => Some(&self.payments),
            Topic::Settlements => Some(&self.settlements),
            Topic::Payouts => self.payouts.as_deref(),
        }
    }

    /// The topics this worker reads, in the order of [`Topic::ALL`].
    pub fn active(&self) -> impl Iterator<Item = Topic> + '_ {
        Topic::ALL
            .into_iter()
            .filter(|&topic| self.name(topic).is_some())
    }

    /// Which topic `name` is; `None` for a topic this worker does not read.
    pub fn topic_of(&self, name: &str) -> Option<Topic> {
        self.active().find(|&topic| self.name(topic) == Some(name))
    }
}

/// Where a partition pair stands when a worker takes it over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairPosition {
    pub pair: i32,
    /// The owner's fencing token: bumped by every takeover, checked by every checkpoint.
    pub epoch: i64,
    /// Next offset to read, per topic; `None` when nothing was ever stored (for the
    /// payouts topic also: stored for another payouts topic, or never configured).
    pub next_offsets: PerTopic<Option<i64>>,
    /// Highest event time seen per input, the watermark's starting point.
    pub high_marks: PerInput<Option<Micros>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_indexed_by_input_in_the_order_of_all_inputs() {
        let mut offsets = PerInput::from([Some(3), None]);
        assert_eq!(offsets[Input::Payments], Some(3));
        assert_eq!(offsets[Input::Settlements], None);
        offsets[Input::Settlements] = Some(7);
        assert_eq!(offsets, [Some(3), Some(7)]);
        let inputs: Vec<Input> = offsets.iter().map(|(input, _)| input).collect();
        assert_eq!(inputs, Input::ALL);
        assert_eq!(PerInput::from_fn(Input::index), [0, 1]);
    }

    #[test]
    fn topics_are_read_only_when_named() {
        let mut names = TopicNames {
            payments: "p".into(),
            settlements: "s".into(),
            payouts: None,
        };
        assert_eq!(
            names.active().collect::<Vec<_>>(),
            [Topic::Payments, Topic::Settlements]
        );
        assert_eq!(names.topic_of("s"), Some(Topic::Settlements));
        assert_eq!(names.topic_of("o"), None);
        names.payouts = Some("o".into());
        assert_eq!(names.active().collect::<Vec<_>>(), Topic::ALL);
        assert_eq!(names.topic_of("o"), Some(Topic::Payouts));
        let mut offsets = PerTopic::from_fn(|t| t as i64);
        offsets[Input::Settlements] = 9;
        assert_eq!(offsets[Topic::Settlements], 9);
        assert_eq!(offsets.inputs(), [0, 9]);
    }
}
