//! recon-tools: everything around the worker that is not the worker — creating
//! co-partitioned topics, a load generator that writes down the outcome each event
//! must reach (the tests' and the demo's ground truth), and the measurements behind
//! `scripts/bench.sh`.
//!
//! They live in their own package so that `recon_worker` is the product alone: none of
//! this is part of what runs in production. The worker's integration tests and its
//! criterion bench use this library as a dev-dependency.

pub mod admin;
pub mod bench;
pub mod cli;
pub mod loadgen;
pub mod same_rows;
