//! A bulk job's data: what was submitted, each item's result, and the job's state, as the API
//! shows them and as the store keeps them (JSON, sealed there).

use serde::{Deserialize, Serialize};

use crate::lookup::validation::LookupKey;
use crate::telemetry::SubmissionLink;

/// A job id: 128 random bits, written as 32 lower-case hex digits. Unguessable, so a job's
/// URL is not a way to find another's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct JobId(pub(crate) [u8; 16]);

impl JobId {
    pub(crate) fn generate() -> JobId {
        let mut id = [0u8; 16];
        getrandom::fill(&mut id).expect("the OS random source works");
        JobId(id)
    }

    pub(crate) fn parse(hex: &str) -> Option<JobId> {
        if hex.len() != 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let mut id = [0u8; 16];
        for (i, byte) in id.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(JobId(id))
    }
}

impl std::fmt::Display for JobId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// Where a job is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, strum::IntoStaticStr)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub(crate) enum JobState {
    /// Accepted; no item has been answered yet.
    Queued,
    /// Some items are answered, others wait for budget.
    Running,
    /// Every item has its result.
    Done,
    /// Cancelled by its client: no upstream call for the items left.
    Cancelled,
}

/// The job record the store keeps (sealed).
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct JobRecord {
    pub(crate) client_id: String,
    /// The CPFs as submitted, in order (invalid ones included: their lines say why).
    pub(crate) cpfs: Vec<String>,
    pub(crate) created_ms: u64,
    pub(crate) started_ms: Option<u64>,
    pub(crate) finished_ms: Option<u64>,
    pub(crate) cancelled: bool,
    /// The span of the `POST /jobs` request (when it was traced): each item's span links to
    /// it, after a restart too. Absent from records stored before it existed.
    #[serde(default)]
    pub(crate) submitted: Option<SubmissionLink>,
}

/// One item's result, as its results line shows it and the store keeps it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct ItemResult {
    /// What a lookup of this CPF would have answered: 200, or the error's status.
    pub(crate) status: u16,
    /// The upstream's JSON body, for a 200.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub(crate) body: Option<serde_json::Value>,
    /// `{"error": kind, "message": ...}`, as a lookup's error body.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub(crate) error: Option<serde_json::Value>,
    /// Answered from the cache, with no call of its own.
    #[serde(default)]
    pub(crate) from_cache: bool,
}

impl ItemResult {
    pub(crate) fn ok(body: &[u8], from_cache: bool) -> ItemResult {
        ItemResult {
            status: 200,
            body: Some(
                serde_json::from_slice(body)
                    .unwrap_or_else(|_| serde_json::Value::String("unreadable".into())),
            ),
            error: None,
            from_cache,
        }
    }

    pub(crate) fn failed(status: u16, kind: &str, message: &str) -> ItemResult {
        ItemResult {
            status,
            body: None,
            error: Some(serde_json::json!({ "error": kind, "message": message })),
            from_cache: false,
        }
    }

    pub(crate) fn is_ok(&self) -> bool {
        self.status == 200
    }
}

/// One item: the CPF as submitted, its lookup key if it is valid, the item that asks the
/// upstream for it (itself, or the first item with the same key), and its result.
#[derive(Debug)]
pub(crate) struct Item {
    pub(crate) cpf: String,
    pub(crate) key: Option<LookupKey>,
    pub(crate) first: usize,
    pub(crate) result: Option<ItemResult>,
}

/// One results line (NDJSON).
#[derive(Serialize)]
pub(crate) struct Line<'a> {
    pub(crate) index: usize,
    pub(crate) cpf: &'a str,
    #[serde(flatten)]
    pub(crate) result: &'a ItemResult,
}

/// The CSV header of `?format=csv`.
pub(crate) const CSV_HEADER: &str = "index,cpf,status,score,from_cache,error\n";

/// One CSV line: the score for a 200, the error kind otherwise.
pub(crate) fn csv_line(index: usize, cpf: &str, r: &ItemResult) -> String {
    let score = r
        .body
        .as_ref()
        .and_then(|b| b.get("score"))
        .map(|s| s.to_string())
        .unwrap_or_default();
    let error = r
        .error
        .as_ref()
        .and_then(|e| e.get("error"))
        .and_then(|e| e.as_str())
        .unwrap_or("");
    format!(
        "{index},{},{},{score},{},{error}\n",
        csv_field(cpf),
        r.status,
        r.from_cache
    )
}

/// A field quoted if it holds a comma, a quote or a line break (a submitted CPF is anything).
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_reject_anything_else() {
        let id = JobId::generate();
        assert_eq!(JobId::parse(&id.to_string()), Some(id));
        assert_eq!(JobId::parse("zz"), None);
        assert_eq!(JobId::parse(&"g".repeat(32)), None);
    }

    #[test]
    fn a_record_stored_before_the_submission_link_still_loads() {
        let old = r#"{"client_id":"c","cpfs":["1"],"created_ms":5,"started_ms":null,
            "finished_ms":null,"cancelled":false}"#;
        let record: JobRecord = serde_json::from_str(old).unwrap();
        assert_eq!(record.submitted, None);
    }

    #[test]
    fn csv_lines_quote_what_needs_it() {
        let ok = ItemResult::ok(br#"{"score":712}"#, true);
        assert_eq!(
            csv_line(0, "52998224725", &ok),
            "0,52998224725,200,712,true,\n"
        );
        let bad = ItemResult::failed(400, "invalid_request", "no");
        assert_eq!(
            csv_line(1, "1,2", &bad),
            "1,\"1,2\",400,,false,invalid_request\n"
        );
    }
}
