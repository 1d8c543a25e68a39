//! Scenario 9's record of one case (`redis_down`): the bursts sent, the simulator's
//! arrivals put on the harness clock with the replica that made each, and what they say
//! (answers that were not honest, the closest arrivals, budget use, the arrivals around
//! each penalty and each switch of Redis).

use std::collections::HashMap;

use score_sim::SimStats;

use crate::client::Sample;
use crate::sim::Sim;

/// The proxies' rate (their default) and the upstream's: budget use is against it.
pub(crate) const RATE: f64 = 1.0;
pub(crate) const REPLICAS: usize = 3;
/// How many penalties a case lists the arrivals around.
const PENALTIES_SHOWN: usize = 3;

/// One burst of a case: the lookups sent and what came back.
pub(crate) struct Burst {
    pub(crate) launched: f64,
    pub(crate) samples: Vec<Sample>,
}

impl Burst {
    pub(crate) fn wall(&self) -> f64 {
        self.samples
            .iter()
            .map(|s| s.end)
            .fold(self.launched, f64::max)
            - self.launched
    }
}

/// One upstream arrival, on the harness clock, with the replica that made it.
struct Arrival {
    at: f64,
    replica: Option<usize>,
    burst: Option<usize>,
    penalised: bool,
}

/// What one case did.
pub(crate) struct Measured {
    /// `/status` before the first lookup: each replica's place (or none) and mode.
    pub(crate) before: String,
    pub(crate) bursts: Vec<Burst>,
    pub(crate) stats: SimStats,
    arrivals: Vec<Arrival>,
    /// Case (b): when Redis was stopped and when it answered again (harness clock).
    events: Vec<(&'static str, f64)>,
}

impl Measured {
    /// The case's record: the simulator's arrivals put on the harness clock, in order,
    /// each with the replica and burst its CPF was sent to.
    pub(crate) fn new(
        before: String,
        bursts: Vec<Burst>,
        stats: SimStats,
        events: Vec<(&'static str, f64)>,
        sim: &Sim,
    ) -> Measured {
        let mut owner: HashMap<&str, (usize, usize)> = HashMap::new();
        for (b, burst) in bursts.iter().enumerate() {
            for s in &burst.samples {
                owner.insert(s.cpf.as_str(), (s.target, b));
            }
        }
        let mut arrivals: Vec<Arrival> = stats
            .arrivals
            .iter()
            .map(|a| {
                let who = owner.get(a.cpf.as_str());
                Arrival {
                    at: sim.to_harness(a.at),
                    replica: who.map(|w| w.0),
                    burst: who.map(|w| w.1),
                    penalised: a.violation,
                }
            })
            .collect();
        arrivals.sort_by(|x, y| x.at.total_cmp(&y.at));
        Measured {
            before,
            bursts,
            stats,
            arrivals,
            events,
        }
    }

    pub(crate) fn samples(&self) -> impl Iterator<Item = &Sample> {
        self.bursts.iter().flat_map(|b| b.samples.iter())
    }

    /// Lookups answered with neither a score nor an honest refusal (`429`/`503` with
    /// `Retry-After`): other statuses, refusals without it, timeouts, transport errors.
    pub(crate) fn not_honest(&self) -> usize {
        self.samples()
            .filter(|s| match s.status() {
                Some(200) => false,
                Some(429 | 503) => s.retry_after.is_none(),
                _ => true,
            })
            .count()
    }

    pub(crate) fn closest(&self) -> Option<f64> {
        self.arrivals
            .windows(2)
            .map(|w| w[1].at - w[0].at)
            .min_by(f64::total_cmp)
    }

    /// Budget use over the arrivals of `burst` (all of the case's when `None`).
    pub(crate) fn budget_use(&self, burst: Option<usize>) -> f64 {
        let ats: Vec<f64> = self
            .arrivals
            .iter()
            .filter(|a| burst.is_none() || a.burst == burst)
            .map(|a| a.at)
            .collect();
        match (ats.first(), ats.last()) {
            (Some(first), Some(last)) if ats.len() >= 2 && last > first => {
                (ats.len() - 1) as f64 / (last - first) / RATE
            }
            _ => f64::NAN,
        }
    }

    pub(crate) fn wall(&self) -> f64 {
        let first = self.bursts.first().map_or(0.0, |b| b.launched);
        self.samples().map(|s| s.end).fold(first, f64::max) - first
    }

    pub(crate) fn calls_by_replica(&self) -> String {
        let mut calls = [0usize; REPLICAS];
        let mut unknown = 0;
        for a in &self.arrivals {
            match a.replica {
                Some(r) => calls[r] += 1,
                None => unknown += 1,
            }
        }
        let mut text = calls.map(|c| c.to_string()).join(" / ");
        if unknown > 0 {
            text.push_str(&format!(" (+{unknown} unknown)"));
        }
        text
    }

    /// The arrivals around each penalised one (the first few): when it came (since the
    /// case's first arrival, in which burst, after which switch of case (b)), then each
    /// arrival with the gap to the one before and the replica that made it.
    pub(crate) fn around_penalties(&self) -> Vec<String> {
        let origin = self.arrivals.first().map_or(0.0, |a| a.at);
        self.arrivals
            .iter()
            .enumerate()
            .filter(|(_, a)| a.penalised)
            .take(PENALTIES_SHOWN)
            .map(|(i, a)| {
                let mut when = format!("at {:.3} s", a.at - origin);
                if let Some(b) = a.burst.filter(|_| self.bursts.len() > 1) {
                    when.push_str(&format!(", burst {}", b + 1));
                }
                if let Some((what, t)) = self.events.iter().rev().find(|(_, t)| *t <= a.at) {
                    when.push_str(&format!(", {:.3} s after Redis {what}", a.at - t));
                }
                let from = i.saturating_sub(2).max(1);
                let to = (i + 1).min(self.arrivals.len() - 1);
                let gaps = (from..=to)
                    .map(|j| self.describe_arrival(j))
                    .collect::<Vec<_>>()
                    .join(", ");
                format!("{when}: {gaps}")
            })
            .collect()
    }

    /// Arrival `j` (not the first): its replica and the gap since the one before.
    fn describe_arrival(&self, j: usize) -> String {
        let a = &self.arrivals[j];
        let who = a.replica.map_or("?".into(), |r| format!("r{}", r + 1));
        format!(
            "{who} +{:.3} s{}",
            a.at - self.arrivals[j - 1].at,
            if a.penalised { " **penalised**" } else { "" }
        )
    }

    /// For each event of case (b): the gap between the arrivals on either side of it, and
    /// how long after it the first call came.
    pub(crate) fn switch_gaps(&self) -> Vec<String> {
        self.events
            .iter()
            .map(|&(what, t)| {
                let before = self.arrivals.iter().rev().find(|a| a.at <= t);
                let after = self.arrivals.iter().find(|a| a.at > t);
                match (before, after) {
                    (Some(b), Some(a)) => format!(
                        "Redis {what}: {:.3} s between the arrivals on either side (the \
                         first {:.3} s after it)",
                        a.at - b.at,
                        a.at - t
                    ),
                    _ => format!("Redis {what}: no arrival on both sides"),
                }
            })
            .collect()
    }

    /// For each burst of case (b): which replica made each call, in order (`1` to `3`, `?`
    /// for a CPF sent by no burst), with `|` where Redis was stopped or answered again:
    /// shows how evenly the shared schedule served the replicas before a switch, and which
    /// places' positions passed unused after it.
    pub(crate) fn sequences(&self) -> Vec<String> {
        if self.events.is_empty() {
            return Vec::new();
        }
        (0..self.bursts.len())
            .map(|b| {
                let mut text = String::new();
                let mut events = self.events.iter().peekable();
                for a in self.arrivals.iter().filter(|a| a.burst == Some(b)) {
                    while let Some(&(what, _)) = events.next_if(|&&(_, t)| t <= a.at) {
                        text.push_str(&format!(" | {what} |"));
                    }
                    match a.replica {
                        Some(r) => text.push_str(&format!(" {}", r + 1)),
                        None => text.push_str(" ?"),
                    }
                }
                format!("burst {}:{text}", b + 1)
            })
            .collect()
    }
}
