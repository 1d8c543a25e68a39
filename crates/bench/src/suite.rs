//! The run's shared state (the plan, the simulator, the report so far) and the contenders it
//! starts against the simulator: the proxy's release binary with a chosen telemetry set-up,
//! and nginx from `bench/nginx.conf.template`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result, ensure};

use crate::Plan;
use crate::client::wait_ready;
use crate::procs::{Proc, Workspace, free_port, on_path};
use crate::report::Report;
use crate::sim::Sim;

/// The nginx configuration, with `{{PLACEHOLDERS}}` for paths, ports, rate and burst.
const NGINX_TEMPLATE: &str = include_str!("../../../bench/nginx.conf.template");

/// How nginx's access log is written when it is on: the standard `combined` format, in a
/// 64 KiB buffer written out when full or after a second, as an operator keeping the log
/// on at high request rates would set it.
pub(crate) const NGINX_BUFFERED_LOG: &str = "combined buffer=64k flush=1s";

#[derive(Clone, Debug)]
pub(crate) enum Rival {
    Proxy,
    Nginx { rate: &'static str, burst: u32 },
}

#[derive(Clone, Debug)]
pub(crate) struct Contender {
    pub(crate) label: &'static str,
    pub(crate) rival: Rival,
    /// Upstream calls per second the contender is configured for.
    pub(crate) rate: f64,
}

pub(crate) fn paced_contenders() -> Vec<Contender> {
    vec![
        Contender {
            label: "score-proxy",
            rival: Rival::Proxy,
            rate: 1.0,
        },
        Contender {
            label: "nginx 1r/s",
            rival: Rival::Nginx {
                rate: "1r/s",
                burst: 20,
            },
            rate: 1.0,
        },
        Contender {
            label: "nginx 59r/m",
            rival: Rival::Nginx {
                rate: "59r/m",
                burst: 20,
            },
            rate: 59.0 / 60.0,
        },
    ]
}

/// How to render nginx's configuration beyond the template's defaults.
pub(crate) struct NginxSpec<'a> {
    /// `limit_req_zone`'s rate, as nginx writes it (`59r/m`).
    pub(crate) rate: &'a str,
    /// `limit_req`'s delay queue.
    pub(crate) burst: u32,
    /// The simulator it forwards to.
    pub(crate) sim_port: u16,
    /// Replaces the template's 60 s `proxy_read_timeout`: a request may wait in
    /// `limit_req`'s queue for `burst / rate`, and the outer server's read timeout counts
    /// that wait, so a queue longer than a minute needs a longer one.
    pub(crate) read_timeout_s: Option<u32>,
    /// Names the kept copy of the configuration (`nginx-59r-per-m-VARIANT.generated.conf`)
    /// when it differs from the template's defaults.
    pub(crate) variant: Option<&'a str>,
}

/// A running contender; its processes stop when this is dropped.
pub(crate) struct Running {
    pub(crate) label: String,
    pub(crate) base: String,
    pub(crate) proc: Proc,
}

pub(crate) struct Suite {
    pub(crate) plan: Plan,
    bin: PathBuf,
    pub(crate) ws: Workspace,
    pub(crate) client: reqwest::Client,
    pub(crate) sim: Sim,
    conf_dir: PathBuf,
    pub(crate) written_confs: Vec<PathBuf>,
    instances: AtomicU64,
    pub(crate) report: Report,
}

/// How the proxy's telemetry is set up for one run (scenario 5 compares them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Telemetry {
    /// `SCORE_PROXY_METRICS=false RUST_LOG=off`, no OTLP endpoint.
    Off,
    /// `SCORE_PROXY_METRICS=true RUST_LOG=off`.
    Metrics,
    /// Metrics, and spans exported to the harness's OTLP sink on `port`: every trace when
    /// `per_mille` is 1000 (`always_on`), otherwise that many in a thousand
    /// (`parentbased_traceidratio`).
    Tracing { port: u16, per_mille: u16 },
    /// The shipped default: metrics, and the access log at `info` (to a file).
    Default,
}

impl Telemetry {
    pub(crate) fn label(self) -> String {
        match self {
            Telemetry::Off => "off".into(),
            Telemetry::Metrics => "metrics only".into(),
            Telemetry::Tracing {
                per_mille: 1000, ..
            } => "tracing always_on".into(),
            Telemetry::Tracing { per_mille, .. } => {
                format!("tracing {} %", f64::from(per_mille) / 10.0)
            }
            Telemetry::Default => "default (metrics + access log at info)".into(),
        }
    }

    pub(crate) fn env(self) -> Vec<(&'static str, String)> {
        let mut env = vec![(
            "SCORE_PROXY_METRICS",
            if self == Telemetry::Off {
                "false"
            } else {
                "true"
            }
            .into(),
        )];
        if self != Telemetry::Default {
            env.push(("RUST_LOG", "off".into()));
        }
        if let Telemetry::Tracing { port, per_mille } = self {
            env.push((
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                format!("http://127.0.0.1:{port}"),
            ));
            if per_mille >= 1000 {
                env.push(("OTEL_TRACES_SAMPLER", "always_on".into()));
            } else {
                env.push(("OTEL_TRACES_SAMPLER", "parentbased_traceidratio".into()));
                env.push((
                    "OTEL_TRACES_SAMPLER_ARG",
                    format!("{}", f64::from(per_mille) / 1000.0),
                ));
            }
        }
        env
    }
}

impl Suite {
    /// The suite before its first scenario: no contender started, nothing reported.
    pub(crate) fn new(
        plan: Plan,
        bin: PathBuf,
        ws: Workspace,
        client: reqwest::Client,
        sim: Sim,
        conf_dir: PathBuf,
    ) -> Suite {
        Suite {
            plan,
            bin,
            ws,
            client,
            sim,
            conf_dir,
            written_confs: Vec::new(),
            instances: AtomicU64::new(0),
            report: Report::default(),
        }
    }

    fn instance_dir(&self, what: &str) -> Result<PathBuf> {
        let n = self.instances.fetch_add(1, Ordering::Relaxed);
        self.ws.subdir(&format!("{what}-{n}"))
    }

    pub(crate) async fn start(&mut self, c: &Contender) -> Result<Running> {
        match &c.rival {
            Rival::Proxy => self.start_proxy(c.label, &[], Telemetry::Metrics).await,
            Rival::Nginx { rate, burst } => self.start_nginx(c.label, rate, *burst).await,
        }
    }

    /// Another simulator beside the suite's own, logging in its own directory: scenario 8
    /// gives each contender one, so that they run at the same time, each against the same
    /// seeded network, instead of one after the other. Stopped when dropped.
    pub(crate) async fn start_sim(&self) -> Result<Sim> {
        let dir = self.instance_dir("sim")?;
        let log = dir.join("simulator.log");
        let log = log.strip_prefix(&self.ws.dir).unwrap_or(&log);
        Sim::start(
            &self.bin.with_file_name("score-sim"),
            &self.ws,
            &self.client,
            &log.to_string_lossy(),
        )
        .await
    }

    /// The release binary, on a free port, in front of the simulator. `extra` flags come
    /// after the defaults; the environment is cleared and then set from `telemetry`.
    pub(crate) async fn start_proxy(
        &self,
        label: &str,
        extra: &[&str],
        telemetry: Telemetry,
    ) -> Result<Running> {
        self.start_proxy_to(label, extra, telemetry, self.sim.port)
            .await
    }

    /// As [`Suite::start_proxy`], in front of the simulator on `sim_port`.
    pub(crate) async fn start_proxy_to(
        &self,
        label: &str,
        extra: &[&str],
        telemetry: Telemetry,
        sim_port: u16,
    ) -> Result<Running> {
        let dir = self.instance_dir("proxy")?;
        let port = free_port()?;
        let mut cmd = Command::new(&self.bin);
        cmd.env_clear();
        for (k, v) in telemetry.env() {
            cmd.env(k, v);
        }
        cmd.args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--upstream-url",
            &format!("http://127.0.0.1:{sim_port}/api/score"),
        ])
        .args(extra);
        let mut proc = Proc::spawn(label, cmd, dir.join("proxy.log"), false)?;
        let base = format!("http://127.0.0.1:{port}");
        wait_ready(&self.client, &format!("{base}/health"), &mut proc).await?;
        Ok(Running {
            label: label.to_owned(),
            base,
            proc,
        })
    }

    fn nginx_conf(
        &self,
        prefix: &Path,
        outer: u16,
        inner: u16,
        spec: &NginxSpec,
        access_log: Option<&Path>,
    ) -> Result<String> {
        let mut conf = NGINX_TEMPLATE
            .replace("{{PREFIX}}", &prefix.display().to_string())
            .replace("{{OUTER_PORT}}", &outer.to_string())
            .replace("{{INNER_PORT}}", &inner.to_string())
            .replace("{{SIM_PORT}}", &spec.sim_port.to_string())
            .replace("{{RATE}}", spec.rate)
            .replace("{{BURST}}", &spec.burst.to_string());
        if let Some(log) = access_log {
            const OFF: &str = "access_log off;";
            ensure!(
                conf.contains(OFF),
                "bench/nginx.conf.template no longer says `{OFF}`: the access log cannot be set"
            );
            conf = conf.replace(
                OFF,
                &format!("access_log {} {NGINX_BUFFERED_LOG};", log.display()),
            );
        }
        let Some(s) = spec.read_timeout_s else {
            return Ok(conf);
        };
        const DEFAULT: &str = "proxy_read_timeout 60s;";
        ensure!(
            conf.contains(DEFAULT),
            "bench/nginx.conf.template no longer says `{DEFAULT}`: the read timeout cannot be raised"
        );
        Ok(conf.replace(DEFAULT, &format!("proxy_read_timeout {s}s;")))
    }

    pub(crate) async fn start_nginx(
        &mut self,
        label: &str,
        rate: &str,
        burst: u32,
    ) -> Result<Running> {
        let spec = NginxSpec {
            rate,
            burst,
            sim_port: self.sim.port,
            read_timeout_s: None,
            variant: None,
        };
        self.start_nginx_with(label, &spec).await
    }

    /// nginx as [`Suite::start_nginx`] starts it, with the changes `spec` makes.
    pub(crate) async fn start_nginx_with(
        &mut self,
        label: &str,
        spec: &NginxSpec<'_>,
    ) -> Result<Running> {
        self.start_nginx_logged(label, spec, false).await
    }

    /// As [`Suite::start_nginx_with`]; with `access_log`, nginx writes its access log to
    /// `access.log` in its directory, buffered as [`NGINX_BUFFERED_LOG`] says, instead of
    /// the template's `access_log off` (scenario 5's anchor for what a log should cost).
    pub(crate) async fn start_nginx_logged(
        &mut self,
        label: &str,
        spec: &NginxSpec<'_>,
        access_log: bool,
    ) -> Result<Running> {
        let dir = self.instance_dir("nginx")?;
        self.start_nginx_at(label, spec, access_log, &dir).await
    }

    /// As [`Suite::start_nginx_logged`], with `dir` as nginx's prefix (its configuration,
    /// logs and `proxy_cache_path`): scenario 10 starts nginx again on the cache that an
    /// earlier one left there.
    pub(crate) async fn start_nginx_at(
        &mut self,
        label: &str,
        spec: &NginxSpec<'_>,
        access_log: bool,
        dir: &Path,
    ) -> Result<Running> {
        let nginx =
            on_path("nginx").context("nginx is not installed (apt-get install -y nginx)")?;
        let (outer, inner) = (free_port()?, free_port()?);
        let log = access_log.then(|| dir.join("access.log"));
        let conf = self.nginx_conf(dir, outer, inner, spec, log.as_deref())?;
        let conf_path = dir.join("nginx.conf");
        fs::write(&conf_path, &conf)?;
        // The exact configuration used, next to the report (once per rate and variant).
        let kept = self.conf_dir.join(format!(
            "nginx-{}{}.generated.conf",
            spec.rate.replace('/', "-per-"),
            spec.variant.map_or(String::new(), |v| format!("-{v}"))
        ));
        if !self.written_confs.contains(&kept) {
            fs::create_dir_all(&self.conf_dir)?;
            fs::write(
                &kept,
                format!(
                    "# Generated by score-bench (crates/bench) from bench/nginx.conf.template for the\n\
                     # \"{label}\" runs; paths and ports are those of the run that wrote it.\n{conf}"
                ),
            )?;
            self.written_confs.push(kept);
        }
        let mut cmd = Command::new(nginx);
        cmd.arg("-p")
            .arg(dir)
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-c")
            .arg(&conf_path)
            .args(["-g", "daemon off;"]);
        let mut proc = Proc::spawn(label, cmd, dir.join("nginx.out"), true)?;
        let base = format!("http://127.0.0.1:{outer}");
        wait_ready(&self.client, &format!("{base}/health"), &mut proc)
            .await
            .with_context(|| {
                format!(
                    "nginx error log:\n{}",
                    fs::read_to_string(dir.join("error.log")).unwrap_or_default()
                )
            })?;
        Ok(Running {
            label: label.to_owned(),
            base,
            proc,
        })
    }
}
