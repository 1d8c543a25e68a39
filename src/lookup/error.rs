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
use strum::{EnumCount, VariantNames};

use crate::lookup::validation::QueryError;

/// Why a lookup did not produce a score.
///
/// `Clone` because one coalesced upstream outcome is handed to every waiter. Each variant's
/// `kind` string is its name in snake case unless it says otherwise, spelled once by the
/// derived [`ErrorKind`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, strum::EnumDiscriminants)]
#[strum_discriminants(
    name(ErrorKind),
    derive(
        strum::IntoStaticStr,
        strum::EnumString,
        strum::VariantNames,
        strum::EnumCount
    ),
    strum(serialize_all = "snake_case"),
    doc = "The kind of a [`ProxyError`], without its details: what `kind()` spells."
)]
pub enum ProxyError {
    #[error("{}", .0.message())]
    #[strum_discriminants(strum(serialize = "invalid_request"))]
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
    #[strum_discriminants(strum(serialize = "upstream_error"))]
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
        ErrorKind::from(self).into()
    }

    /// Every `kind`, in declaration order, so metrics can pre-register them.
    pub const KINDS: [&'static str; ErrorKind::COUNT] = {
        let mut kinds = [""; ErrorKind::COUNT];
        let mut i = 0;
        while i < kinds.len() {
            kinds[i] = ErrorKind::VARIANTS[i];
            i += 1;
        }
        kinds
    };

    pub(crate) fn status(&self) -> StatusCode {
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
    pub(crate) fn retry_after(&self) -> Option<u64> {
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
    /// this version does not know, and for `invalid_request`: a query that fails validation
    /// never reaches shared mode, so no replica reports one.
    pub(crate) fn from_kind(kind: &str, retry_after: Duration) -> Option<ProxyError> {
        Some(match kind.parse::<ErrorKind>().ok()? {
            ErrorKind::InvalidQuery => return None,
            ErrorKind::QueueFull => ProxyError::QueueFull { retry_after },
            ErrorKind::DeadlineUnreachable => ProxyError::DeadlineUnreachable { retry_after },
            ErrorKind::UpstreamPenalty => ProxyError::UpstreamPenalty { retry_after },
            ErrorKind::UpstreamUnauthorized => ProxyError::UpstreamUnauthorized,
            ErrorKind::UpstreamRejectedInput => ProxyError::UpstreamRejectedInput,
            ErrorKind::UpstreamFailed => ProxyError::UpstreamFailed {
                detail: "reported by the replica that made the call",
            },
            ErrorKind::UpstreamBadBody => ProxyError::UpstreamBadBody,
            ErrorKind::UpstreamTimeout => ProxyError::UpstreamTimeout,
            ErrorKind::CircuitOpen => ProxyError::CircuitOpen { retry_after },
            ErrorKind::ShuttingDown => ProxyError::ShuttingDown,
        })
    }

    /// Whether an expired cached answer may stand in for this failure (stale-if-error): when
    /// the upstream failed or could not be reached in time, not when it refused the caller.
    pub(crate) fn stale_ok(&self) -> bool {
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
}

/// Rounds up to whole seconds, at least 1: `Retry-After: 0` would invite an immediate retry
/// that meets the same refusal.
pub(crate) fn whole_seconds_ceil(d: Duration) -> u64 {
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

    /// Each kind is spelled once and names one variant, which `from_kind` rebuilds (all but
    /// `invalid_request`); the wire's spellings are pinned by `tests/openapi.rs` against the
    /// published document.
    #[test]
    fn every_kind_is_listed_once() {
        let distinct: std::collections::BTreeSet<_> = ProxyError::KINDS.into_iter().collect();
        assert_eq!(distinct.len(), ProxyError::KINDS.len());
        for kind in ProxyError::KINDS {
            let e = ProxyError::from_kind(kind, Duration::ZERO)
                .unwrap_or(ProxyError::InvalidQuery(QueryError::Repeated("cpf")));
            assert_eq!(e.kind(), kind);
            assert_ne!(e.status(), StatusCode::OK);
            let refusal = matches!(e.status().as_u16(), 429 | 503);
            assert_eq!(refusal, e.retry_after().is_some(), "{e:?}");
        }
        assert_eq!(
            ProxyError::from_kind("invalid_request", Duration::ZERO),
            None
        );
        assert_eq!(ProxyError::from_kind("no_such_kind", Duration::ZERO), None);
    }
}
