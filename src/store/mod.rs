//! The persistent cache tier: what the upstream budget bought, kept across restarts.
//!
//! Every cached score cost one second of a budget of 86,400 calls a day, so a restart
//! should not throw the cache away. This tier sits behind the memory one (`lookup::cache`):
//! - **write-through, off the request path**: every answer inserted into the memory tier is
//!   handed to a bounded channel ([`Store::write`] never waits; a full queue drops the
//!   answer and counts it) and sealed and committed in batches by one writer thread
//!   (`writer.rs`);
//! - **warm start**: on start, the records still within TTL plus stale window are read,
//!   newest first, at most `--cache-max-entries`, and put into the memory tier before the
//!   listener serves, so those lookups are hits with no upstream call;
//! - **bounded**: the writer deletes rows past the window, and the oldest beyond
//!   `--cache-max-entries`, every minute;
//! - **private at rest** (`seal.rs`): row keys are keyed hashes, bodies are sealed with an
//!   AEAD; the key comes from `--data-key` or is generated once and kept beside the data
//!   (`store.key`, mode 0600);
//! - **never a crash loop** (`file.rs`): a file that cannot be opened or read under this key
//!   and schema is moved aside and the proxy starts empty; a store that cannot be used at
//!   all (in use by another process, not writable) leaves the proxy running without it.
//!
//! Fetch times are stored as wall-clock milliseconds (an `Instant` means nothing in another
//! process) and turned back into ages on load, so `Age` and the TTL carry across restarts.

mod file;
mod jobs;
mod seal;
mod writer;

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::lookup::cache::{CachedScore, WriteThrough};
use crate::lookup::validation::LookupKey;
use crate::telemetry::metrics::Metrics;

pub(crate) use file::AsideReason;
pub(crate) use jobs::{JobWrite, StoredJob};
pub use seal::DataKey;
pub(crate) use seal::Sealer;
use writer::{Msg, Pending, Writer};

/// The database file in the data directory.
const DB_FILE: &str = "cache.redb";
/// The generated data key, when `--data-key` is not given.
const KEY_FILE: &str = "store.key";
/// Answers the writer may have queued; beyond it they are dropped (and counted).
const QUEUE_CAPACITY: usize = 4096;
/// Longest shutdown waits for the writer's last commit.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// The store's settings, from the validated configuration.
pub(crate) struct StoreConfig {
    pub(crate) dir: PathBuf,
    /// `--data-key`; `None` reads or creates the key file.
    pub(crate) key: Option<DataKey>,
    pub(crate) ttl: Duration,
    pub(crate) stale_for: Duration,
    pub(crate) max_entries: u64,
}

/// What became of a record read at start (the `result` label of
/// `score_proxy_store_load_entries_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, strum::IntoStaticStr, strum::VariantArray)]
#[strum(serialize_all = "snake_case")]
pub(crate) enum LoadResult {
    Loaded,
    Expired,
    OverLimit,
    Undecryptable,
}

/// A store operation (the `op` label of `score_proxy_store_errors_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, strum::IntoStaticStr, strum::VariantArray)]
#[strum(serialize_all = "snake_case")]
pub(crate) enum StoreOp {
    Open,
    Load,
    Write,
    Expire,
}

/// What kind of failure a store operation met (the `kind` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, strum::IntoStaticStr, strum::VariantArray)]
#[strum(serialize_all = "snake_case")]
pub(crate) enum StoreErrorKind {
    /// The file system's: permissions, space, a failing disk.
    Io,
    /// The file's contents.
    Corrupt,
    /// Another process holds the store.
    InUse,
    /// redb panicked (a debug assertion on a file altered under it).
    Panic,
    Other,
}

impl StoreErrorKind {
    fn of(e: &redb::Error) -> StoreErrorKind {
        match e {
            redb::Error::Io(_) => StoreErrorKind::Io,
            redb::Error::Corrupted(_) => StoreErrorKind::Corrupt,
            redb::Error::DatabaseAlreadyOpen | redb::Error::LockProtocolMismatch => {
                StoreErrorKind::InUse
            }
            _ => StoreErrorKind::Other,
        }
    }
}

/// The handle the memory tier writes through; see the module docs.
pub struct Store {
    tx: SyncSender<Msg>,
    metrics: Arc<Metrics>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// A started store and what it had kept.
pub(crate) struct Started {
    pub(crate) store: Option<Arc<Store>>,
    /// Newest first.
    pub(crate) entries: Vec<(LookupKey, CachedScore)>,
    /// Bulk jobs within their retention, with their results.
    pub(crate) jobs: Vec<StoredJob>,
}

impl Store {
    /// Opens the store in `config.dir` and reads what it kept. Never fails: a store that
    /// cannot be used is logged and counted, and the proxy runs without it.
    pub(crate) fn start(config: StoreConfig, metrics: Arc<Metrics>) -> Started {
        match open(&config, &metrics) {
            Ok(started) => {
                metrics.store_enabled(true);
                started
            }
            Err(why) => {
                tracing::warn!(
                    dir = %config.dir.display(),
                    error = %why,
                    "persistent cache off: the store cannot be used (the proxy runs with its \
                     memory cache only)"
                );
                metrics.store_error(
                    StoreOp::Open,
                    match why {
                        file::Unavailable::InUse => StoreErrorKind::InUse,
                        file::Unavailable::Io(_) => StoreErrorKind::Io,
                    },
                );
                metrics.store_enabled(false);
                Started {
                    store: None,
                    entries: Vec::new(),
                    jobs: Vec::new(),
                }
            }
        }
    }

    /// Commits what is queued and stops the writer, waiting at most [`CLOSE_WAIT`]; later
    /// answers are dropped. Called once the drain is over; safe to call again.
    pub(crate) fn close(&self) {
        let Some(handle) = self.writer.lock().expect("not poisoned").take() else {
            return;
        };
        let (ack, acked) = std::sync::mpsc::sync_channel(1);
        if self.tx.send(Msg::Close(ack)).is_ok() && acked.recv_timeout(CLOSE_WAIT).is_ok() {
            let _ = handle.join();
            tracing::debug!("persistent cache: closed");
        }
    }
}

impl Store {
    /// Writes a bulk job's record or results. It waits for room in the writer's queue (a
    /// job's results are never dropped), so it runs on a blocking thread.
    pub(crate) async fn write_job(self: &Arc<Self>, write: JobWrite) {
        let store = self.clone();
        let _ = tokio::task::spawn_blocking(move || store.tx.send(Msg::Job(write))).await;
    }
}

impl WriteThrough for Store {
    fn write(&self, key: &LookupKey, value: &CachedScore) {
        let pending = Pending {
            key: key.clone(),
            body: value.body.clone(),
            fetched_ms: wall_ms(value.fetched_at),
        };
        match self.tx.try_send(Msg::Put(pending)) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.metrics.store_dropped();
            }
        }
    }
}

fn open(config: &StoreConfig, metrics: &Arc<Metrics>) -> Result<Started, file::Unavailable> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&config.dir)?;
    let key = match &config.key {
        Some(key) => key.clone(),
        None => key_file(&config.dir)?,
    };
    let sealer = Sealer::new(&key);
    let path = config.dir.join(DB_FILE);
    let keep = config.ttl + config.stale_for;
    let keep_ms = keep.as_millis() as u64;
    let limit = usize::try_from(config.max_entries).unwrap_or(usize::MAX);
    // At most one file is moved aside per start: the second attempt is on a new file.
    let mut attempts = 0;
    let (db, loaded) = loop {
        attempts += 1;
        let (reason, why) = match file::open(&path, &sealer) {
            file::Opened::Ready(db) => match file::load(&db, &sealer, now_ms(), keep_ms, limit) {
                Ok(loaded) => break (db, loaded),
                Err(why) => {
                    drop(db);
                    metrics.store_error(StoreOp::Load, StoreErrorKind::Corrupt);
                    (AsideReason::Corrupt, why)
                }
            },
            file::Opened::Bad(reason, why) => (reason, why),
            file::Opened::Unavailable(u) => return Err(u),
        };
        if attempts > 1 {
            return Err(file::Unavailable::Io(std::io::Error::other(format!(
                "a new store file is unusable too: {why}"
            ))));
        }
        let aside = file::move_aside(&path)?;
        metrics.store_moved_aside(reason);
        tracing::warn!(
            reason = <&str>::from(reason),
            error = %why,
            moved_to = %aside.display(),
            "persistent cache: the store file cannot be used; moved aside, starting with an \
             empty cache"
        );
    };
    // Sealed records only, but nobody else needs to read them either.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    for (result, n) in [
        (LoadResult::Loaded, loaded.entries.len() as u64),
        (LoadResult::Expired, loaded.expired),
        (LoadResult::OverLimit, loaded.over_limit),
        (LoadResult::Undecryptable, loaded.undecryptable),
    ] {
        metrics.store_load(result, n);
    }
    let rows = file::rows(&db).unwrap_or(0);
    metrics.store_size(std::fs::metadata(&path).map_or(0, |m| m.len()), rows);
    tracing::info!(
        dir = %config.dir.display(),
        loaded = loaded.entries.len(),
        expired = loaded.expired,
        over_limit = loaded.over_limit,
        undecryptable = loaded.undecryptable,
        "persistent cache: loaded"
    );
    let now = now_ms();
    let entries = loaded
        .entries
        .into_iter()
        .filter_map(|e| {
            let age = Duration::from_millis(now.saturating_sub(e.fetched_ms));
            // An age beyond the monotonic clock's origin (a reboot since) cannot be an
            // `Instant`; such an entry is left out rather than made younger.
            let fetched_at = Instant::now().checked_sub(age)?;
            Some((
                e.key,
                CachedScore {
                    body: e.body,
                    fetched_at,
                },
            ))
        })
        .collect();
    let jobs = match jobs::load(&db, &sealer, now) {
        Ok((jobs, skipped)) => {
            metrics.store_load(LoadResult::Undecryptable, skipped);
            jobs
        }
        Err(why) => {
            tracing::warn!(error = %why, "persistent cache: the jobs could not be read");
            metrics.store_error(StoreOp::Load, StoreErrorKind::Corrupt);
            Vec::new()
        }
    };
    let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE_CAPACITY);
    let writer = Writer {
        db,
        path,
        sealer,
        metrics: metrics.clone(),
        keep_ms,
        max_rows: config.max_entries,
    };
    let handle = std::thread::Builder::new()
        .name("store-writer".into())
        .spawn(move || writer.run(rx))?;
    Ok(Started {
        store: Some(Arc::new(Store {
            tx,
            metrics: metrics.clone(),
            writer: Mutex::new(Some(handle)),
        })),
        entries,
        jobs,
    })
}

/// The generated data key: read from the key file, or created there (mode 0600) on first
/// start. A key file that does not hold a key is moved aside and replaced; the store
/// written under the lost key is then moved aside too (its check value no longer matches).
fn key_file(dir: &Path) -> std::io::Result<DataKey> {
    let path = dir.join(KEY_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => match DataKey::parse(text.trim()) {
            Ok(key) => {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
                return Ok(key);
            }
            Err(_) => {
                let aside = file::move_aside(&path)?;
                tracing::warn!(
                    moved_to = %aside.display(),
                    "persistent cache: the key file holds no key; moved aside, a new key is \
                     generated"
                );
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let key = DataKey::generate()?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)?;
    writeln!(f, "{}", key.to_hex())?;
    f.sync_all()?;
    tracing::info!(path = %path.display(), "persistent cache: generated a data key");
    Ok(key)
}

/// Now, as Unix milliseconds.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// When an answer fetched at `at` was fetched, as Unix milliseconds.
fn wall_ms(at: Instant) -> u64 {
    now_ms().saturating_sub(at.elapsed().as_millis() as u64)
}

#[cfg(test)]
mod tests;
