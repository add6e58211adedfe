//! Partition-pair vocabulary shared by the consumer, the pipeline and the store.
//!
//! Partition `p` of the payments topic and partition `p` of the settlements topic form
//! pair `p`, the unit of ownership, matching and checkpointing. This module owns the
//! types every layer uses to talk about a pair, so none of them has to import another
//! layer for them: a value per input ([`PerInput`], indexed by [`Input`] rather than by
//! position) and where a pair stands when a worker takes it ([`PairPosition`]).

use std::ops::{Index, IndexMut};

use crate::event::{Input, Micros};

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

/// Where a partition pair stands when a worker takes it over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairPosition {
    pub pair: i32,
    /// The owner's fencing token: bumped by every takeover, checked by every checkpoint.
    pub epoch: i64,
    /// Next offset to read, per input; `None` when nothing was ever stored.
    pub next_offsets: PerInput<Option<i64>>,
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
}
