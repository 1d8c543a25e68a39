//! Bulk jobs at rest: what `POST /jobs` accepted, and every result found for it, so that a
//! restart (SIGTERM or `kill -9`) resumes each job without calling again for what is done.
//!
//! Two tables beside the cache's: `jobs` (job id → keep-until time in clear, then the sealed
//! job record: client id, CPFs as submitted, times, state) and `job_results` (job id and
//! item index → the sealed result). Both are sealed as the cache's records are (`seal.rs`),
//! bound to their table and row, so no CPF or client id is in clear and a record cannot be
//! moved to another row. The keep-until time lets the writer delete a job past its retention
//! without the key.

use std::collections::BTreeMap;
use std::panic::{AssertUnwindSafe, catch_unwind};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, TableError};

use super::seal::Sealer;

const JOBS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("jobs");
const RESULTS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("job_results");

/// A job id: 16 random bytes.
pub(crate) type JobKey = [u8; 16];

/// A job as it was stored.
#[derive(Debug)]
pub(crate) struct StoredJob {
    pub(crate) id: JobKey,
    /// The job record (JSON), opened.
    pub(crate) record: Vec<u8>,
    /// Item index → result record (JSON), opened.
    pub(crate) results: BTreeMap<u32, Vec<u8>>,
}

/// A write for the jobs tables.
pub(crate) enum JobWrite {
    /// The job record, replaced whole (on submission, start, end, cancellation).
    Job {
        id: JobKey,
        keep_until_ms: u64,
        record: Vec<u8>,
        /// Told once it is committed (submission answers `202` only then).
        committed: Option<tokio::sync::oneshot::Sender<bool>>,
    },
    /// Results of items, committed together.
    Results {
        id: JobKey,
        items: Vec<(u32, Vec<u8>)>,
    },
}

fn job_aad(id: &JobKey, keep_until: &[u8]) -> Vec<u8> {
    [b"job".as_slice(), id, keep_until].concat()
}

fn result_row(id: &JobKey, index: u32) -> [u8; 20] {
    let mut row = [0u8; 20];
    row[..16].copy_from_slice(id);
    row[16..].copy_from_slice(&index.to_be_bytes());
    row
}

fn result_aad(row: &[u8; 20]) -> Vec<u8> {
    [b"job result".as_slice(), row].concat()
}

/// Commits one write. The job record's keep-until time is in clear and in the associated
/// data.
pub(crate) fn write(db: &Database, sealer: &Sealer, w: &JobWrite) -> Result<(), redb::Error> {
    let txn = db.begin_write()?;
    match w {
        JobWrite::Job {
            id,
            keep_until_ms,
            record,
            ..
        } => {
            let time = keep_until_ms.to_le_bytes();
            let sealed = sealer.seal_blob(&job_aad(id, &time), record)?;
            let value = [time.as_slice(), &sealed].concat();
            txn.open_table(JOBS)?
                .insert(id.as_slice(), value.as_slice())?;
        }
        JobWrite::Results { id, items } => {
            let mut table = txn.open_table(RESULTS)?;
            for (index, record) in items {
                let row = result_row(id, *index);
                let sealed = sealer.seal_blob(&result_aad(&row), record)?;
                table.insert(row.as_slice(), sealed.as_slice())?;
            }
        }
    }
    txn.commit()?;
    Ok(())
}

/// Deletes the jobs kept until before `now_ms`, with their results; returns how many.
pub(crate) fn expire(db: &Database, now_ms: u64) -> Result<u64, redb::Error> {
    let txn = db.begin_write()?;
    let gone = {
        let mut jobs = txn.open_table(JOBS)?;
        let mut gone = Vec::new();
        for row in jobs.iter()? {
            let (k, v) = row?;
            let keep = v
                .value()
                .get(..8)
                .map(|t| u64::from_le_bytes(t.try_into().unwrap()));
            if keep.is_none_or(|t| t < now_ms) {
                gone.push(k.value().to_vec());
            }
        }
        let mut results = txn.open_table(RESULTS)?;
        for id in &gone {
            jobs.remove(id.as_slice())?;
            let mut from = id.clone();
            from.extend_from_slice(&[0; 4]);
            let mut to = id.clone();
            to.extend_from_slice(&[0xff; 4]);
            results.retain_in(from.as_slice()..=to.as_slice(), |_, _| false)?;
        }
        gone.len() as u64
    };
    txn.commit()?;
    Ok(gone)
}

/// Reads every job still kept, with its results. A record that does not open under this
/// key is skipped (and counted by the caller as undecryptable).
pub(crate) fn load(
    db: &Database,
    sealer: &Sealer,
    now_ms: u64,
) -> Result<(Vec<StoredJob>, u64), String> {
    let read = || -> Result<(Vec<StoredJob>, u64), redb::Error> {
        let txn = db.begin_read()?;
        let jobs = match txn.open_table(JOBS) {
            Ok(t) => t,
            Err(TableError::TableDoesNotExist(_)) => return Ok((Vec::new(), 0)),
            Err(e) => return Err(e.into()),
        };
        let mut skipped = 0;
        let mut found = Vec::new();
        for row in jobs.iter()? {
            let (k, v) = row?;
            let (Ok(id), Some((time, sealed))) =
                (JobKey::try_from(k.value()), v.value().split_at_checked(8))
            else {
                skipped += 1;
                continue;
            };
            if u64::from_le_bytes(time.try_into().expect("8 bytes")) < now_ms {
                continue;
            }
            match sealer.open_blob(&job_aad(&id, time), sealed) {
                Ok(record) => found.push(StoredJob {
                    id,
                    record,
                    results: BTreeMap::new(),
                }),
                Err(_) => skipped += 1,
            }
        }
        let results = match txn.open_table(RESULTS) {
            Ok(t) => Some(t),
            Err(TableError::TableDoesNotExist(_)) => None,
            Err(e) => return Err(e.into()),
        };
        if let Some(results) = results {
            for job in &mut found {
                let from = result_row(&job.id, 0);
                let to = result_row(&job.id, u32::MAX);
                for row in results.range(from.as_slice()..=to.as_slice())? {
                    let (k, v) = row?;
                    let Ok(row) = <[u8; 20]>::try_from(k.value()) else {
                        skipped += 1;
                        continue;
                    };
                    let index = u32::from_be_bytes(row[16..].try_into().expect("4 bytes"));
                    match sealer.open_blob(&result_aad(&row), v.value()) {
                        Ok(record) => {
                            job.results.insert(index, record);
                        }
                        Err(_) => skipped += 1,
                    }
                }
            }
        }
        Ok((found, skipped))
    };
    match catch_unwind(AssertUnwindSafe(read)) {
        Ok(result) => result.map_err(|e| e.to_string()),
        Err(_) => Err("reading the jobs panicked".into()),
    }
}
