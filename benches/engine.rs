//! Criterion benchmarks of the pure core: decoding messages and matching them in the
//! engine, one core, no broker and no database (`cargo bench`). The generated stream
//! is the load generator's default mix, so every outcome kind and redeliveries occur.
//! Keys are loaded as the pipeline does after a lookup that found nothing stored.

use std::collections::HashSet;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use recon_tools::loadgen::{self, Mix, Plan, Record};
use recon_worker::engine::{EngineConfig, PairEngine};
use recon_worker::engine::{MatchConfig, WindowConfig};
use recon_worker::event::{decode, Event};
use recon_worker::pair::PerInput;

const SCENARIOS: usize = 20_000;
const BATCH: usize = 5_000;
const MAX_MESSAGE_BYTES: usize = 65_536;

fn stream(engine: &EngineConfig) -> Vec<Record> {
    let plan = Plan {
        seed: 7,
        scenarios: SCENARIOS,
        mix: Mix::default(),
        base_time: 1_800_000_000_000_000,
        deadline: engine.deadline,
        orphan_timeout: engine.orphan_timeout,
        max_message_bytes: MAX_MESSAGE_BYTES,
        id_prefix: "bench-".into(),
        payout_every_line: 0,
    };
    loadgen::generate(&plan).0
}

fn decode_all(records: &[Record]) -> Vec<Result<Event, recon_worker::event::Rejection>> {
    records
        .iter()
        .map(|r| {
            decode(
                r.input()
                    .expect("the default mix writes the two input topics"),
                r.key.as_deref(),
                r.value.as_deref(),
                None,
                recon_worker::event::Limits {
                    max_bytes: MAX_MESSAGE_BYTES,
                    max_future_skew: 24 * 3600 * 1_000_000,
                },
            )
        })
        .collect()
}

fn decoding(c: &mut Criterion) {
    let engine = EngineConfig::new(&MatchConfig::default(), WindowConfig::default());
    let records = stream(&engine);
    let mut group = c.benchmark_group("decode");
    group.throughput(Throughput::Elements(records.len() as u64));
    group.bench_function("json_messages", |b| b.iter(|| decode_all(&records)));
    group.finish();
}

/// Batches as the pipeline forms them: load the batch's missing keys, apply, advance
/// the watermark, fire deadlines, hand over the changes, mark them durable.
fn run_engine(config: EngineConfig, events: Vec<Event>) -> usize {
    let mut engine = PairEngine::new(config, PerInput::default());
    let mut offset = 0i64;
    let mut rows = 0;
    let mut batch = Vec::with_capacity(BATCH);
    let mut events = events.into_iter().peekable();
    while events.peek().is_some() {
        batch.extend(events.by_ref().take(BATCH));
        let mut seen = HashSet::new();
        let missing: Vec<String> = batch
            .iter()
            .map(Event::payment_id)
            .filter(|id| !engine.is_resident(id) && seen.insert(*id))
            .map(str::to_owned)
            .collect();
        engine.load(missing, Vec::new());
        for event in batch.drain(..) {
            engine.apply(event, offset);
            offset += 1;
        }
        if engine.advance(1_800_000_000_000_000).is_some() {
            engine.fire_deadlines(Vec::new(), Vec::new(), true);
        }
        let changes = engine.take_changes();
        rows += changes.rows.len();
        engine.checkpointed(changes.generation);
    }
    rows
}

fn matching(c: &mut Criterion) {
    let config = EngineConfig::new(&MatchConfig::default(), WindowConfig::default());
    let events: Vec<Event> = decode_all(&stream(&config))
        .into_iter()
        .filter_map(Result::ok)
        .collect();
    let mut group = c.benchmark_group("engine");
    group.throughput(Throughput::Elements(events.len() as u64));
    group.bench_function("match_batches_of_5000", |b| {
        b.iter_batched(
            || events.clone(),
            |events| run_engine(config, events),
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

criterion_group!(benches, decoding, matching);
criterion_main!(benches);
