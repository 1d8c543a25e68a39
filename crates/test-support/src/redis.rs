//! A real `redis-server` for the shared-mode tests (Debian's package;
//! `scripts/install-deps.sh` installs it), on a loopback port, killed on drop.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct Redis {
    child: Child,
    pub port: u16,
}

impl Redis {
    /// Starts one on a free port.
    pub fn start() -> Redis {
        Redis::start_on(crate::free_port())
    }

    /// Starts one on `port` (a test that stops Redis starts it again on the same port) and
    /// waits for its "Ready to accept connections" line.
    pub fn start_on(port: u16) -> Redis {
        let mut child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--loglevel", "notice"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "redis-server on PATH (apt-get install redis-server, or scripts/install-deps.sh)",
            );
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut told = false;
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if !told && line.contains("Ready to accept connections") {
                    let _ = tx.send(());
                    told = true;
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(20))
            .expect("redis-server becomes ready");
        Redis { child, port }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
