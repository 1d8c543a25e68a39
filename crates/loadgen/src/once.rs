//! Once mode: every outcome at least once, in a fixed order, each within `--step-timeout`;
//! what could not be provoked is reported missing, what needs `--sim-url` (or `/metrics`)
//! and did not have it, skipped.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::args::LoadgenArgs;
use crate::generator::{Generator, ProxyShape};
use crate::mix::BAD_CPFS;
use crate::report::{Sent, outcomes_of};

/// Once mode: the least time between two tries at the same outcome.
const RETRY_PAUSE: Duration = Duration::from_millis(250);

/// The outcomes once mode drives, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    Miss,
    Hit,
    Coalesced,
    InvalidRequest,
    NotFound,
    Unauthorized,
    QueueFull,
    Abandoned,
    UnusedSlot,
    UpstreamError,
    UpstreamBadBody,
    UpstreamTimeout,
    Penalty,
    DeadlineUnreachable,
}

impl Target {
    const ALL: [Target; 14] = [
        Target::Miss,
        Target::Hit,
        Target::Coalesced,
        Target::InvalidRequest,
        Target::NotFound,
        Target::Unauthorized,
        Target::QueueFull,
        Target::Abandoned,
        Target::UnusedSlot,
        Target::UpstreamError,
        Target::UpstreamBadBody,
        Target::UpstreamTimeout,
        Target::Penalty,
        Target::DeadlineUnreachable,
    ];

    /// The outcome name that shows the target was reached.
    fn outcome(self) -> &'static str {
        match self {
            Target::Miss => "miss",
            Target::Hit => "hit",
            Target::Coalesced => "coalesced",
            Target::InvalidRequest => "invalid_request",
            Target::NotFound => "not_found",
            Target::Unauthorized => "upstream_unauthorized",
            Target::QueueFull => "queue_full",
            Target::Abandoned => "abandoned",
            Target::UnusedSlot => "unused_slot",
            Target::UpstreamError => "upstream_error",
            Target::UpstreamBadBody => "upstream_bad_body",
            Target::UpstreamTimeout => "upstream_timeout",
            Target::Penalty => "penalty",
            Target::DeadlineUnreachable => "deadline_unreachable",
        }
    }

    /// Only the proxy's own counters can show it happened.
    fn needs_metrics(self) -> bool {
        self == Target::UnusedSlot
    }

    fn needs_sim(self) -> bool {
        matches!(
            self,
            Target::UpstreamError
                | Target::UpstreamBadBody
                | Target::UpstreamTimeout
                | Target::Penalty
        )
    }
}

impl Generator {
    pub(crate) async fn once(
        self: &Arc<Self>,
        args: &LoadgenArgs,
    ) -> anyhow::Result<(Vec<String>, Vec<String>)> {
        // The other routes, once each on every target, so their series have samples.
        for target in 0..self.targets.len() {
            for path in ["/health", "/ready", "/status", "/no-such-endpoint"] {
                self.get(target, self.url(target, path), Duration::from_secs(5))
                    .await;
            }
        }
        if self.sim.is_some() {
            // Fail early and clearly if the control endpoint is not there.
            self.sim_config().await?;
        }
        let shape = self.shape().await;
        let metrics = self.metric("score_proxy_build_info").await.is_some();
        let mut seen: BTreeSet<String> = BTreeSet::new();
        let mut missing = Vec::new();
        let mut skipped = Vec::new();
        for target in Target::ALL {
            if (target.needs_sim() && self.sim.is_none()) || (target.needs_metrics() && !metrics) {
                skipped.push(target.outcome().to_owned());
                continue;
            }
            let end = Instant::now() + args.step_timeout;
            let mut first = true;
            while !seen.contains(target.outcome()) {
                if Instant::now() >= end {
                    missing.push(target.outcome().to_owned());
                    break;
                }
                if !first {
                    // The proxy may be refusing everything for a while (an open circuit
                    // breaker, a penalty): try again at a walking pace, not in a tight loop.
                    tokio::time::sleep(shape.interval.max(RETRY_PAUSE)).await;
                }
                first = false;
                let observed = self.attempt(target, shape).await?;
                seen.extend(observed);
            }
            tracing::info!(
                outcome = target.outcome(),
                seen = seen.contains(target.outcome()),
                "loadgen step done"
            );
        }
        Ok((missing, skipped))
    }

    /// One try at provoking `target`; returns every outcome it produced.
    async fn attempt(
        self: &Arc<Self>,
        target: Target,
        shape: ProxyShape,
    ) -> anyhow::Result<Vec<String>> {
        let patient = self.patience;
        let client = self.client(0).to_owned();
        let outcomes = match target {
            Target::Miss | Target::Hit => {
                // Both to one target: a hit must not depend on a cache shared between them.
                let on = self.next_target();
                let cpf = self.new_cpf();
                let first = self.lookup_on(on, &cpf, &client, patient).await;
                let second = self.lookup_on(on, &cpf, &client, patient).await;
                outcomes_of([first, second])
            }
            Target::Coalesced => {
                let cpf = self.new_cpf();
                let sent = self
                    .all((0..8).map(|_| (cpf.clone(), client.clone(), patient)))
                    .await;
                outcomes_of(sent)
            }
            Target::InvalidRequest => {
                let mut sent = Vec::new();
                for cpf in BAD_CPFS {
                    sent.push(self.lookup(cpf, &client, patient).await);
                }
                outcomes_of(sent)
            }
            Target::NotFound => outcomes_of([self.get_path("/no-such-endpoint", patient).await]),
            Target::Unauthorized => {
                let bad = self.bad_client.clone();
                outcomes_of([self.lookup(&self.new_cpf(), &bad, patient).await])
            }
            Target::QueueFull => {
                let n = (shape.queue_capacity * 2 + 4) * self.fleet();
                let sent = self.all(self.distinct(n, patient)).await;
                outcomes_of(sent)
            }
            Target::Abandoned => {
                let before = self.metric("score_proxy_queue_abandoned_total").await;
                // Two starts' worth of patience: the head of the burst is answered, the
                // rest is still queued when its clients leave.
                let impatient = shape.interval * 2 + Duration::from_millis(100);
                let sent = self
                    .all(self.distinct(shape.queue_capacity * self.fleet(), impatient))
                    .await;
                let hung_up = sent.contains(&Sent::HungUp);
                let mut outcomes = outcomes_of(sent);
                let moved = self
                    .poll_metric_increase("score_proxy_queue_abandoned_total", before)
                    .await;
                // Without /metrics, the hang-ups are the only evidence there is.
                if moved.unwrap_or(hung_up) {
                    self.note("abandoned");
                    outcomes.push("abandoned".into());
                }
                outcomes
            }
            Target::UnusedSlot => {
                // A call starts; a second lookup, right behind it on the same target, waits
                // for the pacer's next start and hangs up before it comes: the slot goes
                // unused.
                let before = self.metric("score_proxy_pacing_unused_slots_total").await;
                let on = self.next_target();
                let quitter = (shape.interval / 4).max(Duration::from_millis(30));
                let spawn = |tasks: &mut JoinSet<Sent>, patience: Duration| {
                    let (generator, cpf, client) = (self.clone(), self.new_cpf(), client.clone());
                    tasks.spawn(
                        async move { generator.lookup_on(on, &cpf, &client, patience).await },
                    );
                };
                let mut tasks = JoinSet::new();
                spawn(&mut tasks, patient);
                tokio::time::sleep(Duration::from_millis(10)).await;
                spawn(&mut tasks, quitter);
                let mut sent = Vec::new();
                while let Some(done) = tasks.join_next().await {
                    if let Ok(s) = done {
                        sent.push(s);
                    }
                }
                let mut outcomes = outcomes_of(sent);
                let moved = self
                    .poll_metric_increase("score_proxy_pacing_unused_slots_total", before)
                    .await;
                // Without /metrics there is no way to tell; do not claim it.
                if moved == Some(true) {
                    self.note("unused_slot");
                    outcomes.push("unused_slot".into());
                }
                outcomes
            }
            Target::UpstreamError | Target::UpstreamBadBody | Target::UpstreamTimeout => {
                let fault = match target {
                    Target::UpstreamError => "error",
                    Target::UpstreamBadBody => "garbage",
                    _ => "hang",
                };
                let saved = self.sim_saved().await?;
                self.sim_set(serde_json::json!({ "fault": fault })).await?;
                let sent = self.lookup(&self.new_cpf(), &client, patient).await;
                self.sim_set(saved).await?;
                outcomes_of([sent])
            }
            Target::Penalty => self.penalty(shape).await?,
            Target::DeadlineUnreachable => self.deadline(shape).await,
        };
        Ok(outcomes)
    }

    /// A burst of distinct lookups from clients that will wait only an interval and a half
    /// for their call to start (`X-Queue-Timeout`): the third and later cannot, and are
    /// refused at once (`deadline_unreachable`).
    async fn deadline(self: &Arc<Self>, shape: ProxyShape) -> Vec<String> {
        let wait = shape.interval.mul_f64(1.5);
        let mut tasks = JoinSet::new();
        for (cpf, client, patience) in self.distinct(4, self.patience) {
            let generator = self.clone();
            tasks.spawn(async move {
                let target = generator.next_target();
                let mut url = generator.url(target, "/proxy/score");
                url.query_pairs_mut()
                    .append_pair("cpf", &cpf)
                    .append_pair("client_id", &client);
                generator.get_with(target, url, patience, Some(wait)).await
            });
        }
        let mut sent = Vec::new();
        while let Some(done) = tasks.join_next().await {
            if let Ok(s) = done {
                sent.push(s);
            }
        }
        outcomes_of(sent)
    }

    /// Makes the simulator stricter than the proxy's pace, so the proxy's second call lands
    /// inside the upstream's interval and is penalised; while the proxy pauses, a burst of
    /// distinct lookups finds its schedule pushed out (`upstream_penalty`: refused because
    /// of the penalty). The simulator is put back before the answers are awaited, so
    /// retries succeed.
    async fn penalty(self: &Arc<Self>, shape: ProxyShape) -> anyhow::Result<Vec<String>> {
        let saved = self.sim_saved().await?;
        let before = self.metric("score_proxy_pacing_penalties_total").await;
        let strict_ms = (shape.interval.as_millis() as u64 * 4).max(1_000);
        self.sim_set(serde_json::json!({ "min_interval_ms": strict_ms }))
            .await?;
        let mut tasks = JoinSet::new();
        let trigger: Vec<_> = self.distinct(3, self.patience).collect();
        self.spawn_all(&mut tasks, trigger);

        // Wait (bounded) for the proxy to report the pause.
        let mut penalised = false;
        let end = Instant::now() + shape.interval * 4 + Duration::from_secs(3);
        while Instant::now() < end {
            if self.penalty_active().await {
                penalised = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if penalised {
            let burst: Vec<_> = self
                .distinct(shape.queue_capacity * self.fleet(), self.patience)
                .collect();
            self.spawn_all(&mut tasks, burst);
        }
        let restored = self.sim_set(saved).await;
        let mut sent = Vec::new();
        while let Some(done) = tasks.join_next().await {
            if let Ok(s) = done {
                sent.push(s);
            }
        }
        restored?;
        let mut outcomes = outcomes_of(sent);
        let moved = self
            .poll_metric_increase("score_proxy_pacing_penalties_total", before)
            .await;
        if moved.unwrap_or(penalised) {
            self.note("penalty");
            outcomes.push("penalty".into());
        }
        // Let the pause end before the next step.
        let end = Instant::now() + Duration::from_secs(10);
        while self.penalty_active().await && Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(outcomes)
    }
}
