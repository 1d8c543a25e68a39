//! The job runner: one item of some job waiting in the background lane at a time, taken
//! round-robin across client ids (oldest job first within one), and each answer recorded.

use std::sync::Arc;

use tokio::sync::{oneshot, watch};

use super::model::{ItemResult, JobId, JobState};
use super::{Jobs, passes};
use crate::lookup::pacing::PacingMode;
use crate::lookup::scheduler::{JobAnswer, JobItem};
use crate::lookup::validation::ClientId;
use crate::store::JobWrite;

impl Jobs {
    /// Keeps one job item waiting in the background lane, round-robin across client ids, and
    /// in shared mode this replica's part of the fleet's jobs (`fleet.rs`). Runs until
    /// aborted.
    pub(crate) async fn run(self: Arc<Self>) {
        match self.fleet.clone() {
            Some(fleet) => {
                tokio::join!(self.clone().feed(), self.fleet_loop(fleet));
            }
            None => self.feed().await,
        }
    }

    /// Whether an item may be started: in shared mode, only while Redis takes its result
    /// (the fleet loop wakes the runner when it is back).
    fn may_start(&self) -> bool {
        self.fleet
            .as_ref()
            .is_none_or(|f| f.mode() == PacingMode::Shared)
    }

    async fn feed(self: Arc<Self>) {
        loop {
            let moved = self.scheduler.lane_moved();
            let woken = self.wake.notified();
            tokio::pin!(moved, woken);
            moved.as_mut().enable();
            woken.as_mut().enable();
            if self.may_start()
                && !self.scheduler.job_waiting()
                && let Some((id, index, key, cancelled, write)) = self.next_item()
            {
                self.persist(write).await;
                let (deliver, answer) = oneshot::channel();
                self.scheduler.job_lookup(&key, deliver);
                tokio::spawn(self.clone().follow_item(id, index, answer, cancelled));
                continue;
            }
            tokio::select! {
                () = moved => {}
                () = woken => {}
            }
        }
    }

    /// The next item to ask for: the client after the last one served that has an item to
    /// ask for, its oldest such job, that job's next item.
    #[allow(clippy::type_complexity)]
    fn next_item(
        &self,
    ) -> Option<(
        JobId,
        usize,
        JobItem,
        watch::Receiver<bool>,
        Option<JobWrite>,
    )> {
        let mut book = self.lock();
        let mut clients: Vec<&ClientId> = book
            .jobs
            .values()
            .filter(|j| j.open() && !j.todo.is_empty())
            .map(|j| &j.client)
            .collect();
        clients.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        clients.dedup();
        let client = match &book.last_client {
            Some(last) => clients
                .iter()
                .find(|c| c.as_str() > last.as_str())
                .or(clients.first()),
            None => clients.first(),
        }
        .map(|c| (*c).clone())?;
        let id = book
            .jobs
            .values()
            .filter(|j| j.client == client && j.open() && !j.todo.is_empty())
            .min_by_key(|j| (j.record.created_ms, j.id))
            .map(|j| j.id)?;
        book.last_client = Some(client);
        let retention = self.config.retention;
        let job = book.jobs.get_mut(&id)?;
        let index = job.todo.pop_front()?;
        job.in_flight += 1;
        let write = job.record.started_ms.is_none().then(|| {
            job.record.started_ms = Some(crate::store::now_ms());
            self.record_write_with(job, retention)
        });
        // A job's state is kept whole: no other lock is taken while this one is held.
        let item = JobItem {
            key: job.items[index].key.clone()?,
            job_id: id.to_string(),
            index,
            link: job.record.submitted,
        };
        Some((id, index, item, job.cancelled.subscribe(), write.flatten()))
    }

    /// Publishes the oldest open job's age and place in line: the lookups that start before
    /// its next item (callers' lookups waiting, background lookups ahead of it in the lane or
    /// queued, and one item for each other client the round-robin serves first). 0 when it
    /// has no item left to ask for. Two locks, one after the other, never both.
    pub(super) fn publish_oldest(&self) {
        let (created_ms, clients_ahead) = {
            let book = self.lock();
            let Some(oldest) = book
                .jobs
                .values()
                .filter(|j| j.open())
                .min_by_key(|j| (j.record.created_ms, j.id))
            else {
                drop(book);
                self.metrics.set_job_oldest(None, 0);
                return;
            };
            // The round-robin serves the clients after the last one served, in order,
            // wrapping around: those before the oldest job's client in that order go first.
            let turn = |c: &ClientId| {
                let served = book
                    .last_client
                    .as_ref()
                    .is_some_and(|last| c.as_str() <= last.as_str());
                (served, c.as_str().to_owned())
            };
            let mine = turn(&oldest.client);
            let mut ahead: Vec<&ClientId> = book
                .jobs
                .values()
                .filter(|j| j.open() && !j.todo.is_empty() && j.client != oldest.client)
                .map(|j| &j.client)
                .filter(|c| turn(c) < mine)
                .collect();
            ahead.sort_by(|a, b| a.as_str().cmp(b.as_str()));
            ahead.dedup();
            let waiting = !oldest.todo.is_empty();
            (oldest.record.created_ms, waiting.then_some(ahead.len()))
        };
        let position = clients_ahead.map_or(0, |n| n + self.scheduler.lookups_before_job_item());
        self.metrics.set_job_oldest(Some(created_ms), position);
    }

    /// Waits for an item's answer (or the job's cancellation) and records it.
    async fn follow_item(
        self: Arc<Self>,
        id: JobId,
        index: usize,
        answer: oneshot::Receiver<JobAnswer>,
        mut cancelled: watch::Receiver<bool>,
    ) {
        // The item is in the lane now: the oldest job's place in line moved.
        self.publish_oldest();
        let answer = tokio::select! {
            answer = answer => answer,
            _ = cancelled.wait_for(|c| *c) => return,
        };
        let result = match answer.map(|a| (a.result, a.from_cache)) {
            // From the cache when the item's turn came: no call was made for it.
            Ok((Ok(score), from_cache)) => ItemResult::ok(&score.body, from_cache),
            Ok((Err(e), _)) if !passes(&e) => {
                ItemResult::failed(e.status().as_u16(), e.kind(), &e.to_string())
            }
            // Asked for again (after a restart, if the proxy is closing).
            Ok((Err(_), _)) | Err(_) => {
                if let Some(job) = self.lock().jobs.get_mut(&id) {
                    job.in_flight -= 1;
                    job.todo.push_front(index);
                }
                self.wake.notify_one();
                return;
            }
        };
        let writes = {
            let mut book = self.lock();
            let Some(job) = book.jobs.get_mut(&id) else {
                return;
            };
            job.in_flight -= 1;
            let set = job.answer(index, &result);
            self.metrics.job_items(result.is_ok(), set.len() as u64);
            let record = serde_json::to_vec(&result).expect("a result serializes");
            let results = JobWrite::Results {
                id: id.0,
                items: set.iter().map(|&i| (i as u32, record.clone())).collect(),
            };
            let end = (job.state() == JobState::Done).then(|| {
                job.record.finished_ms = Some(crate::store::now_ms());
                tracing::info!(job = %id, total = job.items.len(), failed = job.failed, "bulk job done");
                self.record_write(job)
            });
            [Some(results), end.flatten()]
        };
        for write in writes {
            self.persist(write).await;
        }
        self.publish();
    }
}
