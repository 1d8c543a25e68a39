//! score-proxy (skeleton, being written).
#![forbid(unsafe_code)]

pub mod simulator;
