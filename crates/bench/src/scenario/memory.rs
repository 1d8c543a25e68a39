//! Scenario 6: memory per cached entry, measured on the cache component itself in a child
//! process of this binary (`--memory-child N --store S`), one per way of storing the
//! entries: as the proxy does, with exact-size bodies, and as a plain `HashMap`.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use bytes::{Bytes, BytesMut};
use score_proxy::lookup::cache::{CacheConfig, CachedScore, LocalCache, ScoreCache};
use score_validation::{Cpf, parse_lookup};

use crate::procs::proc_status_kb;
use crate::report::table;
use crate::stats::mib;
use crate::suite::Suite;

fn rss_self() -> u64 {
    // /proc/self/statm's second field is resident pages; VmRSS is the same number in kB,
    // which spares asking for the page size.
    proc_status_kb(std::process::id(), "VmRSS:").unwrap_or(0) * 1024
}

/// How the memory child stores its entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Store {
    /// `LocalCache`, bodies built as `upstream::read_capped` builds them: what the proxy does.
    Proxy,
    /// `LocalCache`, bodies copied into exact-size `Bytes` (one allocation, no slack).
    ExactBodies,
    /// A plain `HashMap` of the same keys and values: the data without the cache machinery.
    HashMap,
}

impl Store {
    const ALL: [Store; 3] = [Store::Proxy, Store::ExactBodies, Store::HashMap];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Store::Proxy => "proxy",
            Store::ExactBodies => "exact-bodies",
            Store::HashMap => "hashmap",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Store::Proxy => "`LocalCache` as the proxy fills it",
            Store::ExactBodies => "`LocalCache`, bodies as exact-size `Bytes`",
            Store::HashMap => {
                "`HashMap<LookupKey, CachedScore>`, same entries (no cache machinery)"
            }
        }
    }
}

/// Fills a store with `n` entries as the proxy would (keys from `parse_lookup`, bodies built
/// the way `upstream::read_capped` builds them) and prints one JSON line.
pub(crate) fn memory_child(n: usize, store: &str) -> ExitCode {
    let Some(store) = Store::ALL.into_iter().find(|s| s.name() == store) else {
        eprintln!("compare: unknown store {store}");
        return ExitCode::from(2);
    };
    let before = rss_self();
    // Sized for the entries, as an operator would set --cache-max-entries.
    let cache = (store != Store::HashMap).then(|| {
        LocalCache::new(
            &CacheConfig {
                ttl: Duration::from_secs(300),
                stale_for: Duration::ZERO,
                max_entries: n as u64,
            },
            |_| {},
        )
    });
    let mut map = std::collections::HashMap::new();
    let mut body_bytes = 0usize;
    let mut inserted = 0usize;
    let mut base = 300_000_000u32;
    while inserted < n {
        base += 1;
        let Some(cpf) = Cpf::from_base(base) else {
            continue;
        };
        let query = format!("cpf={cpf}&client_id=client-{:03}", inserted % 100);
        let key = parse_lookup(Some(&query), None).expect("a valid lookup");
        let json = format!(
            r#"{{"cpf":"{cpf}","score":{},"request_id":{}}}"#,
            300 + inserted % 600,
            inserted + 1
        );
        body_bytes += json.len();
        let body = if store == Store::ExactBodies {
            Bytes::copy_from_slice(json.as_bytes())
        } else {
            let mut body = BytesMut::new();
            body.extend_from_slice(json.as_bytes());
            body.freeze()
        };
        let value = CachedScore {
            body,
            fetched_at: Instant::now(),
        };
        match &cache {
            Some(cache) => cache.insert(key, value),
            None => {
                map.insert(key, value);
            }
        }
        inserted += 1;
    }
    let entries = match &cache {
        Some(cache) => {
            cache.sync();
            cache.entry_count()
        }
        None => map.len() as u64,
    };
    let after = rss_self();
    println!(
        "{}",
        serde_json::json!({
            "n": n,
            "entries": entries,
            "rss_before": before,
            "rss_after": after,
            "body_bytes": body_bytes,
        })
    );
    // Keep the store alive until the measurement is printed.
    drop(cache);
    drop(map);
    ExitCode::SUCCESS
}

pub(crate) async fn run(suite: &mut Suite) -> Result<()> {
    println!("== 6. memory per cached entry");
    let n = suite.plan.memory_entries;
    let exe = std::env::current_exe()?;
    let mut rows = Vec::new();
    let mut avg_body = 0.0;
    for store in Store::ALL {
        let out = tokio::process::Command::new(&exe)
            .args(["--memory-child", &n.to_string(), "--store", store.name()])
            .kill_on_drop(true)
            .output()
            .await?;
        ensure!(
            out.status.success(),
            "memory child ({}) failed: {}",
            store.name(),
            String::from_utf8_lossy(&out.stderr)
        );
        let line = String::from_utf8_lossy(&out.stdout);
        let v: serde_json::Value = serde_json::from_str(line.trim())
            .with_context(|| format!("parsing the memory child's output {line}"))?;
        let get = |k: &str| v[k].as_u64().unwrap_or(0);
        let (before, after, body, entries) = (
            get("rss_before"),
            get("rss_after"),
            get("body_bytes"),
            get("entries"),
        );
        ensure!(
            entries == n as u64,
            "the {} store holds {entries} entries, not {n}",
            store.name()
        );
        let per_entry = (after as f64 - before as f64 - body as f64) / n as f64;
        avg_body = body as f64 / n as f64;
        println!(
            "  {}: {n} entries, {per_entry:.0} bytes per entry beyond the body",
            store.name()
        );
        if store == Store::Proxy {
            suite.report.target(
                format!("memory: under 300 bytes per entry beyond the body ({n} entries)"),
                format!("{per_entry:.0} bytes"),
                per_entry < 300.0,
            );
        }
        rows.push(vec![
            store.describe().to_owned(),
            entries.to_string(),
            mib(before),
            mib(after),
            mib(body),
            if store == Store::Proxy {
                format!("**{per_entry:.0} bytes**")
            } else {
                format!("{per_entry:.0} bytes")
            },
        ]);
    }
    let body = format!(
        "Measured on the cache component itself (`score_proxy::cache::LocalCache`), in a fresh \
         child process of the harness per row: filling a live proxy with {n} entries through a \
         1 call/s upstream would take days. Keys come from `parse_lookup` (100 distinct client \
         ids, each held inline in its key, as a request's is), bodies are ~{avg_body:.0}-byte \
         JSON answers; the cache is sized to the entries (`max_entries` = {n}, TTL 300 s) and \
         moka's housekeeping is run (`sync`) before measuring. The harness uses the binary's \
         global allocator (mimalloc). Resident memory is read from `/proc/self/status` (VmRSS) \
         before creating the cache and after filling it; the JSON bodies' bytes are \
         subtracted. The first row is the target's; the other two locate the overhead.\n\n{}",
        table(
            &[
                "store",
                "entries",
                "RSS before",
                "RSS after",
                "JSON bodies",
                "per entry, beyond the body"
            ],
            &rows
        )
    );
    suite.report.section("6. Memory per cached entry", body);
    Ok(())
}
