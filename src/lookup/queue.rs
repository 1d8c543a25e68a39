//! Stage 3: where a lookup waits for upstream budget, and the rules for being let in.
//!
//! [`FairQueue`] is a plain data structure (the scheduler wraps it in its lock). It holds at
//! most `capacity` distinct lookups and orders them by start-time fair queueing over client
//! ids: each job gets a tag `max(virtual_time, client's last tag) + 1`, jobs run in tag order,
//! and `virtual_time` advances to the tag of each job that starts. A client with one lookup
//! therefore waits at most one "round" behind a client that queued twenty.
//!
//! Admission is honest: a job is let in only if it can start before its deadline *and* every
//! job it overtakes still can. The prediction is exact: the starts booked with the pacer for
//! the waiting jobs (start slots), earliest first, are handed out in queue order, so the job
//! at position `p` starts at the `p`-th booked start slot. A job's place in that order is its
//! queue order key (tag, retry or first attempt, arrival), not a start slot: the two only meet
//! when jobs are popped, in key order, one per start slot.
//!
//! Background work (a stale-while-revalidate or refresh-ahead refresh) waits in a second band
//! behind every lookup a caller waits for: it is admitted at the back, never counts against
//! `capacity`, and a caller's admission neither checks nor keeps its deadline (a refresh
//! pushed past its deadline is dropped, not a caller refused). A lookup therefore never waits
//! behind background work that has not started.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use tokio::time::Instant;

use crate::lookup::validation::ClientId;

/// Identifies a queued job (for cancellation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct JobId(u64);

impl JobId {
    /// For storage in an atomic (the scheduler keeps a flight's job id in one).
    pub(crate) fn raw(self) -> u64 {
        self.0
    }

    pub(crate) fn from_raw(raw: u64) -> Self {
        JobId(raw)
    }
}

/// The booked starts, as admission sees them.
#[derive(Clone, Debug)]
pub(crate) struct Schedule {
    pub(crate) now: Instant,
    /// Start slots booked for the waiting jobs, earliest first: position `p` starts at
    /// `slots[p]`.
    pub(crate) slots: Vec<Instant>,
    /// Spacing used beyond the booked start slots (while more are being booked).
    pub(crate) interval: Duration,
}

impl Schedule {
    /// Evenly spaced start slots from `first`: what a single process's pacer books (the
    /// queue's own tests plan against it).
    #[cfg(test)]
    pub(crate) fn uniform(
        now: Instant,
        first: Instant,
        interval: Duration,
        count: usize,
    ) -> Schedule {
        Schedule {
            now,
            slots: (0..count).map(|i| first + interval * i as u32).collect(),
            interval,
        }
    }

    /// When the job at `position` starts.
    pub(crate) fn start_at(&self, position: usize) -> Instant {
        match self.slots.get(position) {
            Some(&slot) => slot,
            None => {
                let (base, extra) = match self.slots.last() {
                    Some(&last) => (last, position + 1 - self.slots.len()),
                    None => (self.now, position),
                };
                base + self.interval * extra as u32
            }
        }
    }
}

/// Why admission said no.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// `capacity` jobs already wait. `retry_after`: until the head starts and frees a place.
    Full { retry_after: Duration },
    /// Cannot start before its deadline. `retry_after`: by how much it would miss it, which is
    /// about how long the queue needs to shrink enough.
    Deadline { retry_after: Duration },
    /// The queue is closed (shutdown).
    Closed,
}

/// The queue order key, a job's virtual-time position: band (callers' lookups before
/// background work), tag, then retries before first attempts, then arrival.
type OrderKey = (u8, u64, u8, u64);
const INTERACTIVE: u8 = 0;
const BACKGROUND: u8 = 1;
const RETRY: u8 = 0;
const FIRST: u8 = 1;
/// The first key of the background band: every interactive key sorts before it.
const BACKGROUND_START: OrderKey = (BACKGROUND, 0, 0, 0);

struct Entry<T> {
    client: ClientId,
    deadline: Instant,
    job: T,
}

pub(crate) struct FairQueue<T> {
    capacity: usize,
    order: BTreeMap<OrderKey, Entry<T>>,
    /// Each waiting job's order key, to find it again when its client leaves.
    keys: HashMap<JobId, OrderKey>,
    /// Per client: tag of its newest queued job and how many it has queued.
    clients: HashMap<ClientId, (u64, usize)>,
    virtual_time: u64,
    next_seq: u64,
    /// Jobs in the background band.
    background: usize,
    closed: bool,
}

impl<T> FairQueue<T> {
    pub(crate) fn new(capacity: usize) -> Self {
        FairQueue {
            capacity,
            order: BTreeMap::new(),
            keys: HashMap::new(),
            clients: HashMap::new(),
            virtual_time: 0,
            next_seq: 0,
            background: 0,
            closed: false,
        }
    }

    /// Every queued job, background work included (each needs a start slot).
    pub(crate) fn len(&self) -> usize {
        self.order.len()
    }

    /// Jobs a caller waits for (what `capacity` bounds, and the depth operators see).
    pub(crate) fn interactive_len(&self) -> usize {
        self.order.len() - self.background
    }

    /// Background jobs waiting.
    #[cfg(test)]
    pub(crate) fn background_len(&self) -> usize {
        self.background
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// The earliest deadline among queued jobs (when the next sweep is due).
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.order.values().map(|e| e.deadline).min()
    }

    /// Every queued job, in no particular order.
    pub(crate) fn jobs(&self) -> impl Iterator<Item = &T> {
        self.order.values().map(|e| &e.job)
    }

    /// The latest deadline among queued jobs (how far ahead a top-up booking may go).
    pub(crate) fn latest_deadline(&self) -> Option<Instant> {
        self.order.values().map(|e| e.deadline).max()
    }

    /// Lets a new job in, or says why not. On success returns its id and the position it
    /// entered at (0 = next to start).
    pub(crate) fn admit(
        &mut self,
        client: &ClientId,
        deadline: Instant,
        job: T,
        schedule: &Schedule,
    ) -> Result<(JobId, usize), (Refusal, T)> {
        if self.closed {
            return Err((Refusal::Closed, job));
        }
        if self.interactive_len() >= self.capacity {
            let retry_after = schedule.start_at(0).saturating_duration_since(schedule.now);
            return Err((Refusal::Full { retry_after }, job));
        }
        let last_tag = self.clients.get(client).map_or(0, |&(tag, _)| tag);
        let fair_tag = self.virtual_time.max(last_tag) + 1;
        let seq = self.next_seq;
        let fair_key = (INTERACTIVE, fair_tag, FIRST, seq);
        let fair_position = self.order.range(..fair_key).count();

        let key = if self.fits(fair_position, deadline, schedule) {
            fair_key
        } else {
            // Taking its fair place would make someone miss their deadline, or itself: try
            // the back of the queue, which overtakes nobody.
            let tail_position = self.interactive_len();
            let tail_start = schedule.start_at(tail_position);
            if tail_position == fair_position || tail_start > deadline {
                let start = schedule.start_at(fair_position);
                let retry_after = start.saturating_duration_since(deadline);
                return Err((Refusal::Deadline { retry_after }, job));
            }
            let tail_tag = self
                .order
                .range(..BACKGROUND_START)
                .next_back()
                .map_or(fair_tag, |(k, _)| k.1);
            (INTERACTIVE, tail_tag.max(fair_tag), FIRST, seq)
        };

        self.next_seq += 1;
        let id = JobId(seq);
        let position = self.order.range(..key).count();
        let client_state = self.clients.entry(client.clone()).or_insert((0, 0));
        client_state.0 = client_state.0.max(key.1);
        client_state.1 += 1;
        self.place(id, key, client, deadline, job);
        Ok((id, position))
    }

    /// Lets background work in at the back of the background band, if it can start before
    /// its deadline there. Not bounded by `capacity`, and no caller's lookup ever waits
    /// behind it.
    pub(crate) fn admit_background(
        &mut self,
        client: &ClientId,
        deadline: Instant,
        job: T,
        schedule: &Schedule,
    ) -> Result<(JobId, usize), (Refusal, T)> {
        if self.closed {
            return Err((Refusal::Closed, job));
        }
        let position = self.order.len();
        let start = schedule.start_at(position);
        if start > deadline {
            let retry_after = start.saturating_duration_since(deadline);
            return Err((Refusal::Deadline { retry_after }, job));
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let id = JobId(seq);
        self.clients.entry(client.clone()).or_insert((0, 0)).1 += 1;
        self.background += 1;
        self.place(id, (BACKGROUND, 0, FIRST, seq), client, deadline, job);
        Ok((id, position))
    }

    /// Puts a job at its queue order key (a first attempt or a retry alike).
    fn place(&mut self, id: JobId, key: OrderKey, client: &ClientId, deadline: Instant, job: T) {
        self.keys.insert(id, key);
        self.order.insert(
            key,
            Entry {
                client: client.clone(),
                deadline,
                job,
            },
        );
    }

    /// Whether a job entering at `position` meets `deadline` and every caller's job behind it
    /// (pushed back by one place) still meets its own. Background work is not asked.
    fn fits(&self, position: usize, deadline: Instant, schedule: &Schedule) -> bool {
        schedule.start_at(position) <= deadline
            && self
                .order
                .range(..BACKGROUND_START)
                .map(|(_, e)| e)
                .enumerate()
                .skip(position)
                .all(|(i, e)| schedule.start_at(i + 1) <= e.deadline)
    }

    /// Puts back a job whose upstream call was refused with a penalty, ahead of every first
    /// attempt, if it can still start before its deadline. Not bounded by `capacity`: it held
    /// a place before it started. Returns the job back if it cannot make it.
    pub(crate) fn requeue_front(
        &mut self,
        client: &ClientId,
        deadline: Instant,
        job: T,
        schedule: &Schedule,
    ) -> Result<JobId, (Refusal, T)> {
        if self.closed {
            return Err((Refusal::Closed, job));
        }
        let start = schedule.start_at(0);
        if start > deadline {
            let retry_after = start.saturating_duration_since(deadline);
            return Err((Refusal::Deadline { retry_after }, job));
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let key = (INTERACTIVE, self.virtual_time, RETRY, seq);
        let id = JobId(seq);
        let client_state = self.clients.entry(client.clone()).or_insert((0, 0));
        client_state.1 += 1;
        self.place(id, key, client, deadline, job);
        Ok(id)
    }

    /// Takes the next job to start, advancing virtual time.
    pub(crate) fn pop(&mut self) -> Option<(JobId, T)> {
        let (key, entry) = self.order.pop_first()?;
        if key.0 == INTERACTIVE {
            self.virtual_time = self.virtual_time.max(key.1);
        }
        Some(self.taken(key, entry))
    }

    /// The bookkeeping of a job leaving the order (started, removed, expired).
    fn taken(&mut self, key: OrderKey, entry: Entry<T>) -> (JobId, T) {
        let id = JobId(key.3);
        self.keys.remove(&id);
        if key.0 == BACKGROUND {
            self.background -= 1;
        }
        self.forget(&entry.client);
        (id, entry.job)
    }

    /// Takes the job that would start last (when the schedule has no start slot left for it).
    pub(crate) fn pop_last(&mut self) -> Option<(JobId, T)> {
        let (key, entry) = self.order.pop_last()?;
        Some(self.taken(key, entry))
    }

    /// Removes a job that is still waiting (its client left). `None` if it already started.
    pub(crate) fn remove(&mut self, id: JobId) -> Option<T> {
        let key = *self.keys.get(&id)?;
        let entry = self.order.remove(&key)?;
        Some(self.taken(key, entry).1)
    }

    fn forget(&mut self, client: &ClientId) {
        if let Some(state) = self.clients.get_mut(client) {
            state.1 -= 1;
            if state.1 == 0 {
                self.clients.remove(client);
            }
        }
    }

    /// Removes every job that can no longer start before its deadline under `schedule` (after
    /// a penalty moved the schedule out, or when calls took longer than predicted), and
    /// returns them with the refusal to answer them with.
    pub(crate) fn expire(&mut self, schedule: &Schedule) -> Vec<(T, Refusal)> {
        let mut doomed = Vec::new();
        let mut position = 0;
        for (key, entry) in &self.order {
            let start = schedule.start_at(position);
            if start > entry.deadline {
                let retry_after = start.saturating_duration_since(entry.deadline);
                doomed.push((*key, retry_after));
            } else {
                position += 1;
            }
        }
        doomed
            .into_iter()
            .filter_map(|(key, retry_after)| {
                let entry = self.order.remove(&key)?;
                let (_, job) = self.taken(key, entry);
                Some((job, Refusal::Deadline { retry_after }))
            })
            .collect()
    }

    /// Refuses all further admissions and hands back every waiting job (shutdown).
    pub(crate) fn close(&mut self) -> Vec<T> {
        self.closed = true;
        self.keys.clear();
        self.clients.clear();
        self.background = 0;
        std::mem::take(&mut self.order)
            .into_values()
            .map(|e| e.job)
            .collect()
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed
    }
}

/// Why the queue turned a lookup away (or dropped it before it started); the `reason` label
/// is the variant's name in snake case.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, strum::IntoStaticStr, strum::VariantArray)]
#[strum(serialize_all = "snake_case")]
pub(crate) enum QueueRefusal {
    /// At capacity.
    Full,
    /// Could not start before its deadline (predicted at admission).
    Deadline,
    /// Admitted, then an upstream penalty or slow calls pushed it past its deadline.
    Expired,
    /// The proxy is shutting down.
    Shutdown,
    /// The circuit breaker is open (refused at admission, or queued when it opened).
    CircuitOpen,
}

#[cfg(test)]
mod tests;
