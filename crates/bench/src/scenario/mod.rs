//! The scenarios, one module each, in the order a full run takes them (`--only` names):
//! `burst` (1), `identical` (2), `hits` (3), `overload` (4), `telemetry` (5), `memory` (6)
//! `replicas` (7, with `replica_burst`, its bursts through a fleet), `network` (8, the
//! strict simulator behind a seeded network delay), `redis-down` (9, `redis_down`, with
//! `redis_down_record`: a fleet whose Redis is stopped and restarted) and `restart` (10, the
//! persistent caches across a restart under load). Each one drives
//! the contenders, checks what is deterministic (a wrong status code fails the run), records
//! its targets as met or missed, and adds its section to the report.

pub(crate) mod burst;
pub(crate) mod hits;
pub(crate) mod identical;
pub(crate) mod memory;
pub(crate) mod network;
pub(crate) mod overload;
pub(crate) mod redis_down;
mod redis_down_record;
mod replica_burst;
pub(crate) mod replicas;
pub(crate) mod restart;
pub(crate) mod telemetry;
