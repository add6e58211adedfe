//! Money as the contract defines it: integer minor units plus an active ISO 4217 code.
//!
//! Amounts never pass through floating point. The currency list comes from the
//! `iso_currency` crate (generated from the ISO 4217 tables), not a hand-typed subset;
//! codes the standard has superseded are not active and are refused.

use std::fmt;

/// Largest amount the contract accepts: 2^53 − 1, so every amount survives a
/// round trip through JSON consumers that use doubles.
pub const MAX_MINOR: i64 = 9_007_199_254_740_991;

/// An amount in minor units (cents for EUR, yen for JPY, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MinorUnits(i64);

impl MinorUnits {
    pub const fn new(value: i64) -> Self {
        Self(value)
    }

    pub const fn get(self) -> i64 {
        self.0
    }
}

impl fmt::Display for MinorUnits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// An active ISO 4217 currency. `Copy` and two bytes wide, so window entries stay small.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Currency(iso_currency::Currency);

impl Currency {
    /// Parses an upper-case alpha-3 code; `None` unless it is an active ISO 4217 code.
    pub fn from_code(code: &str) -> Option<Self> {
        if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_uppercase()) {
            return None;
        }
        let currency = iso_currency::Currency::from_code(code)?;
        let superseded = currency
            .flags()
            .iter()
            .any(|flag| matches!(flag, iso_currency::Flag::Superseded(_)));
        (!superseded).then_some(Self(currency))
    }

    pub fn code(self) -> &'static str {
        self.0.code()
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn active_codes_are_accepted() {
        for code in ["EUR", "USD", "JPY", "GBP", "CHF", "BHD", "KWD"] {
            assert_eq!(Currency::from_code(code).map(Currency::code), Some(code));
        }
    }

    #[test]
    fn unknown_lower_case_and_superseded_codes_are_refused() {
        for code in [
            "", "EU", "EURO", "eur", "Eur", "ABC", "XYZ", "DEM", "HRK", "SLL",
        ] {
            assert_eq!(Currency::from_code(code), None, "{code}");
        }
    }
}
