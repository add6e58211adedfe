//! recon-worker: reconciles payments against settlements in real time.
//!
//! ```text
//! Kafka (payments, settlements; co-partitioned)
//!    │  poll thread (consumer): the consumer's only owner; polls, decodes, runs the
//!    │  rebalance callbacks, serves the pipeline's commands (advisory commits, rewinds)
//!    ▼
//! bounded channel: Data (messages, progress, rewind markers) and Control (assign,
//!    │  revoke, stop: answered on a oneshot), in order
//!    ▼
//! pipeline task: batch → lookup misses → engine.apply → sweep due → checkpoint
//!                          (store)        (pure)          (store)   (PG transactions of
//!                                                                    whole pairs: rows,
//!                                                                    discrepancies, rejects,
//!                                                                    offsets, fenced)
//! ```
//!
//! PostgreSQL is the durable state and the source of truth for offsets; the engine's
//! window is a bounded cache over it.
//!
//! Layers, each importing only the ones above it:
//! - vocabulary: [`money`], [`event`] (the input contract), [`pair`] (partition-pair
//!   types), [`rejection`] (the rejection record), [`clock`];
//! - [`engine`]: pure matching, depending on the vocabulary and its own config only;
//! - [`config`]: the environment parsed into validated types;
//! - [`telemetry`]: logs, metric names, health, HTTP; [`retry`]: the one retry policy;
//! - edges: [`store`] (PostgreSQL), [`consumer`] (Kafka);
//! - [`pipeline`]: the loop tying consumer → engine → store; [`payouts`]: the payout
//!   evaluator task beside it (contract §7); [`worker`]: start, run, shutdown;
//! - [`operations`]: the operators' commands (contract §8), against the database only.
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
pub mod operations;
pub mod pair;
pub mod payouts;
pub mod pipeline;
pub mod rejection;
pub mod retry;
pub mod store;
pub mod telemetry;
pub mod worker;
