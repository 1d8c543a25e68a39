//! The store as the app starts it: key file, warm start, and files it cannot use.

use std::os::unix::fs::PermissionsExt;

use bytes::Bytes;

use super::*;
use crate::lookup::validation::{Cpf, parse_lookup};
use crate::telemetry::metrics::MetricsConfig;

fn metrics() -> Arc<Metrics> {
    Arc::new(Metrics::new(&MetricsConfig {
        enabled: true,
        rate_per_second: 1.0,
        interval: Duration::from_secs(1),
        queue_capacity: 20,
        queue_timeout: Duration::from_secs(30),
        expected_replicas: 1,
    }))
}

fn config(dir: &Path, max_entries: u64) -> StoreConfig {
    StoreConfig {
        dir: dir.to_owned(),
        key: None,
        ttl: Duration::from_secs(300),
        stale_for: Duration::ZERO,
        max_entries,
    }
}

fn key(n: u32) -> LookupKey {
    let cpf = Cpf::from_base(n * 1000 + 3).unwrap();
    parse_lookup(Some(&format!("cpf={cpf}&client_id=client-{n}")), None).unwrap()
}

fn answer(n: u32, age: Duration) -> CachedScore {
    CachedScore {
        body: Bytes::from(format!("{{\"score\":{n}}}")),
        fetched_at: Instant::now() - age,
    }
}

fn has(text: &str, series: &str) -> bool {
    text.lines().any(|l| l == series)
}

#[test]
fn answers_written_through_come_back_newest_first_within_the_bound() {
    let dir = tempfile::tempdir().unwrap();
    let m = metrics();
    let started = Store::start(config(dir.path(), 3), m.clone());
    let store = started.store.expect("the store opens");
    assert!(started.entries.is_empty());
    for n in 0..5 {
        store.write(&key(n), &answer(n, Duration::from_secs(10 * u64::from(n))));
    }
    // Past the TTL: written, not loaded.
    store.write(&key(9), &answer(9, Duration::from_secs(301)));
    store.close();
    store.close();
    assert!(has(&m.render(), "score_proxy_store_writes_total 6"));

    // The key was generated once, readable only by its owner.
    let key_file = dir.path().join(KEY_FILE);
    let mode = std::fs::metadata(&key_file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let key_text = std::fs::read_to_string(&key_file).unwrap();

    let m = metrics();
    let started = Store::start(config(dir.path(), 3), m.clone());
    assert_eq!(std::fs::read_to_string(&key_file).unwrap(), key_text);
    let loaded: Vec<_> = started.entries.iter().map(|(k, _)| k.clone()).collect();
    assert_eq!(loaded, [key(0), key(1), key(2)]);
    // Ages carry over: the entry fetched 20 s before the first start is 20 s old or more.
    let age = started.entries[2].1.fetched_at.elapsed();
    assert!(
        age >= Duration::from_secs(20) && age < Duration::from_secs(60),
        "{age:?}"
    );
    let text = m.render();
    for series in [
        "score_proxy_store_load_entries_total{result=\"loaded\"} 3",
        "score_proxy_store_load_entries_total{result=\"over_limit\"} 2",
        "score_proxy_store_load_entries_total{result=\"expired\"} 1",
        "score_proxy_store_enabled 1",
        "score_proxy_store_rows 6",
    ] {
        assert!(has(&text, series), "{series} in\n{text}");
    }
    started.store.unwrap().close();
}

#[test]
fn a_file_that_is_not_a_store_is_moved_aside_and_the_proxy_starts_empty() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(DB_FILE), b"definitely not redb").unwrap();
    let m = metrics();
    let started = Store::start(config(dir.path(), 10), m.clone());
    let store = started.store.expect("a new file replaces it");
    let text = m.render();
    assert!(
        has(
            &text,
            "score_proxy_store_moved_aside_total{reason=\"corrupt\"} 1"
        ),
        "{text}"
    );
    assert!(has(&text, "score_proxy_store_enabled 1"));
    let aside: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| name.starts_with("cache.redb.aside-"))
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    store.close();
}

#[test]
fn another_key_moves_the_file_aside_and_a_held_store_is_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let with_key = |byte| StoreConfig {
        key: Some(DataKey([byte; 32])),
        ..config(dir.path(), 10)
    };
    let first = Store::start(with_key(1), metrics()).store.unwrap();
    first.write(&key(1), &answer(1, Duration::ZERO));

    // While the first holds it, a second process gets no store, and nothing is moved.
    let m = metrics();
    let second = Store::start(with_key(1), m.clone());
    assert!(second.store.is_none());
    let text = m.render();
    assert!(has(&text, "score_proxy_store_enabled 0"));
    assert!(
        has(
            &text,
            "score_proxy_store_errors_total{kind=\"in_use\",op=\"open\"} 1"
        ),
        "{text}"
    );
    assert!(!text.contains("score_proxy_store_moved_aside_total{reason=\"corrupt\"} 1"));
    first.close();

    let m = metrics();
    let third = Store::start(with_key(2), m.clone());
    assert!(third.entries.is_empty());
    assert!(has(
        &m.render(),
        "score_proxy_store_moved_aside_total{reason=\"wrong_key\"} 1"
    ));
    third.store.unwrap().close();
}
