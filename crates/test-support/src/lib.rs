//! What score-proxy's tests, benches and fuzz target share, once.
//!
//! - [`prom`]: a parser for the Prometheus text format, for scrapes of `/metrics`.
//! - [`redis`]: a real `redis-server` on a loopback port, killed on drop.
//! - [`cpf`]: the CPF reference model (check digits, shapes, the all-same-digit rule) and
//!   [`cpf::nth`], the tests' supply of distinct valid CPFs.
//! - [`query`]: the reference model of the `/proxy/score` query parser, on top of [`cpf`].
//! - [`logs`]: log output captured in memory, and the `TEST_LOG=1` subscriber (feature
//!   `logs`).
//! - [`free_port`]: a loopback port free at the time of asking.
//!
//! The fuzz target depends on this crate for the models: nothing here may pull in an async
//! runtime or an HTTP stack (`cd fuzz && cargo tree` shows what it builds).
#![forbid(unsafe_code)]

pub mod cpf;
pub mod logs;
pub mod prom;
pub mod query;
pub mod redis;

/// A loopback port free at the time of asking.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}
