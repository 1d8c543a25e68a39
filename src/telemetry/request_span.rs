//! The server span of a traced lookup, and the timings of its first two stages.
//!
//! A traced cache hit is one span: its request's server span, with the durations of
//! validation and of the cache lookup as attributes. Made through `tracing` and the
//! OpenTelemetry layer, that one span still cost a registry entry, a span builder filled
//! field by field through visitors, an SDK span started at the head, a lock per record and a
//! close: a third of a traced hit's CPU time (issue 13). So a lookup's server span starts
//! **direct**: at the head it is only ids, a start time and the caller's context; what the
//! request learns is kept in plain fields; when the request ends, the finished span is
//! handed to the SDK in one go (start, attributes, end), bypassing the layer.
//!
//! A lookup that goes on to the queue, the pacer and the upstream needs a `tracing` span
//! after all: its stages are `tracing` spans, children of the request's. There the direct
//! span is **promoted**: the same `http.server` span is made through `tracing`, given the
//! ids and the start time the head chose (through [`super::trace`]'s id generator and
//! tracer), and from then on everything is recorded on it. Either way the trace holds one
//! server span with the same name, ids and attributes.
//!
//! Other routes' server spans (and a lookup through the router) are `tracing` spans from
//! the start; an untraced request has neither ([`RequestSpan::none`]).

use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId,
    Tracer as _,
};
use opentelemetry::{Context, KeyValue};
use tracing::{Span, field};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::trace::{self, TraceIds};
use crate::http::route::Route;

/// A request's server span: none (an untraced request), a `tracing` span, or a direct one
/// (a traced lookup, until it needs its stages' spans). Clones share the one span.
#[derive(Clone)]
pub(crate) struct RequestSpan(Inner);

#[derive(Clone)]
enum Inner {
    Off,
    Tracing(Span),
    Direct(Arc<Direct>),
}

impl From<Span> for RequestSpan {
    fn from(span: Span) -> RequestSpan {
        if span.is_none() {
            RequestSpan(Inner::Off)
        } else {
            RequestSpan(Inner::Tracing(span))
        }
    }
}

/// What a direct span knows from the head: fixed for its life.
struct Direct {
    trace_id: TraceId,
    span_id: SpanId,
    /// The caller's context (its `traceparent` and `tracestate`), if it sent one.
    parent: Option<Context>,
    start: SystemTime,
    state: Mutex<State>,
}

/// What the request learns on the way, recorded as plain values (converted to attributes
/// only once, at the end).
#[derive(Default)]
struct State {
    /// Set once promoted: from then on, the span is this one and nothing else is kept here.
    promoted: Option<Span>,
    cpf: Option<String>,
    client: Option<String>,
    timings: Option<(u64, u64)>,
    response: Option<(u16, &'static str, Option<&'static str>)>,
}

impl RequestSpan {
    /// No span: the request is not traced.
    pub(crate) fn none() -> RequestSpan {
        RequestSpan(Inner::Off)
    }

    /// A traced lookup's server span, direct (see the module's doc): `ids` are the ones the
    /// head chose and put on the response.
    pub(super) fn direct(
        ids: &TraceIds,
        parent: Option<Context>,
        start: SystemTime,
    ) -> RequestSpan {
        RequestSpan(Inner::Direct(Arc::new(Direct {
            trace_id: ids.trace_id,
            span_id: ids.span_id,
            parent,
            start,
            state: Mutex::new(State::default()),
        })))
    }

    /// Whether the request is traced (its span exists).
    #[cfg(test)]
    pub(crate) fn is_traced(&self) -> bool {
        !matches!(self.0, Inner::Off)
    }

    /// The span as a `tracing` span, for what runs inside it (stage spans are its children,
    /// events its events): a direct span is promoted, once. `Span::none()` when untraced.
    pub(crate) fn tracing_span(&self) -> Span {
        match &self.0 {
            Inner::Off => Span::none(),
            Inner::Tracing(span) => span.clone(),
            Inner::Direct(direct) => direct.promote(),
        }
    }

    /// The lookup's keyed-hash tags (never the values): `tags` is called only for a traced
    /// request.
    pub(crate) fn record_key(&self, tags: impl FnOnce() -> (String, String)) {
        match &self.0 {
            Inner::Off => {}
            Inner::Tracing(span) => {
                let (cpf, client) = tags();
                span.record("score_proxy.cpf", cpf);
                span.record("score_proxy.client", client);
            }
            Inner::Direct(direct) => {
                let (cpf, client) = tags();
                let mut state = direct.lock();
                match &state.promoted {
                    Some(span) => {
                        span.record("score_proxy.cpf", cpf);
                        span.record("score_proxy.client", client);
                    }
                    None => (state.cpf, state.client) = (Some(cpf), Some(client)),
                }
            }
        }
    }

    /// A hit's stage durations, in nanoseconds.
    pub(super) fn record_timings(&self, validation: u64, lookup: u64) {
        let span = match &self.0 {
            Inner::Off => return,
            Inner::Tracing(span) => span.clone(),
            Inner::Direct(direct) => {
                let mut state = direct.lock();
                match &state.promoted {
                    Some(span) => span.clone(),
                    None => {
                        state.timings = Some((validation, lookup));
                        return;
                    }
                }
            }
        };
        let Some(fields) = span.metadata().map(|m| m.fields()) else {
            return;
        };
        let (Some(v), Some(l)) = (
            fields.field("score_proxy.validation.duration_ns"),
            fields.field("score_proxy.cache.lookup.duration_ns"),
        ) else {
            return;
        };
        let values = [
            (&v, Some(&validation as &dyn field::Value)),
            (&l, Some(&lookup as &dyn field::Value)),
        ];
        span.record_all(&fields.value_set(&values));
    }

    /// The response: see [`super::record_response`].
    pub(super) fn record_response(
        &self,
        status: u16,
        outcome: &'static str,
        cache: Option<&'static str>,
    ) {
        match &self.0 {
            Inner::Off => {}
            Inner::Tracing(span) => trace::record_response_on(span, status, outcome, cache),
            Inner::Direct(direct) => {
                let mut state = direct.lock();
                match &state.promoted {
                    Some(span) => trace::record_response_on(span, status, outcome, cache),
                    None => state.response = Some((status, outcome, cache)),
                }
            }
        }
    }

    /// The context children of this span are made in (the stage spans made after the fact):
    /// a direct span's own ids, without promoting it.
    pub(super) fn context(&self) -> Context {
        match &self.0 {
            Inner::Off => Context::new(),
            Inner::Tracing(span) => span.context(),
            Inner::Direct(direct) => {
                if let Some(span) = &direct.lock().promoted {
                    return span.context();
                }
                let state = direct
                    .parent
                    .as_ref()
                    .map(|cx| cx.span().span_context().trace_state().clone())
                    .unwrap_or_default();
                Context::new().with_remote_span_context(SpanContext::new(
                    direct.trace_id,
                    direct.span_id,
                    TraceFlags::SAMPLED,
                    false,
                    state,
                ))
            }
        }
    }
}

impl Direct {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The same server span, made through `tracing` now, with the head's ids and start
    /// time, and what was recorded so far.
    fn promote(&self) -> Span {
        let mut state = self.lock();
        if let Some(span) = &state.promoted {
            return span.clone();
        }
        let span = trace::server_tracing_span(
            "GET /proxy/score",
            "GET",
            Route::Score,
            Route::Score.as_str(),
        );
        if let (Some(cpf), Some(client)) = (state.cpf.take(), state.client.take()) {
            span.record("score_proxy.cpf", cpf);
            span.record("score_proxy.client", client);
        }
        trace::start_as(
            &span,
            self.parent.clone(),
            self.trace_id,
            self.span_id,
            self.start,
        );
        state.promoted = Some(span.clone());
        drop(state);
        span
    }

    /// The finished span, straight to the SDK (and from there to the batch processor).
    fn export(&mut self) {
        let state = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        if state.promoted.is_some() {
            return;
        }
        let Some(tracer) = trace::tracer() else {
            return;
        };
        let mut attributes = Vec::with_capacity(12);
        attributes.extend([
            KeyValue::new("http.request.method", "GET"),
            KeyValue::new("http.route", Route::Score.as_str()),
            KeyValue::new("url.path", Route::Score.as_str()),
            KeyValue::new("url.scheme", "http"),
        ]);
        let mut status = Status::Unset;
        if let Some((code, outcome, cache)) = state.response {
            attributes.push(KeyValue::new("http.response.status_code", i64::from(code)));
            if (500..600).contains(&code) {
                attributes.push(KeyValue::new("error.type", outcome));
                status = Status::error("");
            }
            attributes.push(KeyValue::new("score_proxy.outcome", outcome));
            if let Some(cache) = cache {
                attributes.push(KeyValue::new("score_proxy.cache", cache));
            }
        }
        if let Some(cpf) = state.cpf.take() {
            attributes.push(KeyValue::new("score_proxy.cpf", cpf));
        }
        if let Some(client) = state.client.take() {
            attributes.push(KeyValue::new("score_proxy.client", client));
        }
        if let Some((validation, lookup)) = state.timings {
            let as_i64 = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
            attributes.push(KeyValue::new(
                "score_proxy.validation.duration_ns",
                as_i64(validation),
            ));
            attributes.push(KeyValue::new(
                "score_proxy.cache.lookup.duration_ns",
                as_i64(lookup),
            ));
        }
        let builder = tracer
            .span_builder("GET /proxy/score")
            .with_kind(SpanKind::Server)
            .with_start_time(self.start)
            .with_attributes(attributes);
        let empty = Context::new();
        let parent = self.parent.as_ref().unwrap_or(&empty);
        let mut span = trace::with_head_ids(self.trace_id, self.span_id, || {
            tracer.build_with_context(builder, parent)
        });
        if status != Status::Unset {
            span.set_status(status);
        }
        span.end();
    }
}

impl Drop for Direct {
    /// The request is over (answered, or its client hung up): a span not promoted is
    /// exported now, as the `tracing` span would have been when closed.
    fn drop(&mut self) {
        self.export();
    }
}

/// When a traced lookup's first two stages ran. Those stages take microseconds and nearly
/// always end in a hit, so no span is made while they run: a hit records their durations on
/// the server span, and any other outcome gets their spans afterwards, with these times.
pub(crate) struct HeadStages {
    started: SystemTime,
    validated: Option<SystemTime>,
    looked_up: Option<SystemTime>,
}

impl HeadStages {
    /// Starts the clock for a traced request; `None` (nothing measured) for the others.
    pub(crate) fn start(trace: &TraceIds) -> Option<HeadStages> {
        trace.traced().then(|| HeadStages {
            started: SystemTime::now(),
            validated: None,
            looked_up: None,
        })
    }

    pub(crate) fn validated(&mut self) {
        self.validated = Some(SystemTime::now());
    }

    pub(crate) fn looked_up(&mut self) {
        self.looked_up = Some(SystemTime::now());
    }

    /// A cache hit: the durations become attributes of the request's (only) span.
    pub(crate) fn hit(&self, request: &RequestSpan) {
        let nanos = |from: SystemTime, to: Option<SystemTime>| {
            to.and_then(|to| to.duration_since(from).ok())
                .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        };
        let validated = self.validated.unwrap_or(self.started);
        request.record_timings(
            nanos(self.started, self.validated),
            nanos(validated, self.looked_up),
        );
    }

    /// Anything but a hit: the stages that ran become child spans of the request's,
    /// `cache.lookup` with its `result` (`miss`: stale counts as a miss here, it goes on to
    /// fetch).
    pub(crate) fn spans(&self, request: &RequestSpan) {
        let Some(tracer) = trace::tracer() else {
            return;
        };
        let parent = request.context();
        let validated = self.validated.unwrap_or_else(SystemTime::now);
        let finished = |name: &'static str, start, end, attributes| {
            let mut span = tracer
                .span_builder(name)
                .with_start_time(start)
                .with_attributes(attributes)
                .start_with_context(tracer, &parent);
            span.end_with_timestamp(end);
        };
        finished("validation", self.started, validated, Vec::new());
        if let Some(looked_up) = self.looked_up {
            finished(
                "cache.lookup",
                validated,
                looked_up,
                vec![KeyValue::new("score_proxy.cache.result", "miss")],
            );
        }
    }
}

/// The head of a request: decides whether it is traced and returns its server span (none
/// when it is not; not yet entered) and the ids to put on the response. With `direct`, a
/// traced `GET /proxy/score` gets a direct span ([`RequestSpan`]'s doc).
pub(crate) fn server_span(
    route: crate::http::route::Route,
    method: &http::Method,
    path: &str,
    headers: &http::HeaderMap,
    direct: bool,
) -> (RequestSpan, TraceIds) {
    match trace::decide_head(route, method, path, headers, direct) {
        trace::Headed::Untraced(ids) => (RequestSpan::none(), ids),
        trace::Headed::Direct(ids, parent, start) => {
            (RequestSpan::direct(&ids, parent, start), ids)
        }
        trace::Headed::Span(span, ids) => (RequestSpan::from(span), ids),
    }
}

/// The response on the server span (nothing for an untraced request): status code,
/// outcome, cache result, and for a 5xx the error type and status.
pub(crate) fn record_response(
    span: &RequestSpan,
    status: u16,
    outcome: &'static str,
    cache: Option<&'static str>,
) {
    span.record_response(status, outcome, cache);
}
