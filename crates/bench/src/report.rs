//! The report: targets met or missed, one section per scenario, the machine it ran on, and
//! `BENCHMARKS.md` rewritten above its hand-written marker.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::procs::{command_output, on_path};
use crate::stats::mib;
use crate::{Plan, manifest_dir};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    Met,
    Missed,
}

pub(crate) struct TargetCheck {
    pub(crate) target: String,
    measured: String,
    pub(crate) verdict: Verdict,
}

#[derive(Default)]
pub(crate) struct Report {
    pub(crate) sections: Vec<(String, String)>,
    pub(crate) targets: Vec<TargetCheck>,
}

impl Report {
    pub(crate) fn section(&mut self, title: &str, body: String) {
        self.sections.push((title.to_owned(), body));
    }

    pub(crate) fn target(
        &mut self,
        target: impl Into<String>,
        measured: impl Into<String>,
        met: bool,
    ) {
        let t = TargetCheck {
            target: target.into(),
            measured: measured.into(),
            verdict: if met { Verdict::Met } else { Verdict::Missed },
        };
        println!(
            "  target {}: {} -> {}",
            t.target,
            t.measured,
            if met { "met" } else { "MISSED" }
        );
        self.targets.push(t);
    }
}

pub(crate) fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "| {} |", headers.join(" | "));
    let _ = writeln!(
        s,
        "|{}",
        headers.iter().map(|_| " --- |").collect::<String>()
    );
    for r in rows {
        let _ = writeln!(s, "| {} |", r.join(" | "));
    }
    s
}

/// The 1-minute load average: other work on the machine competes with the benchmark.
pub(crate) fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .next()
        .unwrap_or("?")
        .to_owned()
}

pub(crate) fn machine_facts() -> String {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("unknown")
        .trim()
        .to_owned();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("MemTotal"))
        .unwrap_or("")
        .split_whitespace()
        .nth(1)
        .and_then(|k| k.parse::<u64>().ok())
        .map_or("unknown".into(), |kb| mib(kb * 1024));
    let os = fs::read_to_string("/etc/os-release")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .unwrap_or("unknown")
        .trim_matches('"')
        .to_owned();
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let commit = command_output(
        "git",
        &[
            "-C",
            &manifest_dir().to_string_lossy(),
            "rev-parse",
            "--short",
            "HEAD",
        ],
    );
    let dirty = Command::new("git")
        .args([
            "-C",
            &manifest_dir().to_string_lossy(),
            "status",
            "--porcelain",
            "--",
            "src",
        ])
        .output()
        .map(|o| !o.stdout.is_empty())
        .unwrap_or(false);
    let rows = vec![
        vec![
            "date (UTC)".into(),
            command_output("date", &["-u", "+%Y-%m-%d %H:%M"]),
        ],
        vec!["CPU".into(), format!("{model}, {cores} cores visible")],
        vec!["memory".into(), mem],
        vec!["OS, kernel".into(), format!("{os}, Linux {kernel}")],
        vec![
            "load average at start".into(),
            load.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" "),
        ],
        vec![
            "nginx".into(),
            command_output(
                on_path("nginx")
                    .map_or("nginx".into(), |p| p.display().to_string())
                    .as_str(),
                &["-v"],
            ),
        ],
        vec!["wrk".into(), command_output("wrk", &["-v"])],
        vec!["rustc".into(), command_output("rustc", &["-V"])],
        vec![
            "score-proxy".into(),
            format!(
                "commit {commit}{} (release profile)",
                if dirty {
                    " with uncommitted changes in src/"
                } else {
                    ""
                }
            ),
        ],
    ];
    table(&["what", "value"], &rows)
}

const MARKER: &str = "<!-- HAND-WRITTEN: everything below this line is kept when the benchmark rewrites this file -->";

pub(crate) fn render(
    plan: &Plan,
    report: &Report,
    written_confs: &[PathBuf],
    facts: &str,
    scenarios: &[&str],
    elapsed: Duration,
) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Benchmarks: score-proxy against nginx\n");
    let _ = writeln!(
        s,
        "Generated by `score-bench` (crates/bench; {} run of {}, {:.0} s). The part above the \
         hand-written marker is rewritten by every run; do not edit it by hand.\n",
        if plan.quick { "quick" } else { "full" },
        scenarios.join(", "),
        elapsed.as_secs_f64()
    );
    let _ = writeln!(s, "## Machine\n\n{facts}");
    let _ = writeln!(
        s,
        "Everything runs on this one machine over loopback: the simulator, the proxy or nginx, \
         and the load generator, which competes with them for the same cores. Other work on the \
         machine (see the load average) adds noise; compare the ratios, which are measured in \
         the same run, rather than absolute numbers.\n"
    );
    let _ = writeln!(
        s,
        "## How to reproduce\n\n```sh\n\
         apt-get install -y nginx wrk redis-server   # once\n\
         scripts/bench.sh                            # cargo build --release, then the full suite; writes this file\n\
         scripts/bench.sh --quick                    # the CI smoke test: small sizes, no thresholds\n\
         scripts/bench.sh --only hits,memory         # some scenarios (report under target/bench-report/)\n\
         scripts/bench.sh --only network             # scenario 8 alone: pacing across a seeded network delay\n\
         scripts/bench.sh --only redis-down          # scenario 9 alone: three replicas while Redis is down\n\
         scripts/bench.sh --only restart             # scenario 10 alone: restart under load, against nginx's disk cache\n\
         # or, by hand:\n\
         cargo build --release --workspace && cargo run --release -p score-bench -- [--quick] [--only S] [--out PATH]\n\
         ```\n\n\
         Each run starts its own processes on free loopback ports: `target/release/score-sim`, \
         the proxy (`target/release/score-proxy --listen ... --upstream-url \
         ...`), `nginx -p TMP -e TMP/error.log -c TMP/nginx.conf -g 'daemon off;'`, and for \
         scenarios 7 and 9 `redis-server --port PORT --bind 127.0.0.1 --save '' --appendonly \
         no` (scenario 9 kills it and starts another on the same port); \
         scenario 8 starts one more `score-sim` per contender and sets its network through \
         `PUT /__sim/config` (`arrival_delay`, `seed`, as `score-sim --arrival-delay ... \
         --seed ...` would); the cache hits run `wrk {} -s bench/wrk.lua URL` with `BENCH_KEYS` \
         naming the file of request paths.\n",
        plan.wrk_args()
    );
    let confs = written_confs
        .iter()
        .map(|p| {
            format!(
                "`{}`",
                p.strip_prefix(manifest_dir()).unwrap_or(p).display()
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    let _ = writeln!(
        s,
        "## The rival\n\nnginx {}, configured from `bench/nginx.conf.template` as a capable \
         operator would: an outer server with `proxy_cache` keyed on `$arg_client_id:$arg_cpf`, \
         `proxy_cache_valid 200 300s`, `proxy_cache_lock on` (lock timeout and age raised to 60 s \
         so that waiters behind a paced fetch never go upstream on their own); an inner server \
         with `limit_req zone=pace burst=20` on one shared key, `limit_req_status 429`, passing \
         `client-id` as a header; keep-alive to both upstreams; `worker_processes auto`; \
         `access_log off`. It runs at the nominal `rate=1r/s` and at `rate=59r/m`, the rate an \
         operator tunes it to once the strict upstream penalises 1r/s. The exact files used: \
         {}.\n",
        command_output(
            on_path("nginx")
                .map_or("nginx".into(), |p| p.display().to_string())
                .as_str(),
            &["-v"]
        )
        .trim_start_matches("nginx version: "),
        if confs.is_empty() {
            "none in this run".into()
        } else {
            confs
        },
    );
    let _ = writeln!(s, "## Targets\n");
    let rows: Vec<Vec<String>> = report
        .targets
        .iter()
        .map(|t| {
            vec![
                t.target.clone(),
                t.measured.clone(),
                match t.verdict {
                    Verdict::Met => "met".into(),
                    Verdict::Missed => "**missed**".into(),
                },
            ]
        })
        .collect();
    let _ = writeln!(
        s,
        "{}",
        table(&["target (score-proxy)", "measured", "verdict"], &rows)
    );
    for (title, body) in &report.sections {
        let _ = writeln!(s, "## {title}\n\n{body}");
    }
    s
}

pub(crate) fn write_report(path: &Path, generated: &str) -> Result<()> {
    let kept = fs::read_to_string(path)
        .ok()
        .and_then(|old| old.find(MARKER).map(|i| old[i..].to_owned()))
        .unwrap_or_else(|| format!("{MARKER}\n\n## Analysis\n\n(to be written)\n"));
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    fs::write(path, format!("{generated}\n{kept}"))
        .with_context(|| format!("writing {}", path.display()))
}
