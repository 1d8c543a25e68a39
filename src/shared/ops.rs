//! The Redis operations shared mode makes and how each ended, as metrics label them (a leaf
//! module: the metrics name them without depending on shared mode's machinery).
//!
//! Each label value is its variant's name in snake case.

/// The Redis operations shared mode makes (the `op` label).
///
/// Shared mode names an operation by this string (`op("cache_get", ..)`), which is also its
/// span's name; the metrics pre-register one series per variant, and an operation missing
/// here would be made but neither counted nor timed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, strum::IntoStaticStr, strum::VariantArray)]
#[strum(serialize_all = "snake_case")]
pub(crate) enum RedisOp {
    Book,
    Penalize,
    Hold,
    CacheGet,
    CacheSet,
    Lease,
    Release,
    Publish,
    Ping,
    /// Leasing this replica's place for time division in fallback.
    Member,
    /// Back from fallback: the shared schedule starts after the fence.
    Fence,
    /// This replica's liveness key renewed (a dead leader's flight lease is broken).
    Alive,
    /// A bulk job's record or results written (`jobs.rs`).
    JobWrite,
    /// A bulk job read by a replica that does not run it, or taken over.
    JobRead,
    /// A bulk job's lease taken, renewed or given up.
    JobLease,
}

/// How a Redis operation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, strum::IntoStaticStr, strum::VariantArray)]
#[strum(serialize_all = "snake_case")]
pub(crate) enum RedisOutcome {
    Ok,
    Error,
    Timeout,
    /// No connection to try it on.
    Unavailable,
}
