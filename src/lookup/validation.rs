//! Stage 1: the query string becomes a [`LookupKey`] (client id + CPF), the
//! `X-Queue-Timeout` header a shorter deadline, or a [`QueryError`] with a fixed `reason`.
//!
//! The parser lives in the `score-validation` crate so that the fuzz target builds only it;
//! this module is its place in the pipeline.

pub use score_validation::*;
