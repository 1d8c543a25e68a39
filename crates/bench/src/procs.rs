//! The processes the benchmark starts and what it reads about them: the run's temporary
//! directory, child processes stopped on drop (nginx through its master, so that its
//! workers go too), CPU time and resident memory from `/proc`, the kernel's listen-queue
//! drops, where the binaries are, and the `redis-server` the replicas scenario shares.

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::manifest_dir;

/// The run's temporary directory; removed when dropped.
pub(crate) struct Workspace {
    pub(crate) dir: PathBuf,
}

impl Workspace {
    pub(crate) fn new() -> Result<Self> {
        let dir = std::env::temp_dir().join(format!(
            "score-proxy-bench-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or_default()
        ));
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Workspace { dir })
    }

    pub(crate) fn subdir(&self, name: &str) -> Result<PathBuf> {
        let d = self.dir.join(name);
        fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        Ok(d)
    }
}

impl Drop for Workspace {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A child process that is stopped when dropped. nginx is stopped through its master
/// (SIGTERM, so that it takes its workers with it), then anything left is killed.
pub(crate) struct Proc {
    pub(crate) name: String,
    child: Child,
    pub(crate) log: PathBuf,
    nginx: bool,
}

impl Proc {
    pub(crate) fn spawn(name: &str, mut cmd: Command, log: PathBuf, nginx: bool) -> Result<Proc> {
        let out = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name} ({cmd:?})"))?;
        Ok(Proc {
            name: name.to_owned(),
            child,
            log,
            nginx,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    pub(crate) fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// The process and its descendants (nginx's workers, cache manager and loader).
    fn tree(&self) -> Vec<u32> {
        let mut all = vec![self.pid()];
        let mut i = 0;
        while i < all.len() {
            all.extend(children_of(all[i]));
            i += 1;
        }
        all
    }

    /// Peak resident memory (VmHWM) of the process and its descendants, in bytes.
    pub(crate) fn peak_rss(&self) -> u64 {
        self.tree()
            .iter()
            .filter_map(|&p| proc_status_kb(p, "VmHWM:"))
            .sum::<u64>()
            * 1024
    }

    /// CPU time (user + system) used so far by the process and its descendants, in seconds.
    pub(crate) fn cpu_seconds(&self) -> f64 {
        self.tree().iter().map(|&p| proc_cpu_seconds(p)).sum()
    }

    /// As [`Proc::cpu_seconds`], to the nanosecond: the run time of every live thread
    /// (`/proc/PID/task/TID/schedstat`), where `/proc/PID/stat` counts 10 ms ticks. Threads
    /// that have exited are not counted: for short measurements of long-lived processes.
    pub(crate) fn cpu_seconds_fine(&self) -> f64 {
        let mut ns = 0u64;
        for pid in self.tree() {
            let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
                continue;
            };
            for task in tasks.flatten() {
                ns += fs::read_to_string(task.path().join("schedstat"))
                    .ok()
                    .and_then(|t| t.split_whitespace().next()?.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
        ns as f64 / 1e9
    }

    pub(crate) fn rss(&self) -> u64 {
        self.tree()
            .iter()
            .filter_map(|&p| proc_status_kb(p, "VmRSS:"))
            .sum::<u64>()
            * 1024
    }

    /// Sends `sig` (a name `kill` knows: `TERM`, `QUIT`, `KILL`) to the process, and with
    /// `whole_tree` to every descendant it has now as well: scenario 10 restarts a contender
    /// gracefully, or as a crash would (`KILL` to nginx's master and workers at once).
    pub(crate) fn signal(&self, sig: &str, whole_tree: bool) {
        let pids = if whole_tree {
            self.tree()
        } else {
            vec![self.pid()]
        };
        for pid in pids {
            signal(pid, sig);
        }
    }

    fn stop(&mut self) {
        if self.exited().is_some() {
            return;
        }
        if self.nginx {
            let tree = self.tree();
            signal(self.pid(), "TERM");
            let until = Instant::now() + Duration::from_secs(5);
            while Instant::now() < until && self.exited().is_none() {
                std::thread::sleep(Duration::from_millis(20));
            }
            for pid in tree.into_iter().skip(1) {
                if Path::new(&format!("/proc/{pid}")).exists() {
                    signal(pid, "KILL");
                }
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.flatten() {
            if let Ok(text) = fs::read_to_string(task.path().join("children")) {
                out.extend(
                    text.split_whitespace()
                        .filter_map(|s| s.parse::<u32>().ok()),
                );
            }
        }
    }
    out
}

/// Clock ticks per second of `/proc/PID/stat`'s times (`getconf CLK_TCK`, 100 on Linux).
fn clock_ticks() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        command_output("getconf", &["CLK_TCK"])
            .parse()
            .unwrap_or(100.0)
    })
}

fn proc_cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces, hence the last ')'):
    // state is field 3, utime 14 and stime 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        f.get(i - 3)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(14) + ticks(15)) / clock_ticks()
}

/// Connections the kernel dropped because a listen backlog was full (machine-wide
/// `TcpExt: ListenOverflows`): each costs its client a 1 s SYN retransmission.
pub(crate) fn listen_overflows() -> u64 {
    let text = fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "ListenOverflows")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

pub(crate) fn proc_status_kb(pid: u32, field: &str) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// A free loopback port (bound and released: another process could take it in between,
/// in which case the server that wanted it fails to start and the run says so).
pub(crate) fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub(crate) fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

pub(crate) fn proxy_bin() -> Result<PathBuf> {
    let bin = std::env::var_os("SCORE_PROXY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest_dir().join("target/release/score-proxy"));
    ensure!(
        bin.is_file(),
        "the proxy binary {} does not exist: build it first with `cargo build --release` \
         (or point SCORE_PROXY_BIN at one); scripts/bench.sh does both",
        bin.display()
    );
    // A stale binary would benchmark old code: say so loudly (not fatal, it may be wanted).
    if let Ok(built) = fs::metadata(&bin).and_then(|m| m.modified()) {
        let newest_src = newest_mtime(&manifest_dir().join("src"));
        if newest_src.is_some_and(|src| src > built) {
            eprintln!(
                "compare: WARNING: {} is older than src/: run `cargo build --release` first",
                bin.display()
            );
        }
    }
    Ok(bin)
}

fn newest_mtime(dir: &Path) -> Option<std::time::SystemTime> {
    let mut newest = None;
    for entry in fs::read_dir(dir).ok()?.flatten() {
        let p = entry.path();
        let t = if p.is_dir() {
            newest_mtime(&p)
        } else {
            entry.metadata().ok().and_then(|m| m.modified().ok())
        };
        newest = newest.max(t);
    }
    newest
}

pub(crate) fn command_output(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| {
            let mut s = String::from_utf8_lossy(&o.stdout).trim().to_owned();
            if s.is_empty() {
                s = String::from_utf8_lossy(&o.stderr).trim().to_owned();
            }
            s.lines().next().unwrap_or("").to_owned()
        })
        .unwrap_or_else(|_| "not found".into())
}

/// A `redis-server` on a loopback port; stopped when dropped (through its [`Proc`]).
pub(crate) struct Redis {
    pub(crate) port: u16,
    pub(crate) proc: Proc,
}

impl Redis {
    pub(crate) async fn start(ws: &Workspace) -> Result<Redis> {
        Redis::start_on(ws, free_port()?).await
    }

    /// As [`Redis::start`], on `port`: scenario 9 stops Redis (drops it: SIGKILL, as a
    /// crash) and starts it again where the replicas look for it. Each start logs in its
    /// own directory.
    pub(crate) async fn start_on(ws: &Workspace, port: u16) -> Result<Redis> {
        static STARTS: AtomicU32 = AtomicU32::new(0);
        let bin = on_path("redis-server").context(
            "redis-server is not installed: the replicas scenarios need it \
             (apt-get install -y redis-server; scripts/install-deps.sh installs it)",
        )?;
        let dir = ws.subdir(&format!("redis-{}", STARTS.fetch_add(1, Ordering::Relaxed)))?;
        let mut cmd = Command::new(bin);
        cmd.current_dir(&dir).args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ]);
        let mut proc = Proc::spawn("redis-server", cmd, dir.join("redis.log"), false)?;
        let until = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = proc.exited() {
                bail!(
                    "redis-server exited ({status}) before it answered; its log:\n{}",
                    proc.log_tail()
                );
            }
            if redis_ping_rtts(port, 1).await.is_ok() {
                return Ok(Redis { port, proc });
            }
            if Instant::now() > until {
                bail!(
                    "redis-server did not answer PING on port {port} within 20 s; its log:\n{}",
                    proc.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

/// The round trips of `n` PINGs, one after the other on one connection, in seconds.
pub(crate) async fn redis_ping_rtts(port: u16, n: usize) -> Result<Vec<f64>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pings = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        stream.set_nodelay(true)?;
        let mut rtts = Vec::with_capacity(n);
        let mut buf = [0u8; 64];
        for _ in 0..n {
            let t = Instant::now();
            stream.write_all(b"PING\r\n").await?;
            let mut got = 0;
            while !buf[..got].ends_with(b"\r\n") {
                let k = stream.read(&mut buf[got..]).await?;
                ensure!(
                    k > 0 && got + k < buf.len(),
                    "redis: unexpected answer to PING"
                );
                got += k;
            }
            ensure!(
                &buf[..got] == b"+PONG\r\n",
                "redis answered PING with {:?}",
                String::from_utf8_lossy(&buf[..got])
            );
            rtts.push(t.elapsed().as_secs_f64());
        }
        Ok(rtts)
    };
    tokio::time::timeout(Duration::from_secs(5), pings)
        .await
        .context("redis PING timed out")?
}
