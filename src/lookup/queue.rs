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

/// The queue order key, a job's virtual-time position: tag, then retries before first
/// attempts, then arrival.
type OrderKey = (u64, u8, u64);
const RETRY: u8 = 0;
const FIRST: u8 = 1;

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
            closed: false,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.order.len()
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
        if self.order.len() >= self.capacity {
            let retry_after = schedule.start_at(0).saturating_duration_since(schedule.now);
            return Err((Refusal::Full { retry_after }, job));
        }
        let last_tag = self.clients.get(client).map_or(0, |&(tag, _)| tag);
        let fair_tag = self.virtual_time.max(last_tag) + 1;
        let seq = self.next_seq;
        let fair_key = (fair_tag, FIRST, seq);
        let fair_position = self.order.range(..fair_key).count();

        let key = if self.fits(fair_position, deadline, schedule) {
            fair_key
        } else {
            // Taking its fair place would make someone miss their deadline, or itself: try
            // the back of the queue, which overtakes nobody.
            let tail_position = self.order.len();
            let tail_start = schedule.start_at(tail_position);
            if tail_position == fair_position || tail_start > deadline {
                let start = schedule.start_at(fair_position);
                let retry_after = start.saturating_duration_since(deadline);
                return Err((Refusal::Deadline { retry_after }, job));
            }
            let tail_tag = self.order.keys().next_back().map_or(fair_tag, |s| s.0);
            (tail_tag.max(fair_tag), FIRST, seq)
        };

        self.next_seq += 1;
        let id = JobId(seq);
        let position = self.order.range(..key).count();
        let client_state = self.clients.entry(client.clone()).or_insert((0, 0));
        client_state.0 = client_state.0.max(key.0);
        client_state.1 += 1;
        self.place(id, key, client, deadline, job);
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

    /// Whether a job entering at `position` meets `deadline` and every job behind it (pushed
    /// back by one place) still meets its own.
    fn fits(&self, position: usize, deadline: Instant, schedule: &Schedule) -> bool {
        schedule.start_at(position) <= deadline
            && self
                .order
                .values()
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
        let key = (self.virtual_time, RETRY, seq);
        let id = JobId(seq);
        let client_state = self.clients.entry(client.clone()).or_insert((0, 0));
        client_state.1 += 1;
        self.place(id, key, client, deadline, job);
        Ok(id)
    }

    /// Takes the next job to start, advancing virtual time.
    pub(crate) fn pop(&mut self) -> Option<(JobId, T)> {
        let (key, entry) = self.order.pop_first()?;
        self.virtual_time = self.virtual_time.max(key.0);
        let id = JobId(key.2);
        self.keys.remove(&id);
        self.forget(&entry.client);
        Some((id, entry.job))
    }

    /// Takes the job that would start last (when the schedule has no start slot left for it).
    pub(crate) fn pop_last(&mut self) -> Option<(JobId, T)> {
        let (key, entry) = self.order.pop_last()?;
        let id = JobId(key.2);
        self.keys.remove(&id);
        self.forget(&entry.client);
        Some((id, entry.job))
    }

    /// Removes a job that is still waiting (its client left). `None` if it already started.
    pub(crate) fn remove(&mut self, id: JobId) -> Option<T> {
        let key = self.keys.remove(&id)?;
        let entry = self.order.remove(&key)?;
        self.forget(&entry.client);
        Some(entry.job)
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
                self.keys.remove(&JobId(key.2));
                self.forget(&entry.client);
                Some((entry.job, Refusal::Deadline { retry_after }))
            })
            .collect()
    }

    /// Refuses all further admissions and hands back every waiting job (shutdown).
    pub(crate) fn close(&mut self) -> Vec<T> {
        self.closed = true;
        self.keys.clear();
        self.clients.clear();
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
mod tests {
    use super::*;

    fn client(s: &str) -> ClientId {
        ClientId::parse(s).unwrap()
    }

    /// Plenty of evenly spaced slots from now.
    fn schedule(interval_ms: u64) -> Schedule {
        let now = Instant::now();
        Schedule::uniform(now, now, Duration::from_millis(interval_ms), 100)
    }

    fn far(s: &Schedule) -> Instant {
        s.now + Duration::from_secs(3600)
    }

    fn drain<T>(q: &mut FairQueue<T>) -> Vec<T> {
        std::iter::from_fn(|| q.pop().map(|(_, j)| j)).collect()
    }

    #[test]
    fn bounded_with_retry_after_until_the_head_starts() {
        let now = Instant::now();
        let s = Schedule::uniform(
            now,
            now + Duration::from_millis(700),
            Duration::from_millis(1000),
            10,
        );
        let mut q = FairQueue::new(2);
        assert!(q.admit(&client("a"), far(&s), 1, &s).is_ok());
        assert!(q.admit(&client("b"), far(&s), 2, &s).is_ok());
        let (refusal, job) = q.admit(&client("c"), far(&s), 3, &s).unwrap_err();
        assert_eq!(job, 3);
        assert_eq!(
            refusal,
            Refusal::Full {
                retry_after: Duration::from_millis(700)
            }
        );
    }

    #[test]
    fn one_clients_burst_does_not_starve_another() {
        let s = schedule(1000);
        let mut q = FairQueue::new(100);
        for i in 0..10 {
            q.admit(&client("burst"), far(&s), format!("burst{i}"), &s)
                .unwrap();
        }
        let (_, pos) = q
            .admit(&client("single"), far(&s), "single".into(), &s)
            .unwrap();
        assert_eq!(
            pos, 1,
            "the single lookup goes right after the burst's first"
        );
        let order = drain(&mut q);
        assert_eq!(order[0], "burst0");
        assert_eq!(order[1], "single");
        assert_eq!(order[2], "burst1");
    }

    #[test]
    fn round_robin_across_three_clients() {
        let s = schedule(1000);
        let mut q = FairQueue::new(100);
        for i in 0..3 {
            q.admit(&client("a"), far(&s), format!("a{i}"), &s).unwrap();
        }
        for i in 0..2 {
            q.admit(&client("b"), far(&s), format!("b{i}"), &s).unwrap();
        }
        q.admit(&client("c"), far(&s), "c0".into(), &s).unwrap();
        let first = q.pop().unwrap().1;
        assert_eq!(first, "a0");
        // Arrivals after some progress join the current round, not the front.
        q.admit(&client("d"), far(&s), "d0".into(), &s).unwrap();
        // d arrives during round 1 and is served in round 2, after the round's earlier
        // arrivals: one round behind, however many lookups the others queued.
        let rest = drain(&mut q);
        assert_eq!(rest, ["b0", "c0", "a1", "b1", "d0", "a2"]);
    }

    #[test]
    fn refuses_at_admission_what_cannot_start_in_time() {
        let s = schedule(1000);
        let mut q = FairQueue::new(100);
        let deadline = s.now + Duration::from_millis(2500);
        for i in 0..3 {
            q.admit(&client("a"), deadline, i, &s).unwrap();
        }
        // Position 3 would start at 3 s, past the 2.5 s deadline: refused, not queued.
        let (refusal, _) = q.admit(&client("a"), deadline, 3, &s).unwrap_err();
        assert_eq!(
            refusal,
            Refusal::Deadline {
                retry_after: Duration::from_millis(500)
            }
        );
        assert_eq!(q.len(), 3);
    }

    #[test]
    fn never_breaks_an_admitted_jobs_promise() {
        let s = schedule(1000);
        let mut q = FairQueue::new(100);
        let tight = s.now + Duration::from_millis(2000);
        for i in 0..3 {
            q.admit(&client("a"), tight, format!("a{i}"), &s).unwrap();
        }
        // b's fair place is position 1, which would push a2 to 3 s, past its deadline:
        // b goes to the back instead, where it still makes its own (later) deadline.
        let (_, pos) = q.admit(&client("b"), far(&s), "b0".into(), &s).unwrap();
        assert_eq!(pos, 3);
        assert_eq!(drain(&mut q), ["a0", "a1", "a2", "b0"]);
    }

    #[test]
    fn removal_and_requeue() {
        let s = schedule(1000);
        let mut q = FairQueue::new(3);
        let (a, _) = q.admit(&client("a"), far(&s), "a", &s).unwrap();
        let (b, _) = q.admit(&client("b"), far(&s), "b", &s).unwrap();
        assert_eq!(q.remove(a), Some("a"));
        assert_eq!(q.remove(a), None);
        let (popped, job) = q.pop().unwrap();
        assert_eq!((popped, job), (b, "b"));
        assert_eq!(q.remove(b), None, "a started job cannot be removed");
        q.admit(&client("c"), far(&s), "c", &s).unwrap();
        q.requeue_front(&client("b"), far(&s), "b-retry", &s)
            .unwrap();
        assert_eq!(drain(&mut q), ["b-retry", "c"]);
    }

    #[test]
    fn expire_fails_only_those_pushed_past_their_deadline() {
        let s = schedule(1000);
        let mut q = FairQueue::new(10);
        let soon = s.now + Duration::from_millis(1500);
        q.admit(&client("a"), far(&s), "a0", &s).unwrap();
        q.admit(&client("b"), soon, "b0", &s).unwrap();
        q.admit(&client("c"), far(&s), "c0", &s).unwrap();
        // A 2 s penalty moves everything out by 2 s: b0 can no longer make it.
        let later = Schedule::uniform(s.now, s.now + Duration::from_secs(2), s.interval, 3);
        let expired = q.expire(&later);
        assert_eq!(expired.len(), 1);
        assert_eq!(expired[0].0, "b0");
        assert_eq!(
            expired[0].1,
            Refusal::Deadline {
                retry_after: Duration::from_millis(1500)
            }
        );
        assert_eq!(drain(&mut q), ["a0", "c0"]);
    }

    #[test]
    fn pop_last_takes_the_job_that_would_start_last() {
        let s = schedule(1000);
        let mut q = FairQueue::new(10);
        q.admit(&client("a"), far(&s), "a0", &s).unwrap();
        q.admit(&client("a"), far(&s), "a1", &s).unwrap();
        q.admit(&client("b"), far(&s), "b0", &s).unwrap();
        assert_eq!(q.pop_last().map(|(_, j)| j), Some("a1"));
        assert_eq!(drain(&mut q), ["a0", "b0"]);
        assert_eq!(q.pop_last(), None);
    }

    #[test]
    fn uneven_slots_are_honoured_exactly() {
        // Slots booked in a shared schedule: other replicas' calls sit in between.
        let now = Instant::now();
        let ms = Duration::from_millis;
        let s = Schedule {
            now,
            slots: vec![now + ms(100), now + ms(1900)],
            interval: ms(500),
        };
        let mut q = FairQueue::new(10);
        q.admit(&client("a"), now + ms(200), "a0", &s).unwrap();
        // Position 1 starts at 1.9 s: refused for a 1.5 s deadline, though 1 × interval
        // would have said 0.5 s.
        let (refusal, _) = q.admit(&client("a"), now + ms(1500), "a1", &s).unwrap_err();
        assert_eq!(
            refusal,
            Refusal::Deadline {
                retry_after: ms(400)
            }
        );
        // Beyond the booked slots, the interval extrapolates.
        assert_eq!(s.start_at(3), now + ms(2900));
    }

    #[test]
    fn close_returns_everything_and_refuses_more() {
        let s = schedule(1000);
        let mut q = FairQueue::new(10);
        q.admit(&client("a"), far(&s), 1, &s).unwrap();
        q.admit(&client("b"), far(&s), 2, &s).unwrap();
        let mut left = q.close();
        left.sort();
        assert_eq!(left, [1, 2]);
        assert_eq!(
            q.admit(&client("a"), far(&s), 3, &s).unwrap_err().0,
            Refusal::Closed
        );
        assert!(q.is_empty());
    }
}
