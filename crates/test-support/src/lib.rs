//! What score-proxy's tests, benches and fuzz target share, once.
//!
//! - [`prom`]: a parser for the Prometheus text format, for scrapes of `/metrics`.
//! - [`redis`]: a real `redis-server` on a loopback port, killed on drop.
//! - [`free_port`]: a loopback port free at the time of asking.
#![forbid(unsafe_code)]

pub mod prom;
pub mod redis;

/// A loopback port free at the time of asking.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}
