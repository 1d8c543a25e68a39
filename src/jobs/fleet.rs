//! Jobs in shared mode: one job, any replica.
//!
//! A job is admitted into Redis (record, results already known, lease) before `202`, by a
//! script that also counts its client's open jobs fleet-wide (`shared/jobs.rs`). The replica
//! that admitted it runs it, and every result is written to Redis as it arrives. Every
//! [`TICK`] (and at once when a job is announced ended) each replica:
//! - writes again what Redis did not take (results, records: idempotent writes, in order);
//! - renews the leases of the jobs it runs, and learns what became of each: cancelled
//!   through another replica (it stops), taken by another replica after its own lease lapsed
//!   (it lets go), or lost by Redis (a restart without persistence: it writes the job again
//!   from what it holds);
//! - takes over any open job whose lease lapsed ([`LEASE`] after its replica stopped
//!   renewing it: the replica died), resuming from the results in Redis.
//!
//! A replica that does not run a job reads it from Redis for `GET /jobs/{id}` and
//! `DELETE /jobs/{id}`, and polls it to stream its results (`reader.rs`).
//!
//! While Redis is out of reach no job item is started (its result could not be kept where
//! the fleet sees it): jobs pause, lookups go on in fallback. A replica that dies loses no
//! item: an item whose result was not written is asked for again by the replica that takes
//! the job over, and is answered from the shared cache tier if its call had been answered
//! (the cache is written before the job's result), so it is called again only if the
//! replica died during the call itself.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::model::{ItemResult, JobId, JobRecord};
use super::{Job, JobError, JobStatus, Jobs};
use crate::lookup::pacing::PacingMode;
use crate::lookup::validation::ClientId;
use crate::shared::{Renewal, Shared};
use crate::store::JobWrite;

/// How long a job's lease lives without renewal: how soon another replica takes over a job
/// whose replica died.
pub(super) const LEASE: Duration = Duration::from_secs(5);
/// How often leases are renewed and lapsed ones looked for.
const TICK: Duration = Duration::from_secs(1);

/// The results a job already has, as written to a store.
pub(super) fn answered(job: &Job) -> Vec<(u32, Vec<u8>)> {
    job.items
        .iter()
        .enumerate()
        .filter_map(|(i, item)| Some((i as u32, item.result.as_ref()?)))
        .map(|(i, r)| (i, serde_json::to_vec(r).expect("a result serializes")))
        .collect()
}

impl Jobs {
    /// Admits a new job into Redis, leased to this replica.
    pub(super) async fn admit(&self, fleet: &Shared, job: &Job) -> Result<(), JobError> {
        if fleet.mode() != PacingMode::Shared {
            return Err(JobError::NotStored);
        }
        let record = serde_json::to_vec(&job.record).expect("a record serializes");
        let limit = self.config.per_client;
        match fleet
            .job_admit(
                &job.id.0,
                &job.client,
                limit,
                &record,
                &answered(job),
                LEASE,
            )
            .await
        {
            Some(true) => {}
            Some(false) => return Err(JobError::TooManyJobs(limit)),
            None => return Err(JobError::NotStored),
        }
        // Answered whole at submission (every item cached, invalid or duplicated): it ends
        // at once, and must not stay among the open jobs.
        if !job.open() {
            self.persist(self.record_write(job)).await;
        }
        Ok(())
    }

    /// Writes to Redis, in order after any write still waiting; keeps what Redis refused for
    /// the next tick.
    pub(super) async fn write_shared(&self, fleet: &Shared, write: JobWrite) {
        let waiting = !self.unflushed().is_empty();
        if waiting || !try_write(fleet, &write).await {
            self.unflushed().push(write);
        }
    }

    fn unflushed(&self) -> std::sync::MutexGuard<'_, Vec<JobWrite>> {
        self.unflushed.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A job as Redis holds it, if it is `client`'s (another client's is not found).
    pub(super) async fn snapshot(&self, id: JobId, client: &ClientId) -> Result<Job, JobError> {
        let fleet = self.fleet.as_ref().ok_or(JobError::NotFound)?;
        let loaded = fleet
            .job_load(&id.0)
            .await
            .ok_or(JobError::Unavailable)?
            .ok_or(JobError::NotFound)?;
        let (record, results) = parse(loaded.record, loaded.results).ok_or(JobError::NotFound)?;
        if record.client_id != client.as_str() {
            return Err(JobError::NotFound);
        }
        Ok(self.build(id, client.clone(), record, results, false))
    }

    /// Cancels a job another replica runs: its record is written ended, and the news tells
    /// that replica to stop.
    pub(super) async fn cancel_elsewhere(
        &self,
        id: JobId,
        client: &ClientId,
    ) -> Result<JobStatus, JobError> {
        let fleet = self.fleet.as_ref().ok_or(JobError::NotFound)?;
        let mut job = self.snapshot(id, client).await?;
        if job.open() {
            job.stop(crate::store::now_ms());
            let Some(JobWrite::Job {
                record,
                keep_until_ms,
                ..
            }) = self.record_write(&job)
            else {
                unreachable!("shared mode writes job records");
            };
            let keep = keep_for(keep_until_ms).expect("a cancelled job ends");
            if !fleet.job_record(&id.0, &record, Some(keep)).await {
                return Err(JobError::Unavailable);
            }
        }
        Ok(self.status_of(&job))
    }

    /// Keeps this replica's part of the fleet's jobs: writes, leases, takeovers. Runs until
    /// aborted.
    pub(super) async fn fleet_loop(self: Arc<Self>, fleet: Arc<Shared>) {
        loop {
            if fleet.mode() == PacingMode::Shared {
                self.flush(&fleet).await;
                self.renew(&fleet).await;
                self.take_over(&fleet).await;
                // Items may be started again (Redis is back, or a job arrived).
                self.wake.notify_one();
            }
            tokio::select! {
                () = tokio::time::sleep(TICK) => {}
                () = fleet.job_news() => {}
            }
        }
    }

    async fn flush(&self, fleet: &Shared) {
        let waiting = std::mem::take(&mut *self.unflushed());
        let mut waiting = waiting.into_iter();
        while let Some(write) = waiting.next() {
            if !try_write(fleet, &write).await {
                let mut unflushed = self.unflushed();
                let newer = std::mem::take(&mut *unflushed);
                unflushed.push(write);
                unflushed.extend(waiting);
                unflushed.extend(newer);
                return;
            }
        }
    }

    async fn renew(&self, fleet: &Shared) {
        let ids: Vec<JobId> = self
            .lock()
            .jobs
            .values()
            .filter(|j| j.open())
            .map(|j| j.id)
            .collect();
        let keys: Vec<[u8; 16]> = ids.iter().map(|id| id.0).collect();
        let Some(found) = fleet.job_renew(&keys, LEASE).await else {
            return;
        };
        for (id, renewal) in ids.into_iter().zip(found) {
            match renewal {
                Renewal::Held => {}
                Renewal::Lost => {
                    // Its answers still under way are dropped; the new runner asks again.
                    self.lock().jobs.remove(&id);
                    tracing::warn!(job = %id, "bulk job taken over by another replica (this one's lease lapsed)");
                }
                Renewal::Ended => {
                    let record = match fleet.job_load(&id.0).await {
                        Some(Some(loaded)) => serde_json::from_slice::<JobRecord>(&loaded.record)
                            .ok()
                            .filter(|r| r.cancelled),
                        Some(None) => None,
                        None => continue,
                    };
                    let mut book = self.lock();
                    match record {
                        Some(record) => {
                            if let Some(job) = book.jobs.get_mut(&id) {
                                job.stop(record.finished_ms.unwrap_or_else(crate::store::now_ms));
                                tracing::info!(job = %id, "bulk job cancelled through another replica");
                            }
                        }
                        None => {
                            book.jobs.remove(&id);
                        }
                    }
                }
                Renewal::Missing => {
                    let held = self.lock().jobs.get(&id).map(|job| {
                        (
                            job.client.clone(),
                            serde_json::to_vec(&job.record).expect("a record serializes"),
                            answered(job),
                        )
                    });
                    if let Some((client, record, results)) = held
                        && fleet
                            .job_restore(&id.0, &client, &record, &results, LEASE)
                            .await
                    {
                        tracing::warn!(job = %id, "Redis had lost a bulk job (restarted without persistence?): written again");
                    }
                }
            }
        }
        self.publish();
    }

    /// Takes over the open jobs whose lease lapsed.
    async fn take_over(&self, fleet: &Shared) {
        let Some(open) = fleet.open_jobs().await else {
            return;
        };
        for key in open {
            let id = JobId(key);
            if self.lock().jobs.contains_key(&id)
                || fleet.job_claim(&key, LEASE).await != Some(true)
            {
                continue;
            }
            let loaded = fleet.job_load(&key).await.flatten();
            let Some((record, results)) = loaded.and_then(|l| parse(l.record, l.results)) else {
                fleet.job_release(&key).await;
                continue;
            };
            let Ok(client) = ClientId::parse(&record.client_id) else {
                fleet.job_release(&key).await;
                continue;
            };
            let known: Vec<usize> = results.keys().copied().collect();
            let job = self.build(id, client, record, results, true);
            // Items this replica's cache answered are written like any result.
            let fresh: Vec<_> = answered(&job)
                .into_iter()
                .filter(|(i, _)| known.binary_search(&(*i as usize)).is_err())
                .collect();
            if !fresh.is_empty() {
                self.persist(Some(JobWrite::Results {
                    id: key,
                    items: fresh,
                }))
                .await;
            }
            if !job.open() {
                self.persist(self.record_write(&job)).await;
            }
            tracing::info!(
                job = %id,
                done = job.done,
                total = job.items.len(),
                "bulk job taken over (its replica stopped renewing its lease)"
            );
            self.lock().jobs.insert(id, job);
            self.publish();
        }
    }
}

/// A record and its results, opened and parsed; `None` if the record does not parse.
fn parse(
    record: Vec<u8>,
    results: BTreeMap<u32, Vec<u8>>,
) -> Option<(JobRecord, BTreeMap<usize, ItemResult>)> {
    let record = serde_json::from_slice(&record).ok()?;
    let results = results
        .into_iter()
        .filter_map(|(i, r)| Some((i as usize, serde_json::from_slice(&r).ok()?)))
        .collect();
    Some((record, results))
}

/// An ended job's time left to keep, from its keep-until time; `None` while it is open.
fn keep_for(keep_until_ms: u64) -> Option<Duration> {
    (keep_until_ms != u64::MAX)
        .then(|| Duration::from_millis(keep_until_ms.saturating_sub(crate::store::now_ms()).max(1)))
}

/// One write to Redis; `false` if it did not take.
async fn try_write(fleet: &Shared, write: &JobWrite) -> bool {
    match write {
        JobWrite::Results { id, items } => fleet.job_results(id, items).await,
        JobWrite::Job {
            id,
            keep_until_ms,
            record,
            ..
        } => fleet.job_record(id, record, keep_for(*keep_until_ms)).await,
    }
}
