//! The store's one writer: a thread of its own that seals answers and commits them in
//! batches, and expires old rows between batches.
//!
//! The request path only hands an answer to a bounded channel (`try_send`: never a wait; a
//! full queue drops the answer and counts it, since the memory tier still has it). The
//! thread takes the first waiting answer, everything queued behind it (up to a batch), and
//! commits them in one transaction: one fsync for the batch, so the writer keeps up with
//! any rate the upstream budget can buy, and an answer is on disk one commit after it
//! arrived (the window a `kill -9` can lose; `score_proxy_store_writes_total` counts only
//! committed records).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TryRecvError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use redb::Database;

use super::file::{self, Row};
use super::seal::Sealer;
use super::{StoreErrorKind, StoreOp, now_ms};
use crate::lookup::validation::LookupKey;
use crate::telemetry::metrics::Metrics;

/// Most answers committed in one transaction.
const BATCH_MAX: usize = 512;
/// How often rows past the TTL and stale window are deleted.
pub(crate) const EXPIRE_EVERY: Duration = Duration::from_secs(60);

/// What the writer is sent.
pub(crate) enum Msg {
    Put(Pending),
    /// A bulk job's record or results (see `jobs.rs`).
    Job(super::jobs::JobWrite),
    /// Commit what is queued, then stop and say so.
    Close(SyncSender<()>),
}

/// An answer on its way to disk (sealed on the writer's thread, not the caller's).
pub(crate) struct Pending {
    pub(crate) key: LookupKey,
    pub(crate) body: Bytes,
    pub(crate) fetched_ms: u64,
}

/// What the writer needs besides its queue.
pub(crate) struct Writer {
    pub(crate) db: Database,
    pub(crate) path: PathBuf,
    pub(crate) sealer: Sealer,
    pub(crate) metrics: Arc<Metrics>,
    /// TTL plus stale window, in milliseconds: rows older than this are deleted.
    pub(crate) keep_ms: u64,
    pub(crate) max_rows: u64,
}

impl Writer {
    /// Runs until told to close or every sender is gone. A panic inside redb (a debug
    /// assertion on a file altered under it) stops the writer: the store is then off, and
    /// every later answer is counted as dropped.
    pub(crate) fn run(mut self, rx: Receiver<Msg>) {
        let mut next_expiry = Instant::now() + EXPIRE_EVERY;
        loop {
            let wait = next_expiry.saturating_duration_since(Instant::now());
            let first = match rx.recv_timeout(wait) {
                Ok(msg) => msg,
                Err(RecvTimeoutError::Timeout) => {
                    if !self.guarded(StoreOp::Expire, |w| w.expire()) {
                        return;
                    }
                    next_expiry = Instant::now() + EXPIRE_EVERY;
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => return,
            };
            let mut batch = Vec::new();
            let mut jobs = Vec::new();
            let mut close = None;
            match first {
                Msg::Put(p) => batch.push(p),
                Msg::Job(j) => jobs.push(j),
                Msg::Close(ack) => close = Some(ack),
            }
            while close.is_none() && batch.len() < BATCH_MAX && jobs.len() < BATCH_MAX {
                match rx.try_recv() {
                    Ok(Msg::Put(p)) => batch.push(p),
                    Ok(Msg::Job(j)) => jobs.push(j),
                    Ok(Msg::Close(ack)) => close = Some(ack),
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                }
            }
            let mut alive = batch.is_empty() || self.guarded(StoreOp::Write, |w| w.commit(&batch));
            for job in jobs {
                let mut committed = false;
                alive = alive
                    && self.guarded(StoreOp::Write, |w| {
                        super::jobs::write(&w.db, &w.sealer, &job)?;
                        committed = true;
                        Ok(())
                    });
                if let super::jobs::JobWrite::Job {
                    committed: Some(ack),
                    ..
                } = job
                {
                    let _ = ack.send(committed);
                }
            }
            if let Some(ack) = close {
                let _ = ack.send(());
                return;
            }
            if !alive {
                return;
            }
        }
    }

    /// Runs `step`, counting its error; `false` when redb panicked (the writer stops).
    fn guarded(
        &mut self,
        op: StoreOp,
        step: impl FnOnce(&mut Self) -> Result<(), redb::Error>,
    ) -> bool {
        match catch_unwind(AssertUnwindSafe(|| step(self))) {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                tracing::warn!(op = <&str>::from(op), error = %e, "persistent cache: operation failed");
                self.metrics.store_error(op, StoreErrorKind::of(&e));
                true
            }
            Err(_) => {
                tracing::error!(
                    op = <&str>::from(op),
                    "persistent cache: the store failed inside redb; persistence is off until restart"
                );
                self.metrics.store_error(op, StoreErrorKind::Panic);
                self.metrics.store_enabled(false);
                false
            }
        }
    }

    fn commit(&mut self, batch: &[Pending]) -> Result<(), redb::Error> {
        let mut rows = Vec::with_capacity(batch.len());
        for p in batch {
            let key = self.sealer.row_key(&p.key);
            rows.push(Row {
                record: self.sealer.seal(&key, p.fetched_ms, &p.key, &p.body)?,
                key,
            });
        }
        let stored = file::write(&self.db, &rows)?;
        self.metrics.store_written(rows.len() as u64);
        self.metrics.store_size(self.file_bytes(), stored);
        Ok(())
    }

    /// Deletes expired rows and the oldest beyond the bound; gives the space back to the
    /// file system when a quarter or more of the rows went.
    fn expire(&mut self) -> Result<(), redb::Error> {
        let jobs = super::jobs::expire(&self.db, now_ms())?;
        if jobs > 0 {
            tracing::debug!(jobs, "persistent cache: jobs past their retention deleted");
        }
        let removed = file::expire(&self.db, now_ms(), self.keep_ms, self.max_rows)?;
        let left = file::rows(&self.db)?;
        if removed > 0 && removed >= left / 4 {
            self.db
                .compact()
                .map_err(|e| redb::Error::from(std::io::Error::other(e.to_string())))?;
        }
        tracing::debug!(removed, left, "persistent cache: expired rows deleted");
        self.metrics.store_size(self.file_bytes(), left);
        Ok(())
    }

    fn file_bytes(&self) -> u64 {
        std::fs::metadata(&self.path).map_or(0, |m| m.len())
    }
}
