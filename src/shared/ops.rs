//! The Redis operations shared mode makes and how each ended, as metrics label them (a leaf
//! module: the metrics name them without depending on shared mode's machinery).

/// The Redis operations shared mode makes (the `op` label).
pub const REDIS_OPS: [&str; 9] = [
    "book",
    "penalize",
    "hold",
    "cache_get",
    "cache_set",
    "lease",
    "release",
    "publish",
    "ping",
];

/// How a Redis operation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RedisOutcome {
    Ok,
    Error,
    Timeout,
    /// No connection to try it on.
    Unavailable,
}

impl RedisOutcome {
    pub const ALL: [RedisOutcome; 4] = [
        RedisOutcome::Ok,
        RedisOutcome::Error,
        RedisOutcome::Timeout,
        RedisOutcome::Unavailable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RedisOutcome::Ok => "ok",
            RedisOutcome::Error => "error",
            RedisOutcome::Timeout => "timeout",
            RedisOutcome::Unavailable => "unavailable",
        }
    }
}
