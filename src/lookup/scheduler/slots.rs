//! The booked start slots: the instants, booked with the [`Pacer`], at which this process may
//! start an upstream call, and the bookings still under way.
//!
//! Every lookup admitted to the queue needs one start slot, and gets exactly one: admission
//! books it (or takes a spare), and the queue's position `p` starts at the `p`-th slot,
//! earliest first. A slot whose lookup left stays booked as a spare: the next lookup admitted
//! takes it instead of booking, or it passes unused. When slots are lost (they passed unused
//! while lookups waited, or a penalty voided them), [`Scheduler::replenish`] books the
//! deficit again, each top-up on a task of its own, and answers at once a lookup that no
//! slot before its deadline can serve.
//!
//! In one process the pacer answers at once, so admission books under the scheduler's lock
//! ([`Scheduler::book_at_once`]); only shared mode, whose pacer asks Redis, books on a task.
//!
//! [`Pacer`]: crate::lookup::pacing::Pacer

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::{Flight, Scheduler, State};
use crate::lookup::pacing::{BookError, SlotUnused};
use crate::lookup::queue::QueueRefusal;

/// The start slots booked for this process and not used yet, earliest first, and how many
/// bookings are under way (each will add one).
#[derive(Default)]
pub(super) struct StartSlots {
    booked: VecDeque<Instant>,
    /// Bookings under way: each will add one slot.
    pub(super) booking: usize,
}

impl StartSlots {
    pub(super) fn len(&self) -> usize {
        self.booked.len()
    }

    /// Whether a slot is booked beyond those the `queued` lookups take (its lookup left).
    pub(super) fn has_spare(&self, queued: usize) -> bool {
        self.booked.len() > queued
    }

    /// The booked slots at or after `earliest` (the end of a penalty, or now), earliest first.
    pub(super) fn at_or_after(&self, earliest: Instant) -> Vec<Instant> {
        self.booked
            .iter()
            .copied()
            .filter(|&s| s >= earliest)
            .collect()
    }

    pub(super) fn insert(&mut self, slot: Instant) {
        let at = self.booked.partition_point(|&s| s <= slot);
        self.booked.insert(at, slot);
    }

    /// Slots `queued` lookups are short of, counting bookings already under way.
    fn deficit(&self, queued: usize) -> usize {
        queued.saturating_sub(self.booked.len() + self.booking)
    }

    /// Drops slots too far in the past to be used (see [`Pacer::late_tolerance`]); returns
    /// how many.
    ///
    /// [`Pacer::late_tolerance`]: crate::lookup::pacing::Pacer::late_tolerance
    fn prune(&mut self, now: Instant, tolerance: Option<Duration>) -> usize {
        let Some(tolerance) = tolerance else {
            return 0;
        };
        let stale = self.booked.partition_point(|&s| s + tolerance < now);
        self.booked.drain(..stale);
        stale
    }
}

impl Scheduler {
    /// Books `flight`'s start slot under the scheduler's lock, if the pacer can answer at
    /// once (one process); `None` means it cannot and the booking goes on a task.
    pub(super) fn book_at_once(
        &self,
        flight: &Flight,
        now: Instant,
    ) -> Option<Result<Instant, BookError>> {
        let booking_span = if flight.origin.traced() {
            tracing::info_span!(
                parent: &flight.origin.span,
                "pacing.permit",
                score_proxy.pacing.slot_in_seconds = tracing::field::Empty,
            )
        } else {
            tracing::Span::none()
        };
        let booked = booking_span.in_scope(|| {
            self.pacer
                .book_at_once(flight.deadline, self.queue_capacity)
        });
        if let Some(Ok(slot)) = &booked {
            booking_span.record(
                "score_proxy.pacing.slot_in_seconds",
                slot.saturating_duration_since(now).as_secs_f64(),
            );
        }
        booked
    }

    /// Drops stale slots, counting each as a slot that passed unused.
    pub(super) fn prune(&self, state: &mut State, now: Instant) {
        let pruned = state.slots.prune(now, self.pacer.late_tolerance());
        let why = if state.queue.is_empty() {
            SlotUnused::NoLookup
        } else {
            SlotUnused::Late
        };
        for _ in 0..pruned {
            self.metrics.unused_slot(why);
        }
        if pruned > 0 {
            tracing::debug!(pruned, ?why, "stale slots dropped");
        }
    }

    /// The earliest booked start slot, if anyone waits for one.
    pub(crate) fn next_slot(&self) -> Option<Instant> {
        let state = self.lock();
        if state.queue.is_empty() {
            None
        } else {
            state.slots.booked.front().copied()
        }
    }

    /// Takes the start slots that are due at `now`. Returns the one to use, if one is recent
    /// enough (a dispatcher that woke late can use only one; a slot used later than the
    /// pacer's tolerance could crowd the next slot, which may be another replica's), and how
    /// many were taken in all.
    pub(crate) fn take_due_slots(&self, now: Instant) -> (Option<Instant>, usize) {
        let mut state = self.lock();
        let due = state.slots.booked.partition_point(|&s| s <= now);
        let usable = state.slots.booked.drain(..due).next_back().filter(|&slot| {
            self.pacer
                .late_tolerance()
                .is_none_or(|tolerance| now <= slot + tolerance)
        });
        (usable, due)
    }

    /// Books the start slots the queue is short of (after slots passed unused while lookups
    /// waited, or a penalty voided them), each on a task of its own.
    pub(crate) fn replenish(self: &Arc<Self>) {
        let deficit = {
            let mut state = self.lock();
            let deficit = state.slots.deficit(state.queue.len());
            state.slots.booking += deficit;
            deficit
        };
        for _ in 0..deficit {
            tokio::spawn(self.clone().top_up());
        }
    }

    /// Books one more start slot for lookups already admitted, then answers anyone the new
    /// schedule leaves past their deadline.
    async fn top_up(self: Arc<Self>) {
        let not_after = {
            let mut state = self.lock();
            // The queue may have shrunk since the deficit was counted (a penalty's sweep
            // answered lookups, clients left): book only what the start slots and the other
            // bookings under way do not cover.
            state.slots.booking -= 1;
            if state.slots.deficit(state.queue.len()) == 0 {
                return;
            }
            state.slots.booking += 1;
            state.queue.latest_deadline()
        };
        let booked = match not_after {
            // Admitted lookups already hold their place: no capacity limit for them.
            Some(not_after) => Some(self.pacer.book(not_after, usize::MAX).await),
            None => None,
        };
        let now = Instant::now();
        let mut state = self.lock();
        state.slots.booking -= 1;
        let unserved = match booked {
            Some(Ok(slot)) => {
                state.slots.insert(slot);
                None
            }
            // No slot before the latest deadline: if the queue is still short of one, the
            // last lookup in it (the one this slot was for) cannot be served in time; say so
            // now. If it no longer is (lookups left while this booked), nobody is.
            Some(Err(BookError::TooLate { by })) if state.slots.deficit(state.queue.len()) > 0 => {
                state.queue.pop_last().map(|(_, flight)| (flight, by))
            }
            Some(Err(BookError::TooLate { .. })) => None,
            Some(Err(BookError::Full { .. })) | None => None,
        };
        if let Some((flight, _)) = &unserved {
            flight.clear_job();
            self.unregister(&mut state, flight);
            self.set_depth(state.queue.interactive_len());
        }
        drop(state);
        if let Some((flight, by)) = unserved {
            self.metrics.queue_refused(QueueRefusal::Expired);
            flight.complete(Err(self.missed_deadline(now, by)));
        }
        self.expire();
        self.changed.notify_one();
    }

    /// An upstream penalty: the start slots booked inside it are void.
    pub(crate) fn void_slots_before(&self, until: Instant) {
        let mut state = self.lock();
        let void = state.slots.booked.partition_point(|&s| s < until);
        state.slots.booked.drain(..void);
        drop(state);
        self.changed.notify_one();
    }

    /// Start slots booked and not used yet.
    pub(crate) fn booked_slots(&self) -> usize {
        self.lock().slots.len()
    }
}
