//! recon-worker: reconciles payments against settlements in real time.
//!
//! ```text
//! Kafka (payments, settlements; co-partitioned)
//!    │  consumer thread: poll, decode, rebalance callbacks (range assignor, no auto-commit)
//!    ▼
//! bounded channel (messages and control: assign / revoke / progress, in order)
//!    ▼
//! pipeline task: batch → lookup misses → engine.apply → sweep due → checkpoint
//!                          (store)        (pure)          (store)   (one PG transaction:
//!                                                                    rows, discrepancies,
//!                                                                    rejects, offsets, fenced)
//! ```
//!
//! PostgreSQL is the durable state and the source of truth for offsets; the engine's
//! window is a bounded cache over it. See `shared/design.md` for the reasons.
//!
//! This library is the product alone: the tools around it (topic creation, the load
//! generator, the benchmarks) are the `recon-tools` package in `tools/`.

pub mod allocator;
pub mod clock;
pub mod config;
pub mod consumer;
pub mod engine;
pub mod event;
pub mod money;
pub mod pair;
pub mod pipeline;
pub mod rejection;
pub mod retry;
pub mod store;
pub mod telemetry;
pub mod worker;
