//! The Diffuse node runtime: drives any sans-IO protocol of Diffuse as a real
//! process, with authenticated TCP channels, durable storage, real timers and
//! metrics, and the client library that talks to such a cluster.
//!
//! * [`replica::run_node`] runs one replica from a [`config::NodeConfig`] file.
//! * [`client::KvClient`] (and the protocol-generic [`client::Client`]) invoke
//!   operations on a cluster from a [`config::ClientConfig`] file.
//! * [`testnet::write`] generates the keys and configuration files of a cluster.

mod alarm;
pub mod client;
pub mod config;
pub mod enclaves;
pub mod host;
pub mod inbox;
pub mod local;
mod memo;
pub mod metrics;
pub mod noise;
pub mod protocols;
pub mod replica;
pub mod storage;
pub mod tee;
pub mod testnet;
pub mod timers;
pub mod transport;
pub mod workload;
