//! The OTLP/HTTP protobuf span exporter: each batch written straight to the wire format.
//!
//! `opentelemetry-otlp` first converts every span into the generated protobuf structs (a
//! `String` or `Vec` per id, name, attribute key and value), groups the batch by hashing
//! each span's instrumentation scope, then has `prost` walk the tree twice (lengths, then
//! bytes), and frees it all. With every request traced, that work on the batch thread was
//! the largest single cost of tracing on a cache hit (issue 13). Here a batch is encoded in
//! one pass into one buffer: no allocation per span, nested lengths patched in place. The
//! bytes are the same message (`tests` decode them with the generated types and compare).
//!
//! What it keeps from the crate's exporter: the endpoint, `OTEL_EXPORTER_OTLP_HEADERS` /
//! `OTEL_EXPORTER_OTLP_TRACES_HEADERS`, the timeout, and the HTTP client (a blocking
//! `reqwest` client, built on the batch thread, never on the runtime's). What it does not
//! do: retry a failed export (the batch is dropped and the failure logged once, as the
//! crate does after its retries), compress, or speak JSON (`http/json` still uses the
//! crate's exporter).

use std::fmt;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use opentelemetry::trace::{SpanKind, Status};
use opentelemetry::{Array, InstrumentationScope, KeyValue, Value};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{SpanData, SpanExporter};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

/// Exports span batches as OTLP/HTTP protobuf to one endpoint.
pub(super) struct ProtoExporter {
    endpoint: String,
    timeout: Duration,
    headers: HeaderMap,
    /// Built on the first export, on the batch processor's own thread: a blocking client
    /// must not be made or dropped on an async runtime's thread.
    client: Mutex<Option<reqwest::blocking::Client>>,
    /// The `Resource` message (its fields, without tag and length), set by the provider.
    resource: Vec<u8>,
    resource_schema: String,
    /// Whether a failure was already logged (one line, not one per batch).
    failed_once: AtomicBool,
}

impl fmt::Debug for ProtoExporter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProtoExporter")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl ProtoExporter {
    /// An exporter to `endpoint` (the full traces URL), with the headers the standard
    /// variables name (`get` reads the environment).
    pub(super) fn new(
        endpoint: String,
        timeout: Duration,
        get: impl Fn(&str) -> Option<String>,
    ) -> ProtoExporter {
        let mut headers = HeaderMap::new();
        if let Some(list) =
            get("OTEL_EXPORTER_OTLP_TRACES_HEADERS").or_else(|| get("OTEL_EXPORTER_OTLP_HEADERS"))
        {
            for (k, v) in parse_headers(&list) {
                if let (Ok(k), Ok(v)) = (HeaderName::try_from(k), HeaderValue::try_from(v)) {
                    headers.insert(k, v);
                }
            }
        }
        ProtoExporter {
            endpoint,
            timeout,
            headers,
            client: Mutex::new(None),
            resource: Vec::new(),
            resource_schema: String::new(),
            failed_once: AtomicBool::new(false),
        }
    }

    fn send(&self, body: Vec<u8>) -> Result<(), String> {
        let client = {
            let mut slot = self.client.lock().unwrap_or_else(|e| e.into_inner());
            if slot.is_none() {
                *slot = Some(
                    reqwest::blocking::Client::builder()
                        .timeout(self.timeout)
                        .build()
                        .map_err(|e| format!("building the HTTP client: {e}"))?,
                );
            }
            slot.clone().ok_or("no HTTP client")?
        };
        let response = client
            .post(&self.endpoint)
            .header(reqwest::header::CONTENT_TYPE, "application/x-protobuf")
            .headers(self.headers.clone())
            .body(body)
            .send()
            .map_err(|e| format!("network error: {e}"))?;
        let status = response.status();
        // Read to the end, so that the connection is kept for the next batch.
        let _ = response.bytes();
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("HTTP status {status}"))
        }
    }
}

impl SpanExporter for ProtoExporter {
    fn export(
        &self,
        batch: Vec<SpanData>,
    ) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        let body = encode_request(&batch, &self.resource, &self.resource_schema);
        drop(batch);
        let result = self.send(body).map_err(|e| {
            if !self.failed_once.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    endpoint = %self.endpoint,
                    error = %e,
                    "exporting spans failed (batch dropped; further failures are not logged)"
                );
            }
            OTelSdkError::InternalFailure(e)
        });
        std::future::ready(result)
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        // Dropped here, on the batch thread, like the crate's exporter does.
        self.client.lock().unwrap_or_else(|e| e.into_inner()).take();
        Ok(())
    }

    fn set_resource(&mut self, resource: &Resource) {
        let mut out = Vec::new();
        for (key, value) in resource.iter() {
            nested(&mut out, 1, |out| key_value(out, key.as_str(), value));
        }
        self.resource = out;
        self.resource_schema = resource.schema_url().unwrap_or_default().to_owned();
    }
}

/// `k1=v1,k2=v2`, values percent-decoded (as `opentelemetry-otlp` reads them).
fn parse_headers(list: &str) -> Vec<(String, String)> {
    list.split_terminator(',')
        .filter_map(|pair| {
            let (k, v) = pair.trim().split_once('=')?;
            let (k, v) = (k.trim(), v.trim());
            let v = percent_decode(v).unwrap_or_else(|| v.to_owned());
            (!k.is_empty() && !v.is_empty()).then(|| (k.to_owned(), v))
        })
        .collect()
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

// ---------------------------------------------------------------------------------------
// The wire format (opentelemetry/proto/collector/trace/v1, trace/v1, common/v1)
// ---------------------------------------------------------------------------------------

const VARINT: u32 = 0;
const FIXED64: u32 = 1;
const LEN: u32 = 2;
const FIXED32: u32 = 5;

fn varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn tag(out: &mut Vec<u8>, field: u32, wire: u32) {
    varint(out, u64::from(field << 3 | wire));
}

/// A length-delimited field, written even when empty (`bytes` and `string` fields that
/// proto3 omits when empty go through [`bytes_field`]).
fn bytes_always(out: &mut Vec<u8>, field: u32, b: &[u8]) {
    tag(out, field, LEN);
    varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

fn bytes_field(out: &mut Vec<u8>, field: u32, b: &[u8]) {
    if !b.is_empty() {
        bytes_always(out, field, b);
    }
}

fn uint_field(out: &mut Vec<u8>, field: u32, n: u64) {
    if n != 0 {
        tag(out, field, VARINT);
        varint(out, n);
    }
}

fn fixed64_field(out: &mut Vec<u8>, field: u32, n: u64) {
    if n != 0 {
        tag(out, field, FIXED64);
        out.extend_from_slice(&n.to_le_bytes());
    }
}

fn fixed32_field(out: &mut Vec<u8>, field: u32, n: u32) {
    if n != 0 {
        tag(out, field, FIXED32);
        out.extend_from_slice(&n.to_le_bytes());
    }
}

/// A nested message: its tag, then its length, patched in once `body` has written it
/// (one byte is set aside; a longer length moves the body up).
fn nested(out: &mut Vec<u8>, field: u32, body: impl FnOnce(&mut Vec<u8>)) {
    tag(out, field, LEN);
    let at = out.len();
    out.push(0);
    body(out);
    let len = out.len() - at - 1;
    if len < 0x80 {
        out[at] = len as u8;
        return;
    }
    let mut prefix = Vec::with_capacity(5);
    varint(&mut prefix, len as u64);
    let extra = prefix.len() - 1;
    out.resize(out.len() + extra, 0);
    out.copy_within(at + 1..at + 1 + len, at + 1 + extra);
    out[at..at + prefix.len()].copy_from_slice(&prefix);
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// `AnyValue`: one member of its `oneof`, always written.
fn any_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::Bool(b) => {
            tag(out, 2, VARINT);
            varint(out, u64::from(*b));
        }
        Value::I64(n) => {
            tag(out, 3, VARINT);
            varint(out, *n as u64);
        }
        Value::F64(f) => {
            tag(out, 4, FIXED64);
            out.extend_from_slice(&f.to_le_bytes());
        }
        Value::String(s) => bytes_always(out, 1, s.as_str().as_bytes()),
        Value::Array(a) => nested(out, 5, |out| match a {
            Array::Bool(v) => {
                for b in v {
                    nested(out, 1, |out| any_value(out, &Value::Bool(*b)));
                }
            }
            Array::I64(v) => {
                for n in v {
                    nested(out, 1, |out| any_value(out, &Value::I64(*n)));
                }
            }
            Array::F64(v) => {
                for f in v {
                    nested(out, 1, |out| any_value(out, &Value::F64(*f)));
                }
            }
            Array::String(v) => {
                for s in v {
                    nested(out, 1, |out| bytes_always(out, 1, s.as_str().as_bytes()));
                }
            }
            // A kind of array added to the API later: written as an empty array.
            #[allow(unreachable_patterns)]
            _ => {}
        }),
        // A kind of value added to the API later: its text, as a string.
        #[allow(unreachable_patterns)]
        other => bytes_always(out, 1, other.as_str().as_bytes()),
    }
}

/// `KeyValue`'s fields.
fn key_value(out: &mut Vec<u8>, key: &str, value: &Value) {
    bytes_field(out, 1, key.as_bytes());
    nested(out, 2, |out| any_value(out, value));
}

fn attributes(out: &mut Vec<u8>, field: u32, attrs: &[KeyValue]) {
    for kv in attrs {
        nested(out, field, |out| key_value(out, kv.key.as_str(), &kv.value));
    }
}

/// `Span.flags`: the W3C flags, and whether the parent is remote (as the crate writes it).
fn span_flags(parent_is_remote: bool, trace_flags: u8) -> u32 {
    const HAS_IS_REMOTE: u32 = 0x100;
    const IS_REMOTE: u32 = 0x200;
    u32::from(trace_flags) | HAS_IS_REMOTE | if parent_is_remote { IS_REMOTE } else { 0 }
}

fn span(out: &mut Vec<u8>, s: &SpanData) {
    let sc = &s.span_context;
    bytes_field(out, 1, &sc.trace_id().to_bytes());
    bytes_field(out, 2, &sc.span_id().to_bytes());
    let state = sc.trace_state().header();
    bytes_field(out, 3, state.as_bytes());
    if s.parent_span_id != opentelemetry::trace::SpanId::INVALID {
        bytes_field(out, 4, &s.parent_span_id.to_bytes());
    }
    bytes_field(out, 5, s.name.as_bytes());
    let kind = match s.span_kind {
        SpanKind::Internal => 1,
        SpanKind::Server => 2,
        SpanKind::Client => 3,
        SpanKind::Producer => 4,
        SpanKind::Consumer => 5,
    };
    uint_field(out, 6, kind);
    fixed64_field(out, 7, nanos(s.start_time));
    fixed64_field(out, 8, nanos(s.end_time));
    attributes(out, 9, &s.attributes);
    uint_field(out, 10, u64::from(s.dropped_attributes_count));
    for event in s.events.iter() {
        nested(out, 11, |out| {
            fixed64_field(out, 1, nanos(event.timestamp));
            bytes_field(out, 2, event.name.as_bytes());
            attributes(out, 3, &event.attributes);
            uint_field(out, 4, u64::from(event.dropped_attributes_count));
        });
    }
    uint_field(out, 12, u64::from(s.events.dropped_count));
    for link in s.links.iter() {
        nested(out, 13, |out| {
            let sc = &link.span_context;
            bytes_field(out, 1, &sc.trace_id().to_bytes());
            bytes_field(out, 2, &sc.span_id().to_bytes());
            bytes_field(out, 3, sc.trace_state().header().as_bytes());
            attributes(out, 4, &link.attributes);
            uint_field(out, 5, u64::from(link.dropped_attributes_count));
            fixed32_field(out, 6, span_flags(sc.is_remote(), sc.trace_flags().to_u8()));
        });
    }
    uint_field(out, 14, u64::from(s.links.dropped_count));
    nested(out, 15, |out| {
        let (code, message) = match &s.status {
            Status::Unset => (0, ""),
            Status::Ok => (1, ""),
            Status::Error { description } => (2, description.as_ref()),
        };
        bytes_field(out, 2, message.as_bytes());
        uint_field(out, 3, code);
    });
    fixed32_field(
        out,
        16,
        span_flags(s.parent_span_is_remote, sc.trace_flags().to_u8()),
    );
}

fn scope(out: &mut Vec<u8>, scope: &InstrumentationScope) {
    bytes_field(out, 1, scope.name().as_bytes());
    bytes_field(out, 2, scope.version().unwrap_or_default().as_bytes());
    for kv in scope.attributes() {
        nested(out, 3, |out| key_value(out, kv.key.as_str(), &kv.value));
    }
}

/// `ExportTraceServiceRequest` for `batch`: one `ResourceSpans`, and in it one `ScopeSpans`
/// per instrumentation scope, in the order the scopes first appear (spans keep their order
/// within a scope).
pub(super) fn encode_request(
    batch: &[SpanData],
    resource: &[u8],
    resource_schema: &str,
) -> Vec<u8> {
    let mut scopes: Vec<&InstrumentationScope> = Vec::new();
    for s in batch {
        if !scopes.iter().any(|sc| **sc == s.instrumentation_scope) {
            scopes.push(&s.instrumentation_scope);
        }
    }
    let mut out = Vec::with_capacity(64 + batch.len() * 320);
    nested(&mut out, 1, |out| {
        nested(out, 1, |out| out.extend_from_slice(resource));
        for sc in &scopes {
            nested(out, 2, |out| {
                nested(out, 1, |out| scope(out, sc));
                for s in batch.iter().filter(|s| s.instrumentation_scope == **sc) {
                    nested(out, 2, |out| span(out, s));
                }
                bytes_field(out, 3, sc.schema_url().unwrap_or_default().as_bytes());
            });
        }
        bytes_field(out, 3, resource_schema.as_bytes());
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::transform::common::tonic::ResourceAttributesWithSchema;
    use opentelemetry_proto::transform::trace::tonic::group_spans_by_resource_and_scope;
    use opentelemetry_sdk::trace::{SpanEvents, SpanLinks};
    use prost::Message;
    use std::borrow::Cow;

    fn data(n: u64, scope: &InstrumentationScope) -> SpanData {
        let trace_id = TraceId::from(0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736u128 + u128::from(n));
        let mut events = SpanEvents::default();
        let mut links = SpanLinks::default();
        if n % 2 == 1 {
            events.events.push(opentelemetry::trace::Event::new(
                "retry",
                SystemTime::UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789),
                vec![KeyValue::new("attempt", 2i64)],
                1,
            ));
            links.links.push(opentelemetry::trace::Link::new(
                SpanContext::new(
                    TraceId::from(7u128),
                    SpanId::from(9u64),
                    TraceFlags::SAMPLED,
                    true,
                    TraceState::from_key_value([("vendor", "x")]).unwrap(),
                ),
                vec![KeyValue::new("why", "coalesced")],
                0,
            ));
            links.dropped_count = 3;
        }
        SpanData {
            span_context: SpanContext::new(
                trace_id,
                SpanId::from(0x00f0_67aa_0ba9_02b7 + n),
                TraceFlags::SAMPLED,
                false,
                TraceState::default(),
            ),
            parent_span_id: if n.is_multiple_of(3) {
                SpanId::INVALID
            } else {
                SpanId::from(n)
            },
            parent_span_is_remote: n % 3 == 1,
            span_kind: [SpanKind::Server, SpanKind::Client, SpanKind::Internal][n as usize % 3]
                .clone(),
            name: Cow::Owned(format!(
                "span {n} with a name long enough, {}",
                "x".repeat(n as usize * 40)
            )),
            start_time: SystemTime::UNIX_EPOCH
                + Duration::from_nanos(1_700_000_000_000_000_000 + n),
            end_time: SystemTime::UNIX_EPOCH + Duration::from_nanos(1_700_000_000_000_042_000 + n),
            attributes: vec![
                KeyValue::new("http.request.method", "GET"),
                KeyValue::new("http.response.status_code", 200i64),
                KeyValue::new("negative", -5i64),
                KeyValue::new("ok", n.is_multiple_of(2)),
                KeyValue::new("ratio", 0.25f64),
                KeyValue::new("empty", ""),
                KeyValue::new("zero", 0i64),
                KeyValue::new(
                    "list",
                    Value::Array(Array::String(vec!["a".into(), "b".into()])),
                ),
                KeyValue::new("long", "y".repeat(300)),
            ],
            dropped_attributes_count: (n % 2) as u32,
            events,
            links,
            status: match n % 3 {
                0 => Status::Unset,
                1 => Status::Ok,
                _ => Status::error("upstream 503"),
            },
            instrumentation_scope: scope.clone(),
        }
    }

    #[test]
    fn the_same_message_as_the_generated_types() {
        let a = InstrumentationScope::builder("score-proxy").build();
        let b = InstrumentationScope::builder("other")
            .with_version("1.2")
            .with_schema_url("https://opentelemetry.io/schemas/1.30.0")
            .with_attributes([KeyValue::new("k", "v")])
            .build();
        let batch: Vec<SpanData> = (0..40)
            .map(|n| data(n, if n % 5 == 4 { &b } else { &a }))
            .collect();
        let resource = Resource::builder_empty()
            .with_service_name("score-proxy")
            .build();
        let mut exporter = ProtoExporter::new(
            "http://127.0.0.1:1/v1/traces".into(),
            Duration::from_secs(1),
            |_| None,
        );
        exporter.set_resource(&resource);

        let ours = encode_request(&batch, &exporter.resource, &exporter.resource_schema);
        let decoded = ExportTraceServiceRequest::decode(ours.as_slice()).unwrap();
        let theirs = ExportTraceServiceRequest {
            resource_spans: group_spans_by_resource_and_scope(
                batch,
                &ResourceAttributesWithSchema::from(&resource),
            ),
        };
        assert_eq!(decoded, theirs);
        assert_eq!(ours, theirs.encode_to_vec(), "byte for byte, too");
    }

    #[test]
    fn headers_from_the_standard_variables() {
        let e = ProtoExporter::new("http://x/v1/traces".into(), Duration::from_secs(1), |k| {
            (k == "OTEL_EXPORTER_OTLP_HEADERS")
                .then(|| "api-key=a%20b, x-team = edge ,bad".to_owned())
        });
        assert_eq!(e.headers.get("api-key").unwrap(), "a b");
        assert_eq!(e.headers.get("x-team").unwrap(), "edge");
        assert_eq!(e.headers.len(), 2);
    }
}
