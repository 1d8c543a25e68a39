//! The bulk jobs API: `POST /jobs`, `GET /jobs/{id}`, `GET /jobs/{id}/results`,
//! `DELETE /jobs/{id}` (see `crate::jobs` for what a job does).
//!
//! A job belongs to the client id that submitted it: every request about it carries
//! `client_id` in the query, as a lookup does, and any other client id gets `404` (the same
//! answer as for an id that does not exist). Bad input gets a clear `4xx` before anything is
//! stored.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use crate::app::App;
use crate::jobs::model::{CSV_HEADER, JobId, Line, csv_line};
use crate::jobs::{JobError, Jobs};
use crate::lookup::validation::ClientId;

/// The query of every job request. Other parameters are ignored; each of these may appear
/// at most once (as a lookup's).
#[derive(Debug, Default)]
pub(crate) struct JobQuery {
    client_id: Option<String>,
    format: Option<String>,
}

impl JobQuery {
    fn parse(raw: Option<&str>) -> Result<JobQuery, Refused> {
        let mut query = JobQuery::default();
        for (name, value) in url::form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
            let slot = match name.as_ref() {
                "client_id" => &mut query.client_id,
                "format" => &mut query.format,
                _ => continue,
            };
            if slot.replace(value.into_owned()).is_some() {
                return Err(Refused::Client(
                    "client_id and format may each appear at most once",
                ));
            }
        }
        Ok(query)
    }
}

/// A JSON submission.
#[derive(Debug, Deserialize)]
struct Submission {
    client_id: Option<String>,
    cpfs: Vec<String>,
}

/// Bytes of body allowed per CPF (a formatted CPF in quotes with a comma is 17).
const BYTES_PER_ITEM: usize = 64;

fn error(status: StatusCode, kind: &str, message: &str) -> Response {
    (
        status,
        [(header::CACHE_CONTROL, HeaderValue::from_static("no-store"))],
        axum::Json(serde_json::json!({ "error": kind, "message": message })),
    )
        .into_response()
}

impl IntoResponse for JobError {
    fn into_response(self) -> Response {
        let message = self.to_string();
        let (status, kind) = match self {
            JobError::TooManyItems(_) => (StatusCode::PAYLOAD_TOO_LARGE, "too_many_items"),
            JobError::Empty => (StatusCode::BAD_REQUEST, "invalid_request"),
            JobError::TooManyJobs(_) => (StatusCode::TOO_MANY_REQUESTS, "too_many_jobs"),
            JobError::NotFound => (StatusCode::NOT_FOUND, "not_found"),
            JobError::NotStored => (StatusCode::SERVICE_UNAVAILABLE, "not_stored"),
            JobError::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable"),
        };
        let mut response = error(status, kind, &message);
        if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("60"));
        }
        response
    }
}

/// A request refused before the jobs manager is asked: a bad client id, or a job id that
/// cannot exist (`404`, as for one that does not).
enum Refused {
    Client(&'static str),
    Job,
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        match self {
            Refused::Client(message) => error(StatusCode::BAD_REQUEST, "invalid_request", message),
            Refused::Job => JobError::NotFound.into_response(),
        }
    }
}

/// The client id of a request: the query's, else the configured default.
fn client_of(app: &App, given: Option<&str>) -> Result<ClientId, Refused> {
    match given {
        Some(raw) => ClientId::parse(raw).map_err(|e| Refused::Client(e.message())),
        None => app.default_client_id().cloned().ok_or(Refused::Client(
            "the client_id parameter is required (no default client id is configured)",
        )),
    }
}

/// What a request about one job names: the job, its client, and the rest of the query.
fn addressed(
    app: &App,
    id: &str,
    raw: Option<&str>,
) -> Result<(JobId, ClientId, JobQuery), Refused> {
    let query = JobQuery::parse(raw)?;
    let id = JobId::parse(id).ok_or(Refused::Job)?;
    let client = client_of(app, query.client_id.as_deref())?;
    Ok((id, client, query))
}

/// `POST /jobs`: JSON `{"client_id", "cpfs": [...]}`, or `text/csv` / `text/plain` with one
/// CPF per line and `client_id` in the query. `202` with `Location` once the job is stored.
pub(crate) async fn submit(
    State(app): State<Arc<App>>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let query = match JobQuery::parse(raw.as_deref()) {
        Ok(q) => q,
        Err(r) => return r.into_response(),
    };
    let limit = app.jobs.max_items() * BYTES_PER_ITEM + 4096;
    let bytes = match axum::body::to_bytes(body, limit).await {
        Ok(bytes) => bytes,
        Err(_) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_many_items",
                &format!(
                    "the body is larger than {limit} bytes (a job holds at most {} CPFs)",
                    app.jobs.max_items()
                ),
            );
        }
    };
    let media = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase())
        .unwrap_or_default();
    let (given, cpfs) = match media.as_str() {
        "application/json" => match serde_json::from_slice::<Submission>(&bytes) {
            Ok(s) => (s.client_id.or(query.client_id), s.cpfs),
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "invalid_body",
                    &format!(
                        "the body must be a JSON object with a \"cpfs\" array of strings \
                         (error at line {}, column {})",
                        e.line(),
                        e.column()
                    ),
                );
            }
        },
        "text/csv" | "text/plain" => match lines(&bytes) {
            Some(cpfs) => (query.client_id, cpfs),
            None => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "invalid_body",
                    "the body must be UTF-8 text with one CPF per line",
                );
            }
        },
        _ => {
            return error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send application/json, text/csv or text/plain",
            );
        }
    };
    let client = match client_of(&app, given.as_deref()) {
        Ok(c) => c,
        Err(r) => return r.into_response(),
    };
    match app.jobs.submit(client, cpfs).await {
        Ok(status) => {
            let location = status.links["self"].as_str().unwrap_or_default().to_owned();
            let mut response = (StatusCode::ACCEPTED, axum::Json(status)).into_response();
            if let Ok(v) = HeaderValue::from_str(&location) {
                response.headers_mut().insert(header::LOCATION, v);
            }
            response
        }
        Err(e) => e.into_response(),
    }
}

/// One CPF per line; blank lines skipped, a first line `cpf` taken as a header, surrounding
/// quotes and spaces removed. `None` if the body is not UTF-8.
fn lines(bytes: &Bytes) -> Option<Vec<String>> {
    let text = std::str::from_utf8(bytes).ok()?;
    let mut cpfs: Vec<String> = text
        .lines()
        .map(|l| l.trim().trim_matches('"').trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect();
    if cpfs.first().is_some_and(|h| h.eq_ignore_ascii_case("cpf")) {
        cpfs.remove(0);
    }
    Some(cpfs)
}

/// `GET /jobs/{id}`: the job's state and counts.
pub(crate) async fn status(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Response {
    let (id, client, _) = match addressed(&app, &id, raw.as_deref()) {
        Ok(found) => found,
        Err(r) => return r.into_response(),
    };
    match app.jobs.status(id, &client).await {
        Ok(status) => axum::Json(status).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `DELETE /jobs/{id}`: cancels it; its status after.
pub(crate) async fn cancel(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Response {
    let (id, client, _) = match addressed(&app, &id, raw.as_deref()) {
        Ok(found) => found,
        Err(r) => return r.into_response(),
    };
    match app.jobs.cancel(id, &client).await {
        Ok(status) => axum::Json(status).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `GET /jobs/{id}/results`: one NDJSON line per CPF in submission order, as far as done,
/// streamed while the job runs (`?format=csv` for CSV).
pub(crate) async fn results(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Response {
    let (id, client, query) = match addressed(&app, &id, raw.as_deref()) {
        Ok(found) => found,
        Err(r) => return r.into_response(),
    };
    let csv = match query.format.as_deref() {
        None | Some("ndjson") => false,
        Some("csv") => true,
        Some(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "format must be ndjson or csv",
            );
        }
    };
    let reader = match app.jobs.reader(id, &client).await {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let jobs: Arc<Jobs> = app.jobs.clone();
    let head =
        csv.then(|| Ok::<_, std::convert::Infallible>(Bytes::from_static(CSV_HEADER.as_bytes())));
    let stream =
        futures_util::stream::unfold((jobs, reader), move |(jobs, mut reader)| async move {
            let chunk = if csv {
                jobs.next_lines(&mut reader, csv_line).await
            } else {
                jobs.next_lines(&mut reader, |index, cpf, result| {
                    let mut line = serde_json::to_string(&Line { index, cpf, result })
                        .expect("a line serializes");
                    line.push('\n');
                    line
                })
                .await
            }?;
            Some((Ok(Bytes::from(chunk)), (jobs, reader)))
        });
    let body = Body::from_stream(futures_util::StreamExt::chain(
        futures_util::stream::iter(head),
        stream,
    ));
    let media = if csv {
        "text/csv; charset=utf-8"
    } else {
        "application/x-ndjson"
    };
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(media)),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        ],
        body,
    )
        .into_response()
}
