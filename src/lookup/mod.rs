//! The stages of a lookup, one module each, in the order a lookup meets them.
//!
//! - [`validation`]: stage 1, the query string and the `X-Queue-Timeout` header (the parser
//!   is the `score-validation` crate, alone so that the fuzz target builds only it).
//! - [`cache`]: stage 2, a fresh answer for (client id, CPF).
//! - [`scheduler`] and [`queue`]: stage 3, flights (coalescing) and admission to the bounded
//!   fair queue.
//! - [`pacing`], [`breaker`] and [`dispatch`]: stage 4, start slots an interval apart, the
//!   start gate, the circuit breaker, and the dispatcher that starts each call at its slot.
//! - [`upstream`]: stage 5, the call itself.
//! - [`refresh_ahead`]: which hot entries to refresh before they expire, with budget no
//!   caller needs (the background lane is in [`scheduler`]).
//! - [`error`]: the only place that maps a lookup's failure to a status code and a body.

pub(crate) mod breaker;
pub mod cache;
pub(crate) mod dispatch;
pub mod error;
pub mod pacing;
pub(crate) mod queue;
pub(crate) mod refresh_ahead;
pub(crate) mod scheduler;
pub(crate) mod upstream;
pub mod validation;
