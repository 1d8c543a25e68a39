//! The one place that decides what a failed lookup looks like on the wire.
//!
//! Every stage returns a [`ProxyError`]; only [`ProxyError::status`] chooses a status code and
//! only [`IntoResponse`] writes a body. Bodies are `{"error": "<kind>", "message": "..."}`:
//! `kind` is stable (clients and dashboards match on it), `message` is for humans and never
//! echoes a CPF, a client id or an upstream's internals.

use std::time::Duration;

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::lookup::validation::QueryError;

/// Why a lookup did not produce a score.
///
/// `Clone` because one coalesced upstream outcome is handed to every waiter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("{}", .0.message())]
    InvalidQuery(QueryError),

    /// The queue already holds `queue-capacity` distinct lookups.
    #[error("the queue is full; retry later")]
    QueueFull { retry_after: Duration },

    /// The lookup could not start before its deadline: refused at admission, or after an
    /// upstream penalty pushed the schedule out.
    #[error("the lookup cannot start within the queue timeout at the upstream's rate; retry later")]
    DeadlineUnreachable { retry_after: Duration },

    /// The upstream penalised us and its penalty outlasts this lookup's deadline.
    #[error("the upstream is rate-limiting and its penalty outlasts this lookup's deadline")]
    UpstreamPenalty { retry_after: Duration },

    #[error("the upstream rejected the client id")]
    UpstreamUnauthorized,

    /// The upstream refused a CPF that passed our own checks.
    #[error("the upstream rejected the cpf")]
    UpstreamRejectedInput,

    /// 5xx, an unexpected status, or a connection failure.
    #[error("the upstream failed to answer ({detail})")]
    UpstreamFailed { detail: &'static str },

    /// A `200` whose body is not a JSON object with a `score`.
    #[error("the upstream answered with an unreadable body")]
    UpstreamBadBody,

    #[error("the upstream did not answer within the upstream timeout")]
    UpstreamTimeout,

    /// The upstream has been failing; the circuit breaker refuses lookups until its
    /// cool-down ends.
    #[error(
        "the upstream is failing; lookups are refused until the circuit breaker's cool-down ends"
    )]
    CircuitOpen { retry_after: Duration },

    /// The proxy is stopping and this lookup could not finish within the grace period.
    #[error("the proxy is shutting down")]
    ShuttingDown,
}

impl ProxyError {
    /// A short, stable name: the `error` field of the body and the `outcome` label of metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ProxyError::InvalidQuery(_) => "invalid_request",
            ProxyError::QueueFull { .. } => "queue_full",
            ProxyError::DeadlineUnreachable { .. } => "deadline_unreachable",
            ProxyError::UpstreamPenalty { .. } => "upstream_penalty",
            ProxyError::UpstreamUnauthorized => "upstream_unauthorized",
            ProxyError::UpstreamRejectedInput => "upstream_rejected_input",
            ProxyError::UpstreamFailed { .. } => "upstream_error",
            ProxyError::UpstreamBadBody => "upstream_bad_body",
            ProxyError::UpstreamTimeout => "upstream_timeout",
            ProxyError::CircuitOpen { .. } => "circuit_open",
            ProxyError::ShuttingDown => "shutting_down",
        }
    }

    /// Every `kind`, so metrics can pre-register them.
    pub const KINDS: [&'static str; 11] = [
        "invalid_request",
        "queue_full",
        "deadline_unreachable",
        "upstream_penalty",
        "upstream_unauthorized",
        "upstream_rejected_input",
        "upstream_error",
        "upstream_bad_body",
        "upstream_timeout",
        "circuit_open",
        "shutting_down",
    ];

    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::InvalidQuery(_) | ProxyError::UpstreamRejectedInput => {
                StatusCode::BAD_REQUEST
            }
            ProxyError::UpstreamUnauthorized => StatusCode::UNAUTHORIZED,
            ProxyError::QueueFull { .. } => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::DeadlineUnreachable { .. }
            | ProxyError::UpstreamPenalty { .. }
            | ProxyError::CircuitOpen { .. }
            | ProxyError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::UpstreamFailed { .. } | ProxyError::UpstreamBadBody => {
                StatusCode::BAD_GATEWAY
            }
            ProxyError::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The `Retry-After` to send, in whole seconds (at least 1), for every 429 and 503.
    pub fn retry_after(&self) -> Option<u64> {
        let wait = match self {
            ProxyError::QueueFull { retry_after }
            | ProxyError::DeadlineUnreachable { retry_after }
            | ProxyError::UpstreamPenalty { retry_after }
            | ProxyError::CircuitOpen { retry_after } => *retry_after,
            // A restarting proxy is usually back within seconds.
            ProxyError::ShuttingDown => Duration::from_secs(1),
            _ => return None,
        };
        Some(whole_seconds_ceil(wait))
    }

    /// Rebuilds an error from its `kind` (as another replica reported it); `None` for a kind
    /// this version does not know.
    pub fn from_kind(kind: &str, retry_after: Duration) -> Option<ProxyError> {
        Some(match kind {
            "queue_full" => ProxyError::QueueFull { retry_after },
            "deadline_unreachable" => ProxyError::DeadlineUnreachable { retry_after },
            "upstream_penalty" => ProxyError::UpstreamPenalty { retry_after },
            "upstream_unauthorized" => ProxyError::UpstreamUnauthorized,
            "upstream_rejected_input" => ProxyError::UpstreamRejectedInput,
            "upstream_error" => ProxyError::UpstreamFailed {
                detail: "reported by the replica that made the call",
            },
            "upstream_bad_body" => ProxyError::UpstreamBadBody,
            "upstream_timeout" => ProxyError::UpstreamTimeout,
            "circuit_open" => ProxyError::CircuitOpen { retry_after },
            "shutting_down" => ProxyError::ShuttingDown,
            _ => return None,
        })
    }

    /// Whether an expired cached answer may stand in for this failure (stale-if-error): when
    /// the upstream failed or could not be reached in time, not when it refused the caller.
    pub fn stale_ok(&self) -> bool {
        matches!(
            self,
            ProxyError::QueueFull { .. }
                | ProxyError::DeadlineUnreachable { .. }
                | ProxyError::UpstreamPenalty { .. }
                | ProxyError::UpstreamFailed { .. }
                | ProxyError::UpstreamBadBody
                | ProxyError::UpstreamTimeout
                | ProxyError::CircuitOpen { .. }
        )
    }

    /// The reason label of a rejected query, for the validation metrics.
    pub fn validation_reason(&self) -> Option<&'static str> {
        match self {
            ProxyError::InvalidQuery(q) => Some(q.reason()),
            _ => None,
        }
    }
}

/// Rounds up to whole seconds, at least 1: `Retry-After: 0` would invite an immediate retry
/// that meets the same refusal.
pub fn whole_seconds_ceil(d: Duration) -> u64 {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    secs.max(1)
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_after_seconds: Option<u64>,
}

impl IntoResponse for ProxyError {
    fn into_response(self) -> Response {
        let retry_after = self.retry_after();
        let body = ErrorBody {
            error: self.kind(),
            message: self.to_string(),
            retry_after_seconds: retry_after,
        };
        let mut response = (self.status(), Json(body)).into_response();
        if let Some(secs) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_rounds_up_and_is_never_zero() {
        assert_eq!(whole_seconds_ceil(Duration::ZERO), 1);
        assert_eq!(whole_seconds_ceil(Duration::from_millis(1)), 1);
        assert_eq!(whole_seconds_ceil(Duration::from_millis(1000)), 1);
        assert_eq!(whole_seconds_ceil(Duration::from_millis(1001)), 2);
        assert_eq!(whole_seconds_ceil(Duration::from_secs(20)), 20);
    }

    #[test]
    fn every_kind_is_listed_once() {
        let samples = [
            ProxyError::InvalidQuery(QueryError::Repeated("cpf")),
            ProxyError::QueueFull {
                retry_after: Duration::ZERO,
            },
            ProxyError::DeadlineUnreachable {
                retry_after: Duration::ZERO,
            },
            ProxyError::UpstreamPenalty {
                retry_after: Duration::ZERO,
            },
            ProxyError::UpstreamUnauthorized,
            ProxyError::UpstreamRejectedInput,
            ProxyError::UpstreamFailed { detail: "x" },
            ProxyError::UpstreamBadBody,
            ProxyError::UpstreamTimeout,
            ProxyError::CircuitOpen {
                retry_after: Duration::ZERO,
            },
            ProxyError::ShuttingDown,
        ];
        let kinds: Vec<_> = samples.iter().map(ProxyError::kind).collect();
        assert_eq!(kinds, ProxyError::KINDS);
        for e in &samples {
            assert_ne!(e.status(), StatusCode::OK);
            let refusal = matches!(e.status().as_u16(), 429 | 503);
            assert_eq!(refusal, e.retry_after().is_some(), "{e:?}");
        }
    }
}
