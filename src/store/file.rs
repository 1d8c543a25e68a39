//! The store's file: a redb database in the data directory, and what the proxy does with
//! one it cannot use.
//!
//! Two tables: `meta` (the schema version and the data key's check value) and `entries`
//! (row key → sealed record, see `seal.rs`). A file that redb cannot open, whose integrity
//! check fails, that was written under another data key or by another schema version is
//! **moved aside** (renamed with a timestamp suffix, kept for an operator who has the right
//! key) and a new, empty one takes its place: the proxy never crash-loops on its own data.
//! A file that is merely in use (another process holds its lock) or that cannot be written
//! (permissions) is left alone, and the proxy runs without persistence.
//!
//! redb checks some invariants with `debug_assert!`, so a corrupt file can panic a debug
//! build where a release build returns an error; every call into redb on a file that came
//! from disk runs under `catch_unwind`, and a panic counts as corruption.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use redb::{Database, DatabaseError, ReadableDatabase, ReadableTable, ReadableTableMetadata};
use redb::{StorageError, TableDefinition, TableError};

use super::seal::{self, RowKey, Sealer, Unsealable, Unsealed};

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const ENTRIES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("entries");
/// The layout of `entries`' records; a file with another one is moved aside.
pub(crate) const SCHEMA_VERSION: u32 = 1;
/// redb's page cache: the file is read once at start and written in small batches after.
const PAGE_CACHE_BYTES: usize = 16 * 1024 * 1024;

/// Why a file was moved aside (the `reason` label of `score_proxy_store_moved_aside_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, strum::IntoStaticStr, strum::VariantArray)]
#[strum(serialize_all = "snake_case")]
pub(crate) enum AsideReason {
    /// redb could not open it, its integrity check failed, or reading it panicked.
    Corrupt,
    /// It was written under another data key.
    WrongKey,
    /// It was written by another schema version.
    OtherVersion,
}

/// Why the store could not be used at all (persistence is off until the next start).
#[derive(Debug, thiserror::Error)]
pub(crate) enum Unavailable {
    #[error("another process has the store open")]
    InUse,
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Opening a file: a usable database, a reason to move it aside, or no store at all.
pub(crate) enum Opened {
    Ready(Database),
    Bad(AsideReason, String),
    Unavailable(Unavailable),
}

/// Opens (or creates) the database at `path` and checks it was written by this schema
/// under this key; a new file is stamped with both.
pub(crate) fn open(path: &Path, sealer: &Sealer) -> Opened {
    let attempt = catch_unwind(AssertUnwindSafe(|| {
        Database::builder()
            .set_check_integrity_on_open(true)
            .set_cache_size(PAGE_CACHE_BYTES)
            .create(path)
    }));
    let db = match attempt {
        Ok(Ok(db)) => db,
        Ok(Err(DatabaseError::DatabaseAlreadyOpen | DatabaseError::LockProtocolMismatch)) => {
            return Opened::Unavailable(Unavailable::InUse);
        }
        Ok(Err(DatabaseError::UpgradeRequired(v))) => {
            return Opened::Bad(AsideReason::OtherVersion, format!("redb file format {v}"));
        }
        // An I/O error other than "this is not a database" is the disk's or the
        // directory's (permissions, space): the file may be fine, so it stays.
        Ok(Err(DatabaseError::Storage(StorageError::Io(e))))
            if e.kind() != std::io::ErrorKind::InvalidData =>
        {
            return Opened::Unavailable(Unavailable::Io(e));
        }
        Ok(Err(e)) => return Opened::Bad(AsideReason::Corrupt, e.to_string()),
        Err(_) => return Opened::Bad(AsideReason::Corrupt, "reading it panicked".into()),
    };
    match catch_unwind(AssertUnwindSafe(|| stamp(&db, sealer))) {
        Ok(Ok(())) => Opened::Ready(db),
        Ok(Err(Stamp::Bad(reason, why))) => Opened::Bad(reason, why),
        Ok(Err(Stamp::Db(e))) => Opened::Bad(AsideReason::Corrupt, e.to_string()),
        Err(_) => Opened::Bad(AsideReason::Corrupt, "reading it panicked".into()),
    }
}

enum Stamp {
    Bad(AsideReason, String),
    Db(redb::Error),
}

impl<E: Into<redb::Error>> From<E> for Stamp {
    fn from(e: E) -> Stamp {
        Stamp::Db(e.into())
    }
}

/// Checks the file's version and key check value, or writes them into a new file.
fn stamp(db: &Database, sealer: &Sealer) -> Result<(), Stamp> {
    let txn = db.begin_write()?;
    {
        let mut meta = txn.open_table(META)?;
        let version = meta.get("version")?.map(|v| v.value().to_vec());
        let check = meta.get("key_check")?.map(|v| v.value().to_vec());
        match (version, check) {
            (None, None) => {
                if !txn.open_table(ENTRIES)?.is_empty()? {
                    return Err(Stamp::Bad(
                        AsideReason::Corrupt,
                        "entries without a stamp".into(),
                    ));
                }
                meta.insert("version", SCHEMA_VERSION.to_le_bytes().as_slice())?;
                meta.insert("key_check", sealer.key_check().as_slice())?;
            }
            (Some(version), _) if version != SCHEMA_VERSION.to_le_bytes() => {
                return Err(Stamp::Bad(
                    AsideReason::OtherVersion,
                    format!("schema version {version:?}, this proxy reads {SCHEMA_VERSION}"),
                ));
            }
            (_, Some(check)) if check == sealer.key_check() => {}
            _ => {
                return Err(Stamp::Bad(
                    AsideReason::WrongKey,
                    "written under another data key".into(),
                ));
            }
        }
    }
    txn.commit()?;
    Ok(())
}

/// Renames a file that cannot be used to `<name>.aside-<unix seconds>` beside it, so that an
/// operator can still recover it with the right key; returns the new path.
pub(crate) fn move_aside(path: &Path) -> std::io::Result<PathBuf> {
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(format!(".aside-{stamp}"));
    let mut aside = path.with_file_name(&name);
    let mut n = 1;
    while aside.exists() {
        let mut numbered = name.clone();
        numbered.push(format!("-{n}"));
        aside = path.with_file_name(numbered);
        n += 1;
    }
    std::fs::rename(path, &aside)?;
    Ok(aside)
}

/// What a start-up read of the store found.
#[derive(Debug, Default)]
pub(crate) struct Loaded {
    /// Newest first, at most the limit asked for.
    pub(crate) entries: Vec<Unsealed>,
    /// Past the TTL and the stale window: left for compaction.
    pub(crate) expired: u64,
    /// Beyond `--cache-max-entries` (the oldest are the ones left out).
    pub(crate) over_limit: u64,
    /// Records that did not open (skipped one by one, never the whole file).
    pub(crate) undecryptable: u64,
}

/// Reads every record; see [`select`].
pub(crate) fn load(
    db: &Database,
    sealer: &Sealer,
    now_ms: u64,
    keep_ms: u64,
    limit: usize,
) -> Result<Loaded, String> {
    let read = || -> Result<Loaded, redb::Error> {
        let txn = db.begin_read()?;
        let table = match txn.open_table(ENTRIES) {
            Ok(t) => t,
            Err(TableError::TableDoesNotExist(_)) => return Ok(Loaded::default()),
            Err(e) => return Err(e.into()),
        };
        let mut records = Vec::new();
        for row in table.iter()? {
            let (k, v) = row?;
            records.push((k.value().to_vec(), v.value().to_vec()));
        }
        Ok(select(records, sealer, now_ms, keep_ms, limit))
    };
    match catch_unwind(AssertUnwindSafe(read)) {
        Ok(result) => result.map_err(|e| e.to_string()),
        Err(_) => Err("reading it panicked".into()),
    }
}

/// The records worth warming the memory tier with: within `keep_ms` of `now_ms` (TTL plus
/// stale window), that open under this key, newest first, at most `limit`.
pub(crate) fn select(
    records: impl IntoIterator<Item = (Vec<u8>, Vec<u8>)>,
    sealer: &Sealer,
    now_ms: u64,
    keep_ms: u64,
    limit: usize,
) -> Loaded {
    let mut loaded = Loaded::default();
    // The fetch time is in clear: expired rows are not even decrypted.
    let mut live: Vec<(u64, Vec<u8>, Vec<u8>)> = Vec::new();
    for (row, record) in records {
        match seal::fetched_ms(&record) {
            None => loaded.undecryptable += 1,
            Some(t) if now_ms.saturating_sub(t) >= keep_ms => loaded.expired += 1,
            Some(t) => live.push((t, row, record)),
        }
    }
    live.sort_unstable_by_key(|r| std::cmp::Reverse(r.0));
    for (_, row, record) in live {
        if loaded.entries.len() >= limit {
            loaded.over_limit += 1;
            continue;
        }
        match sealer.open(&row, &record) {
            Ok(entry) => loaded.entries.push(entry),
            Err(Unsealable::Forged | Unsealable::Malformed) => loaded.undecryptable += 1,
        }
    }
    loaded
}

/// One sealed record to write.
pub(crate) struct Row {
    pub(crate) key: RowKey,
    pub(crate) record: Vec<u8>,
}

/// Writes a batch in one transaction (one fsync for all of it); returns the rows stored.
pub(crate) fn write(db: &Database, rows: &[Row]) -> Result<u64, redb::Error> {
    let txn = db.begin_write()?;
    let stored = {
        let mut table = txn.open_table(ENTRIES)?;
        for row in rows {
            table.insert(row.key.as_slice(), row.record.as_slice())?;
        }
        table.len()?
    };
    txn.commit()?;
    Ok(stored)
}

/// Deletes rows past `keep_ms`, then the oldest beyond `max_rows`; returns how many went.
pub(crate) fn expire(
    db: &Database,
    now_ms: u64,
    keep_ms: u64,
    max_rows: u64,
) -> Result<u64, redb::Error> {
    let txn = db.begin_write()?;
    let removed = {
        let mut table = txn.open_table(ENTRIES)?;
        let before = table.len()?;
        table.retain(|_, record| {
            seal::fetched_ms(record).is_some_and(|t| now_ms.saturating_sub(t) < keep_ms)
        })?;
        let left = table.len()?;
        if left > max_rows {
            let mut times: Vec<(u64, Vec<u8>)> = Vec::with_capacity(left as usize);
            for row in table.iter()? {
                let (k, v) = row?;
                times.push((seal::fetched_ms(v.value()).unwrap_or(0), k.value().to_vec()));
            }
            times.sort_unstable_by_key(|(t, _)| *t);
            for (_, row) in times.iter().take((left - max_rows) as usize) {
                table.remove(row.as_slice())?;
            }
        }
        before - table.len()?
    };
    txn.commit()?;
    Ok(removed)
}

/// Rows in the store.
pub(crate) fn rows(db: &Database) -> Result<u64, redb::Error> {
    let txn = db.begin_read()?;
    match txn.open_table(ENTRIES) {
        Ok(t) => Ok(t.len()?),
        Err(TableError::TableDoesNotExist(_)) => Ok(0),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lookup::validation::{Cpf, parse_lookup};
    use crate::store::seal::DataKey;

    fn sealer() -> Sealer {
        Sealer::new(&DataKey([3; 32]))
    }

    fn record(s: &Sealer, n: u32, fetched_ms: u64) -> (Vec<u8>, Vec<u8>) {
        let cpf = Cpf::from_base(n * 1000 + 7).unwrap();
        let key = parse_lookup(Some(&format!("cpf={cpf}&client_id=c{n}")), None).unwrap();
        let row = s.row_key(&key);
        let rec = s
            .seal(&row, fetched_ms, &key, format!("{n}").as_bytes())
            .unwrap();
        (row.to_vec(), rec)
    }

    #[test]
    fn load_keeps_the_newest_within_the_window_up_to_the_limit() {
        let s = sealer();
        let now = 1_000_000;
        // Ten records, one a second apart (record n fetched n seconds ago).
        let mut records: Vec<_> = (0..10)
            .map(|n| record(&s, n, now - n as u64 * 1000))
            .collect();
        // One forged (another key), one cut short.
        records.push(record(&Sealer::new(&DataKey([4; 32])), 20, now));
        let (row, rec) = record(&s, 21, now);
        records.push((row, rec[..10].to_vec()));
        // Keep what is younger than 6 s, at most 4.
        let loaded = select(records, &s, now, 6_000, 4);
        let bodies: Vec<_> = loaded.entries.iter().map(|e| e.body.clone()).collect();
        assert_eq!(bodies, ["0", "1", "2", "3"]);
        assert_eq!(loaded.expired, 4, "records 6 to 9");
        assert_eq!(loaded.over_limit, 2, "records 4 and 5");
        assert_eq!(loaded.undecryptable, 2);
        assert!(select(Vec::new(), &s, now, 6_000, 4).entries.is_empty());
        assert!(
            select([record(&s, 1, now)], &s, now, 6_000, 0)
                .entries
                .is_empty()
        );
    }

    #[test]
    fn a_store_reopens_with_its_key_and_refuses_another() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.redb");
        let s = sealer();
        let Opened::Ready(db) = open(&path, &s) else {
            panic!("a new file opens")
        };
        let (row, rec) = record(&s, 1, 5_000);
        write(
            &db,
            &[Row {
                key: row.try_into().unwrap(),
                record: rec,
            }],
        )
        .unwrap();
        drop(db);
        let Opened::Ready(db) = open(&path, &s) else {
            panic!("reopens")
        };
        let loaded = load(&db, &s, 6_000, 10_000, 10).unwrap();
        assert_eq!(loaded.entries.len(), 1);
        // Held open: a second opener is told so, and nothing is moved.
        assert!(matches!(
            open(&path, &s),
            Opened::Unavailable(Unavailable::InUse)
        ));
        drop(db);
        assert!(matches!(
            open(&path, &Sealer::new(&DataKey([9; 32]))),
            Opened::Bad(AsideReason::WrongKey, _)
        ));
    }

    #[test]
    fn garbage_is_corrupt_and_moves_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.redb");
        std::fs::write(&path, vec![0x5a; 64 * 1024]).unwrap();
        assert!(matches!(
            open(&path, &sealer()),
            Opened::Bad(AsideReason::Corrupt, _)
        ));
        let aside = move_aside(&path).unwrap();
        assert!(!path.exists() && aside.exists());
        assert!(matches!(open(&path, &sealer()), Opened::Ready(_)));
    }

    #[test]
    fn expiry_removes_old_rows_then_the_oldest_beyond_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let s = sealer();
        let Opened::Ready(db) = open(&dir.path().join("cache.redb"), &s) else {
            panic!("opens")
        };
        let now = 100_000;
        let rows: Vec<Row> = (0..10)
            .map(|n| {
                let (row, rec) = record(&s, n, now - n as u64 * 1000);
                Row {
                    key: row.try_into().unwrap(),
                    record: rec,
                }
            })
            .collect();
        write(&db, &rows).unwrap();
        assert_eq!(rows_of(&db), 10);
        // Records 8 and 9 are past an 8 s window; then the bound of 5 removes 5, 6 and 7.
        assert_eq!(expire(&db, now, 8_000, 5).unwrap(), 5);
        let loaded = load(&db, &s, now, 60_000, 100).unwrap();
        let bodies: Vec<_> = loaded.entries.iter().map(|e| e.body.clone()).collect();
        assert_eq!(bodies, ["0", "1", "2", "3", "4"]);
    }

    fn rows_of(db: &Database) -> u64 {
        rows(db).unwrap()
    }
}
