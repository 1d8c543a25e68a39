//! Stage 5: the upstream call itself.
//!
//! One `reqwest` client (rustls, pooled keep-alive connections so calls after the first skip
//! the handshake and arrive with less jitter) with a hard timeout on the whole exchange: the
//! original had none, and one hung call blocked everyone. The CPF goes into the URL through
//! the URL encoder (after validation it is digits only anyway), and the client id only as the
//! `client-id` header, never into the URL.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use http::HeaderValue;
use tokio::time::Instant;
use url::Url;

use crate::lookup::error::ProxyError;
use crate::lookup::validation::LookupKey;

/// Largest upstream body accepted; a score answer is a few hundred bytes.
pub(crate) const MAX_BODY_BYTES: usize = 256 * 1024;

/// The longest penalty we will honour from a `Retry-After`; beyond it the header is more
/// likely wrong than meant, and an hour-long freeze would be worse than a retry.
pub(crate) const MAX_PENALTY: Duration = Duration::from_secs(600);

pub(crate) struct UpstreamClient {
    http: reqwest::Client,
    url: Url,
}

/// What one call came to, with everything the caller needs to record it.
#[derive(Debug)]
pub(crate) struct CallResult {
    /// The upstream's status code, if it answered.
    pub(crate) status: Option<u16>,
    pub(crate) outcome: UpstreamOutcome,
    /// The body of a successful answer.
    pub(crate) body: Option<Bytes>,
    /// For a 429: the penalty the upstream announced (`Retry-After`), if it did.
    pub(crate) retry_after: Option<Duration>,
    /// When the answer (or the failure) arrived.
    pub(crate) finished_at: Instant,
}

impl CallResult {
    /// The error to give the waiting clients, for every outcome but `Ok` and `Penalty`
    /// (a penalty is retried or turned into a refusal by the dispatcher, which knows the
    /// deadlines).
    pub(crate) fn error(&self) -> ProxyError {
        match self.outcome {
            UpstreamOutcome::Ok | UpstreamOutcome::BadBody => ProxyError::UpstreamBadBody,
            UpstreamOutcome::Unauthorized => ProxyError::UpstreamUnauthorized,
            UpstreamOutcome::RejectedInput => ProxyError::UpstreamRejectedInput,
            UpstreamOutcome::Penalty => ProxyError::UpstreamPenalty {
                retry_after: self.retry_after.unwrap_or(Duration::from_secs(2)),
            },
            UpstreamOutcome::ServerError => ProxyError::UpstreamFailed {
                detail: "server error",
            },
            UpstreamOutcome::UnexpectedStatus => ProxyError::UpstreamFailed {
                detail: "unexpected status",
            },
            UpstreamOutcome::Timeout => ProxyError::UpstreamTimeout,
            UpstreamOutcome::ConnectError => ProxyError::UpstreamFailed {
                detail: "connection failed",
            },
        }
    }
}

impl UpstreamClient {
    /// The upstream's address (no query).
    pub(crate) fn url(&self) -> &Url {
        &self.url
    }

    /// `on_connect` hears of every new connection (how long it took to open, and when it
    /// was ready): a call that has to open one leaves that much after its start.
    pub(crate) fn new(url: Url, timeout: Duration, on_connect: OnConnect) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            .user_agent(concat!("score-proxy/", env!("CARGO_PKG_VERSION")))
            .connector_layer(TimedConnectLayer(on_connect))
            .build()?;
        Ok(UpstreamClient { http, url })
    }

    /// Makes one call. Never panics and never returns early: every failure is a `CallResult`.
    pub(crate) async fn call(
        &self,
        key: &LookupKey,
        traceparent: Option<HeaderValue>,
    ) -> CallResult {
        let mut url = self.url.clone();
        url.query_pairs_mut()
            .append_pair("cpf", &key.cpf.to_string());
        let mut request = self
            .http
            .get(url)
            .header("accept", "application/json")
            .header("client-id", key.client_id.as_str());
        if let Some(tp) = traceparent {
            request = request.header("traceparent", tp);
        }

        let finished = |status, outcome, body, retry_after| CallResult {
            status,
            outcome,
            body,
            retry_after,
            finished_at: Instant::now(),
        };

        let response = match request.send().await {
            Ok(r) => r,
            Err(e) => return finished(None, transport_outcome(&e), None, None),
        };
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, SystemTime::now()));

        let outcome = match status {
            200 => UpstreamOutcome::Ok,
            401 | 403 => UpstreamOutcome::Unauthorized,
            400 | 422 => UpstreamOutcome::RejectedInput,
            429 => UpstreamOutcome::Penalty,
            500..=599 => UpstreamOutcome::ServerError,
            _ => UpstreamOutcome::UnexpectedStatus,
        };
        if outcome != UpstreamOutcome::Ok {
            // Read (and drop) the body so the connection can be reused.
            let _ = read_capped(response).await;
            return finished(Some(status), outcome, None, retry_after);
        }
        match read_capped(response).await {
            Ok(body) if is_score_object(&body) => {
                finished(Some(status), UpstreamOutcome::Ok, Some(body), None)
            }
            Ok(_) => finished(Some(status), UpstreamOutcome::BadBody, None, None),
            Err(e) if e.is_timeout() => {
                finished(Some(status), UpstreamOutcome::Timeout, None, None)
            }
            Err(_) => finished(Some(status), UpstreamOutcome::BadBody, None, None),
        }
    }
}

fn transport_outcome(e: &reqwest::Error) -> UpstreamOutcome {
    if e.is_timeout() {
        UpstreamOutcome::Timeout
    } else {
        UpstreamOutcome::ConnectError
    }
}

/// Reads the body, refusing more than [`MAX_BODY_BYTES`].
async fn read_capped(mut response: reqwest::Response) -> Result<Bytes, ReadError> {
    let mut body = BytesMut::new();
    while let Some(chunk) = response.chunk().await.map_err(ReadError::Transport)? {
        if body.len() + chunk.len() > MAX_BODY_BYTES {
            return Err(ReadError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

enum ReadError {
    Transport(reqwest::Error),
    TooLarge,
}

impl ReadError {
    fn is_timeout(&self) -> bool {
        matches!(self, ReadError::Transport(e) if e.is_timeout())
    }
}

/// A successful answer must be a JSON object holding a `score`; the rest is passed through.
fn is_score_object(body: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(body)
        .is_ok_and(|obj| obj.contains_key("score"))
}

/// Parses `Retry-After` as delta-seconds or an HTTP date (RFC 9110 §10.2.3). Dates in the
/// past give zero; anything longer than [`MAX_PENALTY`] is capped. Garbage gives `None`.
pub(crate) fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    let wait = if let Ok(secs) = value.parse::<u64>() {
        Duration::from_secs(secs)
    } else {
        let at = httpdate::parse_http_date(value).ok()?;
        at.duration_since(now).unwrap_or(Duration::ZERO)
    };
    Some(wait.min(MAX_PENALTY))
}

/// Told of each new upstream connection: how long it took to open, and when it was ready.
pub(crate) type OnConnect = Arc<dyn Fn(Duration, Instant) + Send + Sync>;

/// Times reqwest's connector (DNS, TCP and TLS). A call on a pooled connection leaves when it
/// starts; one that must open a connection (the first, or the first after an idle spell)
/// leaves when the connection is ready, a TLS handshake later. The dispatcher uses this to
/// keep the *arrivals* an interval apart, not only the starts.
#[derive(Clone)]
struct TimedConnectLayer(OnConnect);

impl<S> tower::Layer<S> for TimedConnectLayer {
    type Service = TimedConnect<S>;

    fn layer(&self, inner: S) -> TimedConnect<S> {
        TimedConnect {
            inner,
            on_connect: self.0.clone(),
        }
    }
}

#[derive(Clone)]
struct TimedConnect<S> {
    inner: S,
    on_connect: OnConnect,
}

impl<S, R> tower::Service<R> for TimedConnect<S>
where
    S: tower::Service<R>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, target: R) -> Self::Future {
        let started = Instant::now();
        let connecting = self.inner.call(target);
        let on_connect = self.on_connect.clone();
        Box::pin(async move {
            let connected = connecting.await;
            if connected.is_ok() {
                let ready = Instant::now();
                on_connect(ready - started, ready);
            }
            connected
        })
    }
}

/// What an upstream call came to (the `outcome` label: the name in snake case).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, strum::IntoStaticStr, strum::VariantArray)]
#[strum(serialize_all = "snake_case")]
pub(crate) enum UpstreamOutcome {
    Ok,
    Unauthorized,
    RejectedInput,
    Penalty,
    ServerError,
    UnexpectedStatus,
    BadBody,
    Timeout,
    ConnectError,
}

impl UpstreamOutcome {
    pub(crate) fn as_str(self) -> &'static str {
        self.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_in_seconds_and_as_a_date() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after("3", now), Some(Duration::from_secs(3)));
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        let date = httpdate::fmt_http_date(now + Duration::from_secs(5));
        assert_eq!(parse_retry_after(&date, now), Some(Duration::from_secs(5)));
        let past = httpdate::fmt_http_date(now - Duration::from_secs(5));
        assert_eq!(parse_retry_after(&past, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("99999", now), Some(MAX_PENALTY));
        assert_eq!(parse_retry_after("-1", now), None);
        assert_eq!(parse_retry_after("2 seconds", now), None);
        assert_eq!(parse_retry_after("", now), None);
    }

    #[tokio::test]
    async fn a_new_connection_is_timed_once_and_reused_calls_are_not() {
        use std::sync::Mutex;
        let sim = score_sim::Simulator::spawn(score_sim::SimulatorConfig {
            min_interval: Duration::ZERO,
            ..Default::default()
        })
        .await
        .unwrap();
        let seen: Arc<Mutex<Vec<(Duration, Instant)>>> = Arc::default();
        let on_connect: OnConnect = {
            let seen = seen.clone();
            Arc::new(move |took, ready| seen.lock().unwrap().push((took, ready)))
        };
        let client = UpstreamClient::new(
            sim.url().parse().unwrap(),
            Duration::from_secs(5),
            on_connect,
        )
        .unwrap();
        let key =
            crate::lookup::validation::parse_lookup(Some("cpf=52998224725&client_id=000"), None)
                .unwrap();
        let before = Instant::now();
        let first = client.call(&key, None).await;
        assert_eq!(first.outcome, UpstreamOutcome::Ok);
        {
            let seen = seen.lock().unwrap();
            assert_eq!(seen.len(), 1, "the first call opened a connection");
            let (took, ready) = seen[0];
            assert!(ready >= before + took && ready <= first.finished_at);
        }
        // The second call reuses the pooled connection: nothing to time.
        let second = client.call(&key, None).await;
        assert_eq!(second.outcome, UpstreamOutcome::Ok);
        assert_eq!(seen.lock().unwrap().len(), 1);
    }

    #[test]
    fn score_bodies() {
        assert!(is_score_object(br#"{"score": 700, "cpf": "x"}"#));
        assert!(!is_score_object(br#"{"scor": 700}"#));
        assert!(!is_score_object(br#"[{"score": 700}]"#));
        assert!(!is_score_object(b"<html>oops</html>"));
        assert!(!is_score_object(b""));
    }
}
