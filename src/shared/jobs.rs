//! Bulk jobs in Redis: in shared mode a job lives here rather than in one replica's store,
//! so that any replica can read it and carry it on.
//!
//! - `<prefix>:job:<id>`: the job's record, sealed (it holds CPFs and the client id).
//! - `<prefix>:job:<id>:results`: a hash, item index → that item's result, sealed.
//! - `<prefix>:jobs`: the open jobs, a hash: job id → its client's tag (a keyed hash of the
//!   client id, so that `--jobs-per-client` is counted fleet-wide without the client id).
//! - `<prefix>:job:<id>:lease`: the replica running the job (`SET PX`, renewed every second
//!   by `jobs/fleet.rs`). A lease that lapses (its replica died) is taken by another.
//! - `<prefix>:jobs:news`: a channel; a job cancelled through one replica is announced there,
//!   so that the replica running it stops at once rather than at its next renewal.
//!
//! Records and results are sealed with XChaCha20-Poly1305 under a key derived from the
//! shared redaction key (every replica has it), bound to their Redis key and item index: Redis
//! never holds a CPF or a client id in clear, and a result cannot be moved to another item.
//! Ended jobs expire with their retention; open ones do not expire.

use std::collections::BTreeMap;
use std::time::Duration;

use super::Shared;
use crate::lookup::validation::ClientId;
use crate::store::{DataKey, Sealer};

/// Admits a job, counting its client's open jobs fleet-wide (KEYS and ARGV in its header).
pub(super) const ADMIT: &str = include_str!("scripts/job_admit.lua");
/// Renews this replica's job leases (KEYS and ARGV in its header).
pub(super) const RENEW: &str = include_str!("scripts/job_renew.lua");

/// A job as Redis holds it, opened.
#[derive(Debug)]
pub(crate) struct SharedJob {
    /// The job record (JSON).
    pub(crate) record: Vec<u8>,
    /// Item index → result record (JSON).
    pub(crate) results: BTreeMap<u32, Vec<u8>>,
}

/// What became of a job this replica runs, as its lease renewal found it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Renewal {
    /// Still this replica's.
    Held,
    /// Another replica holds it now (this one's lease lapsed): stop running it.
    Lost,
    /// No longer open: cancelled through another replica.
    Ended,
    /// Redis lost it (restarted without persistence): write it again.
    Missing,
}

/// A job id in Redis keys: its 32 hex digits.
fn hex(id: &[u8; 16]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

impl Shared {
    /// The sealer for jobs: its key derived from the shared redaction key, so every replica
    /// opens what another sealed.
    fn job_sealer(&self) -> Sealer {
        Sealer::new(&DataKey(blake3::derive_key(
            "score-proxy shared jobs v1",
            self.config.key_secret.as_bytes(),
        )))
    }

    /// A client's tag among the open jobs: a keyed hash of its id.
    fn client_tag(&self, client: &ClientId) -> String {
        let mut h = blake3::Hasher::new_keyed(&self.key);
        h.update(b"job client\0");
        h.update(client.as_str().as_bytes());
        h.finalize().to_hex()[..32].to_owned()
    }

    fn seal_record(&self, id: &[u8; 16], record: &[u8]) -> Option<Vec<u8>> {
        let key = self.job_key(&hex(id));
        self.job_sealer().seal_blob(key.as_bytes(), record).ok()
    }

    fn seal_results(&self, id: &[u8; 16], items: &[(u32, Vec<u8>)]) -> Option<Vec<(u32, Vec<u8>)>> {
        let sealer = self.job_sealer();
        let key = self.job_results_key(&hex(id));
        items
            .iter()
            .map(|(i, r)| Some((*i, sealer.seal_blob(&result_aad(&key, *i), r).ok()?)))
            .collect()
    }

    /// Stores a new job (record and the results already known), open and leased to this
    /// replica, if its client has fewer than `limit` open jobs. `Some(false)`: the client is
    /// at its limit; `None`: Redis could not say (nothing is stored for sure).
    pub(crate) async fn job_admit(
        &self,
        id: &[u8; 16],
        client: &ClientId,
        limit: usize,
        record: &[u8],
        results: &[(u32, Vec<u8>)],
        lease: Duration,
    ) -> Option<bool> {
        let job = hex(id);
        let sealed = self.seal_record(id, record)?;
        let results = self.seal_results(id, results)?;
        let tag = self.client_tag(client);
        let keys = [
            self.open_jobs_key(),
            self.job_key(&job),
            self.job_results_key(&job),
            self.job_lease_key(&job),
        ];
        let replica = self.replica_id.clone();
        let admit = &self.job_admit;
        let admitted = self
            .op("job_write", |mut c| async move {
                let mut call = admit.prepare_invoke();
                for key in &keys {
                    call.key(key);
                }
                call.arg(&job)
                    .arg(&tag)
                    .arg(limit)
                    .arg(sealed)
                    .arg(&replica)
                    .arg(lease.as_millis() as u64);
                for (i, r) in results {
                    call.arg(i).arg(r);
                }
                call.invoke_async::<i64>(&mut c).await
            })
            .await?;
        Some(admitted == 1)
    }

    /// Writes items' results. `false` if Redis did not take them.
    pub(crate) async fn job_results(&self, id: &[u8; 16], items: &[(u32, Vec<u8>)]) -> bool {
        let Some(sealed) = self.seal_results(id, items) else {
            return false;
        };
        let key = self.job_results_key(&hex(id));
        self.op("job_write", |mut c| async move {
            let mut cmd = redis::cmd("HSET");
            cmd.arg(&key);
            for (i, r) in sealed {
                cmd.arg(i).arg(r);
            }
            cmd.query_async::<()>(&mut c).await
        })
        .await
        .is_some()
    }

    /// Replaces a job's record. `keep_for`: the job ended (done or cancelled), so it leaves
    /// the open jobs, loses its lease, and expires with its results after that long.
    /// `false` if Redis did not take it.
    pub(crate) async fn job_record(
        &self,
        id: &[u8; 16],
        record: &[u8],
        keep_for: Option<Duration>,
    ) -> bool {
        let job = hex(id);
        let Some(sealed) = self.seal_record(id, record) else {
            return false;
        };
        let (record_key, results_key, lease_key, open) = (
            self.job_key(&job),
            self.job_results_key(&job),
            self.job_lease_key(&job),
            self.open_jobs_key(),
        );
        let news = self.job_news_channel();
        self.op("job_write", |mut c| async move {
            let mut pipe = redis::pipe();
            pipe.atomic();
            match keep_for {
                None => {
                    pipe.cmd("SET").arg(&record_key).arg(sealed).ignore();
                }
                Some(keep) => {
                    let ms = keep.as_millis().max(1) as u64;
                    pipe.cmd("SET")
                        .arg(&record_key)
                        .arg(sealed)
                        .arg("PX")
                        .arg(ms)
                        .ignore()
                        .cmd("PEXPIRE")
                        .arg(&results_key)
                        .arg(ms)
                        .ignore()
                        .cmd("HDEL")
                        .arg(&open)
                        .arg(&job)
                        .ignore()
                        .cmd("DEL")
                        .arg(&lease_key)
                        .ignore()
                        .cmd("PUBLISH")
                        .arg(&news)
                        .arg(&job)
                        .ignore();
                }
            }
            pipe.query_async::<()>(&mut c).await
        })
        .await
        .is_some()
    }

    /// Reads a job. `Some(None)`: Redis has no such job (or none this key opens); `None`:
    /// Redis could not say.
    pub(crate) async fn job_load(&self, id: &[u8; 16]) -> Option<Option<SharedJob>> {
        let job = hex(id);
        let (record_key, results_key) = (self.job_key(&job), self.job_results_key(&job));
        let (record, results) = self
            .op("job_read", |mut c| async move {
                redis::pipe()
                    .cmd("GET")
                    .arg(&record_key)
                    .cmd("HGETALL")
                    .arg(&results_key)
                    .query_async::<(Option<Vec<u8>>, BTreeMap<u32, Vec<u8>>)>(&mut c)
                    .await
            })
            .await?;
        let Some(record) = record else {
            return Some(None);
        };
        let sealer = self.job_sealer();
        let Ok(record) = sealer.open_blob(self.job_key(&job).as_bytes(), &record) else {
            return Some(None);
        };
        let key = self.job_results_key(&job);
        let results = results
            .into_iter()
            .filter_map(|(i, r)| Some((i, sealer.open_blob(&result_aad(&key, i), &r).ok()?)))
            .collect();
        Some(Some(SharedJob { record, results }))
    }

    /// Renews this replica's leases on `ids`; what became of each, in order.
    pub(crate) async fn job_renew(
        &self,
        ids: &[[u8; 16]],
        lease: Duration,
    ) -> Option<Vec<Renewal>> {
        if ids.is_empty() {
            return Some(Vec::new());
        }
        let jobs: Vec<String> = ids.iter().map(hex).collect();
        let mut keys = vec![self.open_jobs_key()];
        for job in &jobs {
            keys.push(self.job_lease_key(job));
            keys.push(self.job_key(job));
        }
        let replica = self.replica_id.clone();
        let renew = &self.job_renew;
        let found = self
            .op("job_lease", |mut c| async move {
                let mut call = renew.prepare_invoke();
                for key in &keys {
                    call.key(key);
                }
                call.arg(&replica).arg(lease.as_millis() as u64);
                for job in &jobs {
                    call.arg(job);
                }
                call.invoke_async::<Vec<i64>>(&mut c).await
            })
            .await?;
        Some(
            found
                .into_iter()
                .map(|n| match n {
                    1 => Renewal::Held,
                    2 => Renewal::Ended,
                    3 => Renewal::Missing,
                    _ => Renewal::Lost,
                })
                .collect(),
        )
    }

    /// Writes again a job Redis lost (it restarted without persistence), from what the
    /// replica running it holds: record, results, open, leased.
    pub(crate) async fn job_restore(
        &self,
        id: &[u8; 16],
        client: &ClientId,
        record: &[u8],
        results: &[(u32, Vec<u8>)],
        lease: Duration,
    ) -> bool {
        self.job_admit(id, client, usize::MAX >> 1, record, results, lease)
            .await
            .is_some()
    }

    /// The open jobs, by id.
    pub(crate) async fn open_jobs(&self) -> Option<Vec<[u8; 16]>> {
        let key = self.open_jobs_key();
        let ids = self
            .op("job_read", |mut c| async move {
                redis::cmd("HKEYS")
                    .arg(&key)
                    .query_async::<Vec<String>>(&mut c)
                    .await
            })
            .await?;
        Some(ids.iter().filter_map(|h| parse_hex(h)).collect())
    }

    /// Takes the lease of a job no replica holds. `Some(false)`: another holds it.
    pub(crate) async fn job_claim(&self, id: &[u8; 16], lease: Duration) -> Option<bool> {
        let key = self.job_lease_key(&hex(id));
        let replica = self.replica_id.clone();
        let taken = self
            .op("job_lease", |mut c| async move {
                redis::cmd("SET")
                    .arg(&key)
                    .arg(&replica)
                    .arg("NX")
                    .arg("PX")
                    .arg(lease.as_millis() as u64)
                    .query_async::<Option<String>>(&mut c)
                    .await
            })
            .await?;
        Some(taken.is_some())
    }

    /// Gives up this replica's lease on a job (if it still holds it).
    pub(crate) async fn job_release(&self, id: &[u8; 16]) {
        self.release_lease("job_lease", self.job_lease_key(&hex(id)))
            .await;
    }

    /// Resolves when a job was announced ended on `<prefix>:jobs:news` (by any replica,
    /// this one included), or at once if one was since the last call.
    pub(crate) async fn job_news(&self) {
        self.job_news.notified().await;
    }
}

/// Binds a sealed result to its job and item.
fn result_aad(results_key: &str, index: u32) -> Vec<u8> {
    [results_key.as_bytes(), &index.to_be_bytes()].concat()
}

fn parse_hex(h: &str) -> Option<[u8; 16]> {
    crate::jobs::model::JobId::parse(h).map(|id| id.0)
}
