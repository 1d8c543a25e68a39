//! score-proxy: a paced, cached, coalescing proxy in front of a credit-score API that allows
//! one call per second for all its callers together.
//!
//! A lookup passes the stages in this order; each is a module of [`lookup`]:
//!
//! | stage | module | what happens there |
//! | --- | --- | --- |
//! | 1 | [`lookup::validation`] | the query becomes a CPF and a client id, or a `400` |
//! | 2 | [`lookup::cache`] | a fresh answer for (client id, CPF) is served at once |
//! | 3 | [`lookup::scheduler`], [`lookup::queue`] | identical lookups coalesce; new ones are admitted to a bounded, fair queue, or refused at once |
//! | 4 | [`lookup::pacing`], [`lookup::breaker`], [`lookup::dispatch`] | the dispatcher starts calls no closer than `1/rate + guard`, never inside a penalty, and not while the circuit breaker is open |
//! | 5 | [`lookup::upstream`] | the call itself, with a timeout, mapped to an honest outcome |
//!
//! Around them: [`app`] wires the stages and holds the lookup path; [`http`] the routes, the
//! accept loops and the per-request observation; [`shutdown`] the one drain; [`telemetry`]
//! logs, traces, metrics and the pseudonyms that stand in for personal data; [`shared`] the
//! Redis-backed schedule, cache tier and leases that let several replicas share one budget;
//! [`store`] the persistent cache tier that keeps answers across restarts, sealed at rest;
//! [`config`] flags, environment and the checks before start-up.
//!
//! The upstream's stand-in (`score-sim`), the load generator (`score-loadgen`) and the
//! benchmark (`score-bench`) are crates of their own beside this one: they test and
//! demonstrate the proxy and are not part of it (the `demo` feature links the simulator for
//! `score-proxy demo`).
#![forbid(unsafe_code)]

pub mod app;
pub mod batch;
pub mod config;
pub mod http;
pub(crate) mod jobs;
pub mod lookup;
pub mod shared;
pub mod shutdown;
pub mod store;
pub mod telemetry;
