//! A duplicate storm (issue 19): one payment id resent with fresh event ids.

use recon_worker::engine::{DiscrepancyKind, Outcome};
use recon_worker::event::{EventKind, Input, Micros};

use super::messages::{payment_json, settlement_json};
use super::{GroundTruth, Plan, Record, HOUR};

/// Every this many duplicates of a storm, one earlier duplicate is sent again.
const STORM_REDELIVERY_EVERY: usize = 1000;
/// How many duplicates later it comes again: long committed by then.
const STORM_REDELIVERY_LAG: usize = 5000;

/// A duplicate storm (issue 19): one payment id, `{id_prefix}storm`, whose producer
/// mints a fresh event id for every resend. Its payment and settlement line (matched),
/// then `duplicates` further payments with new event ids (`duplicate_payment`); every
/// [`STORM_REDELIVERY_EVERY`]th of them is also sent once more with its own event id,
/// [`STORM_REDELIVERY_LAG`] duplicates later (a redelivery: no row). In production
/// order; the ground truth holds one outcome per event id.
pub fn duplicate_storm(plan: &Plan, duplicates: usize) -> (Vec<Record>, GroundTruth) {
    let payment_id = format!("{}storm", plan.id_prefix);
    let first = format!("{}storm-payment-event-first", plan.id_prefix);
    let line = format!("{}storm-settlement-line", plan.id_prefix);
    let occurred = plan.event_now() - HOUR;
    let record = |input: Input, value: Vec<u8>| Record {
        topic: input.into(),
        key: Some(payment_id.clone().into_bytes()),
        value: Some(value),
    };
    let payment = |event_id: &str, at: Micros| {
        record(
            Input::Payments,
            payment_json(event_id, &payment_id, 10_000, "EUR", at),
        )
    };
    let mut records = vec![
        payment(&first, occurred),
        record(
            Input::Settlements,
            settlement_json(
                &line,
                &payment_id,
                10_000,
                200,
                9_800,
                "EUR",
                occurred + HOUR,
                None,
            ),
        ),
    ];
    let mut truth = GroundTruth::default();
    let expect = |truth: &mut GroundTruth,
                  kind: EventKind,
                  event_id: &str,
                  outcome: Outcome,
                  counterpart: &str| {
        truth.outcomes.insert(
            (kind, event_id.to_owned()),
            (payment_id.clone(), outcome, Some(counterpart.to_owned())),
        );
    };
    expect(
        &mut truth,
        EventKind::Payment,
        &first,
        Outcome::Matched,
        &line,
    );
    expect(
        &mut truth,
        EventKind::Settlement,
        &line,
        Outcome::Matched,
        &first,
    );
    // Ids as long as a UUID: past 24 bytes, so the window would hold them on the heap.
    let dup = |j: usize| format!("{}storm-payment-event-{j:010}", plan.id_prefix);
    for j in 0..duplicates {
        let event_id = dup(j);
        records.push(payment(&event_id, occurred + j as Micros));
        expect(
            &mut truth,
            EventKind::Payment,
            &event_id,
            Outcome::DuplicatePayment,
            &first,
        );
        truth.discrepancies.insert(
            (
                DiscrepancyKind::Outcome(Outcome::DuplicatePayment),
                Some(event_id),
                None,
            ),
            (payment_id.clone(), None),
        );
        if j % STORM_REDELIVERY_EVERY == STORM_REDELIVERY_EVERY - 1 && j >= STORM_REDELIVERY_LAG {
            let again = j - STORM_REDELIVERY_LAG;
            records.push(payment(&dup(again), occurred + again as Micros));
        }
    }
    (records, truth)
}
