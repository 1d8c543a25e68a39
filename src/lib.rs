//! score-proxy: a paced, cached, coalescing proxy in front of a credit-score API that allows
//! one call per second for all its callers together.
//!
//! A lookup passes the stages in this order, one module each:
//!
//! | stage | module | what happens there |
//! | --- | --- | --- |
//! | 1 | [`validation`] | the query becomes a CPF and a client id, or a `400` |
//! | 2 | [`cache`] | a fresh answer for (client id, CPF) is served at once |
//! | 3 | [`scheduler`], [`queue`] | identical lookups coalesce; new ones are admitted to a bounded, fair queue, or refused at once |
//! | 4 | [`pacing`], [`breaker`], [`dispatch`] | the dispatcher starts calls no closer than `1/rate + guard`, never inside a penalty, and not while the circuit breaker is open |
//! | 5 | [`upstream`] | the call itself, with a timeout, mapped to an honest outcome |
//!
//! Around them: [`proxy`] wires the stages and holds the lookup path, [`http`] the routes,
//! [`server`] listening and shutdown, [`error`] the only mapping to status codes,
//! [`metrics`] every Prometheus metric, [`telemetry`] logs and traces, [`redact`] the
//! pseudonyms that stand in for personal data, [`shared`] the Redis-backed schedule, cache
//! tier and leases that let several replicas share one budget, [`config`] flags and environment,
//! [`simulator`] the upstream's stand-in for tests, benchmarks and the demo, and [`loadgen`]
//! a load generator with a realistic mix.
#![forbid(unsafe_code)]

pub mod breaker;
pub mod cache;
pub mod config;
pub mod dispatch;
pub mod error;
pub mod http;
pub mod loadgen;
pub mod metrics;
pub mod pacing;
pub mod proxy;
pub mod queue;
pub mod redact;
pub mod scheduler;
pub mod server;
pub mod shared;
pub mod simulator;
pub mod telemetry;
pub mod upstream;
pub mod validation;
