//! Reading a job's results: in submission order, as far as answered, waiting for more while
//! the job runs. A job this replica runs wakes its readers as results arrive; in shared mode
//! a job another replica runs is read from Redis, polled (`fleet.rs`).

use super::model::{ItemResult, JobId};
use super::{Job, JobError, Jobs};
use crate::lookup::validation::ClientId;
use tokio::sync::watch;

/// How often a reader on another replica than the job's looks for new results.
const POLL: std::time::Duration = std::time::Duration::from_millis(500);

impl Jobs {
    /// A results reader: the lines of the job in submission order, as far as done.
    pub(crate) async fn reader(&self, id: JobId, client: &ClientId) -> Result<Reader, JobError> {
        if let Some(job) = self.lock().jobs.get(&id) {
            return if &job.client == client {
                Ok(Reader {
                    id,
                    client: client.clone(),
                    next: 0,
                    progress: Some(job.progress.subscribe()),
                })
            } else {
                Err(JobError::NotFound)
            };
        }
        // Shared mode: a job another replica runs; its results are read from Redis.
        self.snapshot(id, client).await?;
        Ok(Reader {
            id,
            client: client.clone(),
            next: 0,
            progress: None,
        })
    }

    /// The next lines for `reader` (`Some(empty)` never: it waits for at least one), or
    /// `None` when the job has no more to give (all read, or it was cancelled).
    pub(crate) async fn next_lines(
        &self,
        reader: &mut Reader,
        render: impl Fn(usize, &str, &ItemResult) -> String,
    ) -> Option<String> {
        loop {
            let step = self
                .lock()
                .jobs
                .get(&reader.id)
                .map(|job| lines_of(job, reader, &render));
            let step = match step {
                Some(step) => step,
                // Shared mode: the job runs on another replica.
                None => self.remote_lines(reader, &render).await?,
            };
            match step {
                Lines::Some(out) => return Some(out),
                Lines::End => return None,
                Lines::Wait => {}
            }
            match &mut reader.progress {
                Some(progress) => {
                    if progress.changed().await.is_err() {
                        // The job left this replica (another took it over): read on from
                        // Redis.
                        reader.progress = None;
                    }
                }
                None => tokio::time::sleep(POLL).await,
            }
        }
    }

    /// The lines of a job another replica runs, from Redis; `None` if it is gone.
    async fn remote_lines(
        &self,
        reader: &mut Reader,
        render: &impl Fn(usize, &str, &ItemResult) -> String,
    ) -> Option<Lines> {
        self.fleet.as_ref()?;
        match self.snapshot(reader.id, &reader.client).await {
            Ok(job) => Some(lines_of(&job, reader, render)),
            // Redis is out of reach: the stream waits for it.
            Err(JobError::Unavailable) => Some(Lines::Wait),
            Err(_) => None,
        }
    }
}

/// Reads a job's results in order (see [`Jobs::next_lines`]).
pub(crate) struct Reader {
    pub(super) id: JobId,
    pub(super) client: ClientId,
    next: usize,
    /// The job's progress, when it runs on this replica (otherwise Redis is polled).
    progress: Option<watch::Receiver<usize>>,
}

/// What a reader can be given now.
pub(super) enum Lines {
    Some(String),
    /// Every line is read, or the job was cancelled.
    End,
    /// The next line is not answered yet.
    Wait,
}

/// The lines of `job` from the reader's place, as far as answered.
pub(super) fn lines_of(
    job: &Job,
    reader: &mut Reader,
    render: &impl Fn(usize, &str, &ItemResult) -> String,
) -> Lines {
    let mut out = String::new();
    while let Some(item) = job.items.get(reader.next) {
        let Some(result) = &item.result else {
            break;
        };
        out.push_str(&render(reader.next, &item.cpf, result));
        reader.next += 1;
    }
    if !out.is_empty() {
        Lines::Some(out)
    } else if reader.next >= job.items.len() || !job.open() {
        Lines::End
    } else {
        Lines::Wait
    }
}
