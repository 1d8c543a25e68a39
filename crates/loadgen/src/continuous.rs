//! Continuous mode: a steady, seeded mix at `--rate`, periodic bursts larger than the queue,
//! identical lookups to coalesce and, with `--sim-url`, simulator faults now and then; until
//! `--duration` or a signal.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::args::LoadgenArgs;
use crate::generator::Generator;
use crate::mix::{BAD_CPFS, POPULAR_CPFS, SplitMix64, popular_cpf};
use crate::report::Sent;

/// How long a simulator fault lasts in continuous mode.
const CHAOS_LENGTH: Duration = Duration::from_secs(6);

/// Faults the continuous mode injects, in turn.
const CHAOS_FAULTS: [&str; 3] = ["error", "garbage", "hang"];

impl Generator {
    pub(crate) async fn continuous(self: &Arc<Self>, args: &LoadgenArgs) -> anyhow::Result<()> {
        let shape = self.shape().await;
        let mut rng = SplitMix64(args.seed);
        let mut tasks: JoinSet<Sent> = JoinSet::new();
        let stop = async {
            match args.duration {
                Some(d) => tokio::time::sleep(d).await,
                None => shutdown_signal().await,
            }
        };
        tokio::pin!(stop);

        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let first_burst = Instant::now() + args.burst_every.min(Duration::from_secs(20));
        let mut burst =
            tokio::time::interval_at(first_burst, args.burst_every.max(Duration::from_secs(1)));
        let mut coalesce = tokio::time::interval(Duration::from_secs(15));
        let mut progress = tokio::time::interval(Duration::from_secs(30));
        let chaos_on = self.sim.is_some() && !args.chaos_every.is_zero();
        let mut chaos = tokio::time::interval_at(
            Instant::now() + args.chaos_every,
            args.chaos_every.max(Duration::from_secs(1)),
        );
        let mut chaos_until: Option<(Instant, serde_json::Value)> = None;
        let mut next_fault = 0usize;

        loop {
            tokio::select! {
                () = &mut stop => break,
                _ = tick.tick() => {
                    let request = self.pick(&mut rng);
                    let generator = self.clone();
                    tasks.spawn(async move { generator.send(request).await });
                }
                _ = burst.tick() => {
                    // More distinct lookups than the queue holds: refusals, a full queue, and
                    // (for the impatient third) abandoned lookups.
                    let n = shape.queue_capacity * self.fleet() + 10;
                    for i in 0..n {
                        let patience = if i % 3 == 2 {
                            shape.interval * 3
                        } else {
                            self.patience
                        };
                        let request = Request::Lookup {
                            cpf: self.new_cpf(),
                            client: i,
                            patience,
                        };
                        let generator = self.clone();
                        tasks.spawn(async move { generator.send(request).await });
                    }
                }
                _ = coalesce.tick() => {
                    let cpf = self.new_cpf();
                    let client = rng.below(self.clients.len() as u64) as usize;
                    for _ in 0..5 {
                        let request = Request::Lookup { cpf: cpf.clone(), client, patience: self.patience };
                        let generator = self.clone();
                        tasks.spawn(async move { generator.send(request).await });
                    }
                }
                _ = chaos.tick(), if chaos_on && chaos_until.is_none() => {
                    let fault = CHAOS_FAULTS[next_fault % CHAOS_FAULTS.len()];
                    next_fault += 1;
                    match self.sim_saved().await {
                        Ok(saved) => match self.sim_set(serde_json::json!({ "fault": fault })).await {
                            Ok(()) => {
                                tracing::info!(fault, "loadgen: simulator failing on purpose");
                                chaos_until = Some((Instant::now() + CHAOS_LENGTH, saved));
                            }
                            Err(e) => tracing::warn!(error = %format!("{e:#}"), "loadgen: cannot set a simulator fault"),
                        },
                        Err(e) => tracing::warn!(error = %format!("{e:#}"), "loadgen: cannot read the simulator's config"),
                    }
                }
                () = sleep_until_opt(chaos_until.as_ref().map(|c| c.0)) => {
                    if let Some((_, saved)) = chaos_until.take() {
                        self.restore_sim(saved).await;
                    }
                }
                _ = progress.tick() => {
                    let t = self.tally.lock().unwrap_or_else(|e| e.into_inner()).clone();
                    let ok = t.by_status.get(&200).copied().unwrap_or(0);
                    let refused = t.by_status.get(&429).copied().unwrap_or(0)
                        + t.by_status.get(&503).copied().unwrap_or(0);
                    tracing::info!(
                        requests = t.requests,
                        ok,
                        refused,
                        hung_up = t.hung_up,
                        transport_errors = t.transport_errors,
                        "loadgen progress"
                    );
                }
                Some(_) = tasks.join_next() => {}
            }
        }
        if let Some((_, saved)) = chaos_until.take() {
            self.restore_sim(saved).await;
        }
        // Whatever is still waiting is abandoned with the run.
        tasks.shutdown().await;
        Ok(())
    }

    /// One request of the steady mix.
    fn pick(&self, rng: &mut SplitMix64) -> Request {
        let client = rng.below(self.clients.len() as u64) as usize;
        match rng.below(100) {
            // A CPF this client asks about again and again: mostly cache hits. Squaring a
            // uniform draw makes a few of them far more popular than the rest.
            0..=59 => {
                let u = rng.below(1_000) as f64 / 1_000.0;
                let k = (u * u * f64::from(POPULAR_CPFS)) as u32;
                Request::Lookup {
                    cpf: popular_cpf(k),
                    client,
                    patience: self.patience,
                }
            }
            // Someone new: a miss that spends upstream budget. One in eight gives up early.
            60..=79 => Request::Lookup {
                cpf: self.new_cpf(),
                client,
                patience: if rng.below(8) == 0 {
                    Duration::from_millis(500 + rng.below(2_500))
                } else {
                    self.patience
                },
            },
            80..=88 => Request::BadInput {
                cpf: BAD_CPFS[rng.below(BAD_CPFS.len() as u64) as usize],
                client,
            },
            89..=92 => Request::BadClient {
                cpf: popular_cpf(rng.below(u64::from(POPULAR_CPFS)) as u32),
            },
            93..=97 => Request::Path("/status"),
            _ => Request::Path("/health"),
        }
    }

    async fn send(&self, request: Request) -> Sent {
        match request {
            Request::Lookup {
                cpf,
                client,
                patience,
            } => self.lookup(&cpf, self.client(client), patience).await,
            Request::BadInput { cpf, client } => {
                self.lookup(cpf, self.client(client), self.patience).await
            }
            Request::BadClient { cpf } => self.lookup(&cpf, &self.bad_client, self.patience).await,
            Request::Path(path) => self.get_path(path, Duration::from_secs(10)).await,
        }
    }
}

/// One request of the continuous mix (clients by index: the ids themselves stay put).
enum Request {
    Lookup {
        cpf: String,
        client: usize,
        patience: Duration,
    },
    BadInput {
        cpf: &'static str,
        client: usize,
    },
    BadClient {
        cpf: String,
    },
    Path(&'static str),
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Resolves on Ctrl-C or SIGTERM: a continuous run without `--duration` stops on either.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        Some(()) = async { term.as_mut()?.recv().await } => {},
    }
}
