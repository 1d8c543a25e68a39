//! The OpenAPI description (`src/openapi.json`, served at `/openapi.json`) against the code
//! it describes: every route of the public listener is in it and nothing else, the error
//! kinds are exactly those `error.rs` can produce, and the live app serves the document.
//! `scripts/schemathesis.sh` then checks live responses against it.

mod common;

use std::collections::BTreeSet;

use score_proxy::lookup::error::ProxyError;
use serde_json::Value;

const SPEC: &str = include_str!("../src/http/openapi.json");

/// The routes `http::router` registers on the public listener (with `--public-metrics`,
/// the default). Kept by hand on purpose: adding a route should mean updating this list,
/// the document and the README together.
const ROUTES: [&str; 11] = [
    "/",
    "/proxy/score",
    "/health",
    "/ready",
    "/status",
    "/status/feed",
    "/metrics",
    "/openapi.json",
    "/jobs",
    "/jobs/{id}",
    "/jobs/{id}/results",
];

/// The methods each route serves: GET, but for the bulk jobs API.
fn methods_of(path: &str) -> &'static [&'static str] {
    match path {
        "/jobs" => &["post"],
        "/jobs/{id}" => &["delete", "get"],
        _ => &["get"],
    }
}

fn spec() -> Value {
    serde_json::from_str(SPEC).expect("src/openapi.json is valid JSON")
}

fn paths(spec: &Value) -> BTreeSet<String> {
    spec["paths"]
        .as_object()
        .expect("paths is an object")
        .keys()
        .cloned()
        .collect()
}

#[test]
fn document_is_openapi_3_0_with_every_public_route() {
    let spec = spec();
    assert_eq!(spec["openapi"], "3.0.3");
    let documented = paths(&spec);
    let expected: BTreeSet<String> = ROUTES.iter().map(|s| s.to_string()).collect();
    assert_eq!(
        documented, expected,
        "documented paths vs the router's routes"
    );
    for (path, item) in spec["paths"].as_object().unwrap() {
        let mut methods: Vec<&String> = item.as_object().unwrap().keys().collect();
        methods.sort();
        assert_eq!(methods, methods_of(path), "{path}: the methods served");
        for method in methods {
            let responses = item[method]["responses"].as_object().unwrap();
            let success = if path == "/jobs" { "202" } else { "200" };
            assert!(
                responses.contains_key(success),
                "{path} {method}: no {success}"
            );
        }
    }
}

/// The hand-kept list above against the source of `http::router`, so that a route added
/// there without being documented fails here rather than in production.
#[test]
fn route_list_matches_the_router_source() {
    let source = include_str!("../src/http/mod.rs");
    let start = source
        .find("fn router(")
        .expect("http/mod.rs defines `fn router`");
    let body = &source[start..];
    let end = body.find("\n}\n").expect("end of `router`");
    let registered: BTreeSet<String> = body[..end]
        .split(".route(\"")
        .skip(1)
        .map(|rest| rest.split('"').next().unwrap().to_owned())
        .collect();
    let expected: BTreeSet<String> = ROUTES.iter().map(|s| s.to_string()).collect();
    assert_eq!(registered, expected, "routes registered in http::router");
}

/// Error kinds produced outside `ProxyError`: the router's fallbacks and size limits
/// (`http/mod.rs`) and the connections refused before a request is read (`http/server.rs`).
const OTHER_KINDS: [(&str, &str); 11] = [
    ("too_many_items", include_str!("../src/http/jobs.rs")),
    ("too_many_jobs", include_str!("../src/http/jobs.rs")),
    ("not_stored", include_str!("../src/http/jobs.rs")),
    ("store_unavailable", include_str!("../src/http/jobs.rs")),
    ("invalid_body", include_str!("../src/http/jobs.rs")),
    (
        "unsupported_media_type",
        include_str!("../src/http/jobs.rs"),
    ),
    ("not_found", include_str!("../src/http/mod.rs")),
    ("method_not_allowed", include_str!("../src/http/mod.rs")),
    ("uri_too_long", include_str!("../src/http/mod.rs")),
    ("headers_too_large", include_str!("../src/http/mod.rs")),
    ("overloaded", include_str!("../src/http/server.rs")),
];

#[test]
fn error_kinds_are_exactly_those_of_error_rs() {
    let spec = spec();
    let documented: BTreeSet<&str> = spec["components"]["schemas"]["ErrorKind"]["enum"]
        .as_array()
        .expect("ErrorKind has an enum")
        .iter()
        .map(|v| v.as_str().expect("kinds are strings"))
        .collect();
    let mut expected: BTreeSet<&str> = ProxyError::KINDS.into_iter().collect();
    for (kind, source) in OTHER_KINDS {
        assert!(
            source.contains(&format!("\"{kind}\"")),
            "{kind} is no longer produced; update OTHER_KINDS and the document"
        );
        expected.insert(kind);
    }
    assert_eq!(documented, expected);
}

/// Every `$ref` points at something that exists (schemathesis would otherwise fail on
/// load, far from the mistake).
#[test]
fn every_reference_resolves() {
    fn walk(v: &Value, root: &Value, seen: &mut usize) {
        match v {
            Value::Object(map) => {
                if let Some(Value::String(r)) = map.get("$ref") {
                    let pointer = r.strip_prefix('#').expect("local reference");
                    assert!(root.pointer(pointer).is_some(), "dangling $ref {r}");
                    *seen += 1;
                }
                map.values().for_each(|x| walk(x, root, seen));
            }
            Value::Array(items) => items.iter().for_each(|x| walk(x, root, seen)),
            _ => {}
        }
    }
    let spec = spec();
    let mut seen = 0;
    walk(&spec, &spec, &mut seen);
    assert!(seen > 0);
}

/// Each documented route answers on a live app (not the 404 fallback), and
/// `/openapi.json` serves this very document as JSON.
#[tokio::test]
async fn every_documented_route_is_served() {
    let app = common::spawn(common::Setup::default()).await;
    // A job of one invalid CPF (no upstream call), for the job routes.
    let job = app
        .client
        .post(app.url("/jobs?client_id=000"))
        .header("content-type", "text/plain")
        .body("12345678900\n")
        .send()
        .await
        .unwrap();
    assert_eq!(job.status(), 202);
    let job: Value = serde_json::from_str(&job.text().await.unwrap()).unwrap();
    let id = job["id"].as_str().unwrap().to_owned();
    let document = spec();
    conforms(
        &document,
        &document["paths"]["/jobs"]["post"]["responses"]["202"]["content"]["application/json"]["schema"],
        &job,
        "/jobs 202",
    );
    for path in ROUTES {
        let url = match path {
            // A lookup with a bad CPF: answered by the route (400), no upstream call.
            "/proxy/score" => "/proxy/score?cpf=12345678900&client_id=000".to_owned(),
            "/jobs/{id}" | "/jobs/{id}/results" => path.replace("{id}", &id) + "?client_id=000",
            p => p.to_owned(),
        };
        let reply = app.get(&url).await;
        assert_ne!(reply.status, 404, "{path} is documented but not served");
        let body = reply.json();
        assert_ne!(body["error"], "not_found", "{path}: {}", reply.body);
    }
    // The JSON bodies of the operators' endpoints match their schemas, field for field (a
    // field added to `/status` but not to the document fails here, before schemathesis).
    for path in [
        "/",
        "/health",
        "/ready",
        "/status",
        "/status/feed",
        "/metrics",
    ] {
        let reply = app.get(path).await;
        let schema = &document["paths"][path]["get"]["responses"]["200"]["content"]["application/json"]
            ["schema"];
        conforms(&document, schema, &reply.json(), path);
    }
    // `GET /` lists every other route, as the original's did, and `/health` says
    // `healthy`, which the original's users' scripts look for.
    let index = app.get("/").await.json();
    let listed: BTreeSet<String> = index["endpoints"]
        .as_object()
        .expect("endpoints is an object")
        .keys()
        .cloned()
        .collect();
    let others: BTreeSet<String> = ROUTES
        .iter()
        .filter(|&&r| r != "/")
        .map(|s| s.to_string())
        .collect();
    assert_eq!(listed, others, "GET / lists the other routes");
    assert_eq!(index["service"], "score-proxy");
    assert_eq!(app.get("/health").await.json()["status"], "healthy");

    let lookup = app.get("/proxy/score?cpf=12345678900&client_id=000").await;
    assert_eq!(lookup.status, 400);
    let schema = &document["paths"]["/proxy/score"]["get"]["responses"]["400"]["content"]["application/json"]
        ["schema"];
    conforms(&document, schema, &lookup.json(), "/proxy/score 400");

    let unknown = app.get("/no-such-route").await;
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.json()["error"], "not_found");

    let doc = app.get("/openapi.json").await;
    assert_eq!(doc.status, 200);
    let content_type = doc.header("content-type").unwrap_or_default();
    assert!(
        content_type.starts_with("application/json"),
        "content-type {content_type}"
    );
    assert_eq!(
        doc.json(),
        spec(),
        "served document differs from src/openapi.json"
    );
    assert_eq!(
        app.sim.calls(),
        0,
        "no route here should reach the upstream"
    );
    app.shutdown().await.expect("clean shutdown");
}

/// A small JSON-schema check, enough for the document's own schemas: `$ref`, `oneOf`,
/// `type`, `nullable`, `enum`, `required`, `minimum`, an `additionalProperties` schema, and,
/// for objects that list their properties, no property the document does not list.
fn conforms(spec: &Value, schema: &Value, value: &Value, at: &str) {
    if value.is_null() && schema.get("nullable") == Some(&Value::Bool(true)) {
        return;
    }
    if let Some(Value::String(r)) = schema.get("$ref") {
        let target = spec
            .pointer(r.trim_start_matches('#'))
            .unwrap_or_else(|| panic!("{at}: dangling {r}"));
        return conforms(spec, target, value, at);
    }
    if let Some(Value::Array(options)) = schema.get("oneOf") {
        let matching = options
            .iter()
            .filter(|o| {
                let (spec, o, value) = (spec.clone(), (*o).clone(), value.clone());
                std::panic::catch_unwind(move || conforms(&spec, &o, &value, "")).is_ok()
            })
            .count();
        assert_eq!(matching, 1, "{at}: {value} matches {matching} of oneOf");
        return;
    }
    if let Some(Value::Array(allowed)) = schema.get("enum") {
        assert!(allowed.contains(value), "{at}: {value} not in {allowed:?}");
    }
    match schema.get("type").and_then(Value::as_str) {
        Some("object") => {
            let object = value
                .as_object()
                .unwrap_or_else(|| panic!("{at}: {value} is not an object"));
            for name in schema["required"].as_array().into_iter().flatten() {
                let name = name.as_str().unwrap();
                assert!(object.contains_key(name), "{at}: no required {name}");
            }
            let properties = schema["properties"].as_object();
            for (name, field) in object {
                let extra = schema.get("additionalProperties").filter(|a| a.is_object());
                match properties.and_then(|p| p.get(name)).or(extra) {
                    Some(sub) => conforms(spec, sub, field, &format!("{at}.{name}")),
                    None => assert!(
                        properties.is_none()
                            || schema.get("additionalProperties") == Some(&Value::Bool(true)),
                        "{at}: {name} is not in the document"
                    ),
                }
            }
        }
        Some("integer") => assert!(value.is_i64() || value.is_u64(), "{at}: {value}"),
        Some("number") => assert!(value.is_number(), "{at}: {value}"),
        Some("string") => assert!(value.is_string(), "{at}: {value}"),
        Some("boolean") => assert!(value.is_boolean(), "{at}: {value}"),
        _ => {}
    }
    if let (Some(min), Some(v)) = (
        schema.get("minimum").and_then(Value::as_f64),
        value.as_f64(),
    ) {
        assert!(v >= min, "{at}: {v} below {min}");
    }
}
