//! Bulk jobs: thousands of CPFs submitted at once, answered as budget allows, resumed after a
//! restart.
//!
//! A job's items are looked up in the background band (`scheduler/background.rs`), so they use
//! only budget no caller needs: an interactive lookup waits at most one interval longer because
//! of a job. [`Jobs::run`] keeps one item waiting in the lane at a time (another may be queued
//! and one under way), taking items round-robin across client ids, oldest job first within
//! one: jobs of different clients share what callers leave free. At submission every item
//! whose answer is cached is answered at once, duplicates within a job share their first
//! item's lookup, and an invalid CPF fails its own line (`invalid_request`), never the job.
//! An item the upstream could not answer for a reason that passes (a penalty, callers keeping
//! the budget busy until its deadline, an open breaker) is asked for again; other failures
//! (the upstream refusing the CPF, a server error) are its line's result.
//!
//! With a persistent store (`--data-dir`), a job is committed before `202 Accepted`, and every
//! result as it arrives: after a restart the job resumes without calling again for what is
//! done (see `store/jobs.rs`). Without one, jobs live in memory and a restart loses them.
//!
//! In shared mode (`--redis-url`) jobs live in Redis instead (`shared/jobs.rs`), so that any
//! replica reads any job and carries it on: the replica that accepted a job runs it under a
//! lease, and another takes it over when that lease lapses (`fleet.rs`).

mod fleet;
pub(crate) mod model;
mod reader;
mod runner;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, oneshot, watch};

use crate::lookup::cache::{CacheLookup, ScoreCache};
use crate::lookup::error::ProxyError;
use crate::lookup::scheduler::Scheduler;
use crate::lookup::validation::{ClientId, Cpf, LookupKey};
use crate::shared::Shared;
use crate::store::{JobWrite, Store, StoredJob};
use crate::telemetry::metrics::Metrics;
use model::{Item, ItemResult, JobId, JobRecord, JobState};

/// `--job-max-items`, `--jobs-per-client`, `--job-retention`.
#[derive(Clone, Debug)]
pub(crate) struct JobsConfig {
    pub(crate) max_items: usize,
    pub(crate) per_client: usize,
    pub(crate) retention: Duration,
}

/// Why a submission (or a request about a job) was refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum JobError {
    #[error("a job holds at most {0} CPFs")]
    TooManyItems(usize),
    #[error("a job needs at least one CPF")]
    Empty,
    #[error("this client id already has {0} open jobs; wait for one to finish or cancel one")]
    TooManyJobs(usize),
    #[error("no such job for this client id")]
    NotFound,
    #[error("the job could not be stored; retry later")]
    NotStored,
    #[error("the jobs' store (Redis) is out of reach; retry later")]
    Unavailable,
}

/// A job's progress, as `GET /jobs/{id}` shows it.
#[derive(Debug, serde::Serialize)]
pub(crate) struct JobStatus {
    pub(crate) id: String,
    pub(crate) state: JobState,
    pub(crate) total: usize,
    pub(crate) done: usize,
    pub(crate) failed: usize,
    pub(crate) from_cache: usize,
    /// Upstream calls still to make, times the interval: the earliest the job can end if no
    /// caller needs budget meanwhile. `null` once it ended.
    pub(crate) eta_seconds: Option<f64>,
    pub(crate) created_at: String,
    pub(crate) started_at: Option<String>,
    pub(crate) finished_at: Option<String>,
    pub(crate) links: serde_json::Value,
}

struct Job {
    id: JobId,
    client: ClientId,
    record: JobRecord,
    items: Vec<Item>,
    /// First items (one per distinct lookup) still to ask for.
    todo: VecDeque<usize>,
    /// Items asked for and not answered yet.
    in_flight: usize,
    done: usize,
    failed: usize,
    from_cache: usize,
    /// Results so far; results streams wait on it.
    progress: watch::Sender<usize>,
    /// Set on cancellation: the items under way stop waiting.
    cancelled: watch::Sender<bool>,
}

impl Job {
    fn state(&self) -> JobState {
        if self.record.cancelled {
            JobState::Cancelled
        } else if self.done == self.items.len() {
            JobState::Done
        } else if self.record.started_ms.is_some() || self.done > 0 {
            JobState::Running
        } else {
            JobState::Queued
        }
    }

    fn open(&self) -> bool {
        matches!(self.state(), JobState::Queued | JobState::Running)
    }

    /// Records `result` for `first` and every duplicate of it; returns the indexes set.
    fn answer(&mut self, first: usize, result: &ItemResult) -> Vec<usize> {
        let mut set = Vec::new();
        for (i, item) in self.items.iter_mut().enumerate() {
            if item.first == first && item.result.is_none() {
                item.result = Some(result.clone());
                set.push(i);
            }
        }
        self.done += set.len();
        if !result.is_ok() {
            self.failed += set.len();
        }
        if result.from_cache {
            self.from_cache += set.len();
        }
        self.progress.send_replace(self.done);
        set
    }

    /// Cancels it here: no more items asked for, the ones under way stop waiting.
    fn stop(&mut self, now_ms: u64) {
        self.record.cancelled = true;
        self.record.finished_ms.get_or_insert(now_ms);
        self.todo.clear();
        self.cancelled.send_replace(true);
        self.progress.send_modify(|_| {});
    }

    fn keep_until_ms(&self, retention: Duration) -> u64 {
        match (self.record.finished_ms, self.record.cancelled) {
            (Some(end), _) => end + retention.as_millis() as u64,
            (None, true) => crate::store::now_ms() + retention.as_millis() as u64,
            (None, false) => u64::MAX,
        }
    }
}

/// Every job, and the runner's place in the round-robin.
#[derive(Default)]
struct Book {
    jobs: HashMap<JobId, Job>,
    /// The client whose item was asked for last.
    last_client: Option<ClientId>,
}

pub(crate) struct Jobs {
    config: JobsConfig,
    scheduler: Arc<Scheduler>,
    cache: Arc<dyn ScoreCache>,
    store: Option<Arc<Store>>,
    /// Shared mode: jobs live in Redis, and the store above is not used for them.
    fleet: Option<Arc<Shared>>,
    /// Shared mode: writes Redis did not take, tried again at each lease renewal (they are
    /// idempotent: a record replaced, results set by index).
    unflushed: Mutex<Vec<JobWrite>>,
    metrics: Arc<Metrics>,
    book: Mutex<Book>,
    /// Wakes the runner: a job arrived or an item must be asked for again.
    wake: Notify,
}

impl Jobs {
    /// The jobs manager, with the jobs the store kept (resumed from their results).
    pub(crate) fn new(
        config: JobsConfig,
        scheduler: Arc<Scheduler>,
        cache: Arc<dyn ScoreCache>,
        store: Option<Arc<Store>>,
        fleet: Option<Arc<Shared>>,
        metrics: Arc<Metrics>,
        mut kept: Vec<StoredJob>,
    ) -> Arc<Jobs> {
        let store = if fleet.is_some() {
            if !kept.is_empty() {
                tracing::warn!(
                    jobs = kept.len(),
                    "bulk jobs kept in the data directory are not resumed in shared mode \
                     (jobs live in Redis there); restart without --redis-url to finish them"
                );
                kept.clear();
            }
            None
        } else {
            store
        };
        let jobs = Arc::new(Jobs {
            config,
            scheduler,
            cache,
            store,
            fleet,
            unflushed: Mutex::new(Vec::new()),
            metrics,
            book: Mutex::new(Book::default()),
            wake: Notify::new(),
        });
        let mut resumed = 0;
        for stored in kept {
            let Ok(record) = serde_json::from_slice::<JobRecord>(&stored.record) else {
                continue;
            };
            let Ok(client) = ClientId::parse(&record.client_id) else {
                continue;
            };
            let results = stored
                .results
                .into_iter()
                .filter_map(|(i, r)| Some((i as usize, serde_json::from_slice(&r).ok()?)))
                .collect();
            let job = jobs.build(JobId(stored.id), client, record, results, true);
            resumed += usize::from(job.open());
            jobs.lock().jobs.insert(job.id, job);
        }
        if resumed > 0 {
            tracing::info!(resumed, "bulk jobs resumed from the persistent store");
        }
        jobs.publish();
        jobs
    }

    fn lock(&self) -> MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Builds a job's items from its record: keys, duplicates, the results already known
    /// (stored ones, then fresh cached answers if `consult_cache`), and what is left to ask
    /// for.
    fn build(
        &self,
        id: JobId,
        client: ClientId,
        record: JobRecord,
        mut known: BTreeMap<usize, ItemResult>,
        consult_cache: bool,
    ) -> Job {
        let mut firsts: HashMap<LookupKey, usize> = HashMap::new();
        let mut items = Vec::with_capacity(record.cpfs.len());
        for (i, raw) in record.cpfs.iter().enumerate() {
            let (key, first, result) = match Cpf::parse(raw) {
                Ok(cpf) => {
                    let key = LookupKey {
                        client_id: client.clone(),
                        cpf,
                    };
                    let first = *firsts.entry(key.clone()).or_insert(i);
                    (Some(key), first, known.remove(&i))
                }
                Err(e) => (
                    None,
                    i,
                    Some(ItemResult::failed(400, "invalid_request", e.message())),
                ),
            };
            items.push(Item {
                cpf: raw.clone(),
                key,
                first,
                result,
            });
        }
        let mut job = Job {
            id,
            client,
            record,
            items,
            todo: VecDeque::new(),
            in_flight: 0,
            done: 0,
            failed: 0,
            from_cache: 0,
            progress: watch::channel(0).0,
            cancelled: watch::channel(false).0,
        };
        for item in &job.items {
            if let Some(r) = &item.result {
                job.done += 1;
                job.failed += usize::from(!r.is_ok());
                job.from_cache += usize::from(r.from_cache);
            }
        }
        job.progress.send_replace(job.done);
        if job.record.cancelled {
            return job;
        }
        // A duplicate whose first item is answered takes its answer; a first item whose
        // answer is cached takes that.
        for i in 0..job.items.len() {
            let item = &job.items[i];
            if item.result.is_some() || item.first != i {
                continue;
            }
            let key = item
                .key
                .clone()
                .expect("a first item with no result has a key");
            let done_dup = job
                .items
                .iter()
                .find(|d| d.first == i && d.result.is_some())
                .and_then(|d| d.result.clone());
            if let Some(result) = done_dup {
                job.answer(i, &result);
            } else if let Some(CacheLookup::Fresh(hit)) =
                consult_cache.then(|| self.cache.get(&key))
            {
                job.answer(i, &ItemResult::ok(&hit.body, true));
            } else {
                job.todo.push_back(i);
            }
        }
        if job.state() == JobState::Done && job.record.finished_ms.is_none() {
            job.record.finished_ms = Some(crate::store::now_ms());
        }
        job
    }

    /// Accepts a job: stored (when there is a store) before this returns, its cached items
    /// answered, the rest handed to the runner.
    pub(crate) async fn submit(
        &self,
        client: ClientId,
        cpfs: Vec<String>,
    ) -> Result<JobStatus, JobError> {
        if cpfs.is_empty() {
            return Err(JobError::Empty);
        }
        if cpfs.len() > self.config.max_items {
            return Err(JobError::TooManyItems(self.config.max_items));
        }
        self.purge();
        // In shared mode Redis counts the open jobs, fleet-wide, as it admits the job.
        let open = self
            .lock()
            .jobs
            .values()
            .filter(|j| j.client == client && j.open())
            .count();
        if self.fleet.is_none() && open >= self.config.per_client {
            return Err(JobError::TooManyJobs(self.config.per_client));
        }
        let record = JobRecord {
            client_id: client.as_str().to_owned(),
            cpfs,
            created_ms: crate::store::now_ms(),
            started_ms: None,
            finished_ms: None,
            cancelled: false,
            submitted: crate::telemetry::SubmissionLink::current(),
        };
        let job = self.build(JobId::generate(), client, record, BTreeMap::new(), true);
        if let Some(fleet) = &self.fleet {
            self.admit(fleet, &job).await?;
        } else if let Some(store) = &self.store {
            let (committed, stored) = oneshot::channel();
            store
                .write_job(JobWrite::Job {
                    id: job.id.0,
                    keep_until_ms: job.keep_until_ms(self.config.retention),
                    record: serde_json::to_vec(&job.record).expect("a record serializes"),
                    committed: Some(committed),
                })
                .await;
            if stored.await != Ok(true) {
                return Err(JobError::NotStored);
            }
            let answered = fleet::answered(&job);
            if !answered.is_empty() {
                store
                    .write_job(JobWrite::Results {
                        id: job.id.0,
                        items: answered,
                    })
                    .await;
            }
        }
        let status = self.status_of(&job);
        tracing::info!(
            job = %job.id,
            total = job.items.len(),
            answered = job.done,
            "bulk job accepted"
        );
        self.lock().jobs.insert(job.id, job);
        self.publish();
        self.wake.notify_one();
        Ok(status)
    }

    /// `--job-max-items`.
    pub(crate) fn max_items(&self) -> usize {
        self.config.max_items
    }

    /// The job `id` of `client` (another client's is not found).
    pub(crate) async fn status(&self, id: JobId, client: &ClientId) -> Result<JobStatus, JobError> {
        self.purge();
        if let Some(job) = self.lock().jobs.get(&id) {
            return if &job.client == client {
                Ok(self.status_of(job))
            } else {
                Err(JobError::NotFound)
            };
        }
        // Shared mode: a job another replica runs (or ran).
        let job = self.snapshot(id, client).await?;
        Ok(self.status_of(&job))
    }

    fn status_of(&self, job: &Job) -> JobStatus {
        let calls_left = job.todo.len() + job.in_flight;
        let open = job.open();
        let id = job.id.to_string();
        JobStatus {
            state: job.state(),
            total: job.items.len(),
            done: job.done,
            failed: job.failed,
            from_cache: job.from_cache,
            eta_seconds: open.then(|| {
                (self.scheduler.interval().as_secs_f64() * calls_left as f64 * 10.0).round() / 10.0
            }),
            created_at: rfc3339(job.record.created_ms),
            started_at: job.record.started_ms.map(rfc3339),
            finished_at: job.record.finished_ms.map(rfc3339),
            links: serde_json::json!({
                "self": format!("/jobs/{id}"),
                "results": format!("/jobs/{id}/results"),
            }),
            id,
        }
    }

    /// Cancels a job: its items not yet asked for never are, and the ones waiting for budget
    /// leave; results found so far stay readable.
    pub(crate) async fn cancel(&self, id: JobId, client: &ClientId) -> Result<JobStatus, JobError> {
        let local = {
            let mut book = self.lock();
            let retention = self.config.retention;
            match book.jobs.get_mut(&id) {
                Some(job) if &job.client != client => return Err(JobError::NotFound),
                Some(job) => {
                    if job.open() {
                        job.stop(crate::store::now_ms());
                    }
                    Some((self.status_of(job), self.record_write_with(job, retention)))
                }
                None => None,
            }
        };
        let status = match local {
            Some((status, write)) => {
                self.persist(write).await;
                status
            }
            // Shared mode: a job another replica runs; it hears of this on the jobs' news.
            None => self.cancel_elsewhere(id, client).await?,
        };
        self.publish();
        Ok(status)
    }

    /// The job record's write, when there is a store.
    fn record_write(&self, job: &Job) -> Option<JobWrite> {
        self.record_write_with(job, self.config.retention)
    }

    fn record_write_with(&self, job: &Job, retention: Duration) -> Option<JobWrite> {
        if self.store.is_none() && self.fleet.is_none() {
            return None;
        }
        Some(JobWrite::Job {
            id: job.id.0,
            keep_until_ms: job.keep_until_ms(retention),
            record: serde_json::to_vec(&job.record).expect("a record serializes"),
            committed: None,
        })
    }

    async fn persist(&self, write: Option<JobWrite>) {
        let Some(write) = write else {
            return;
        };
        if let Some(fleet) = &self.fleet {
            self.write_shared(fleet, write).await;
        } else if let Some(store) = &self.store {
            store.write_job(write).await;
        }
    }

    /// Forgets ended jobs past their retention (the store deletes its copy on its own).
    fn purge(&self) {
        let now = crate::store::now_ms();
        let retention = self.config.retention;
        self.lock()
            .jobs
            .retain(|_, j| j.open() || j.keep_until_ms(retention) > now);
    }

    /// Jobs by state, for the gauges.
    fn publish(&self) {
        let mut by_state = [0usize; 4];
        for job in self.lock().jobs.values() {
            by_state[job.state() as usize] += 1;
        }
        self.metrics.set_jobs(by_state);
        self.publish_oldest();
    }
}

/// Whether a failed item is worth asking for again: the failure was the budget's or the
/// proxy's state, not the upstream's answer about this CPF.
fn passes(e: &ProxyError) -> bool {
    matches!(
        e,
        ProxyError::UpstreamPenalty { .. }
            | ProxyError::DeadlineUnreachable { .. }
            | ProxyError::QueueFull { .. }
            | ProxyError::CircuitOpen { .. }
            | ProxyError::ShuttingDown
    )
}

/// Unix milliseconds as RFC 3339 (UTC, to the millisecond).
fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}
