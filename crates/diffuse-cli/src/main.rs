//! `diffuse`: the command-line entry point.

mod bench;
mod client;
mod compare;
mod demo;
mod keygen;
mod load;
mod node;
mod preprocessing;
mod runtime;
mod sim;
mod svg;
mod testnet;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// mimalloc instead of glibc's allocator: replicas allocate and free many
/// buffers of a few kilobytes per batch (frames, requests, results), where glibc
/// spent a quarter of a replica's CPU in `malloc`, `free`, consolidation and
/// fresh zeroed pages (`docs/performance.md`). Built without transparent huge
/// pages (the `no_thp` feature): with them, 103 replicas on two cores spent up to
/// two thirds of their time zeroing fresh 2 MB pages under a burst of clients,
/// and the cluster stopped ordering (`docs/performance.md`, "Start-up collapse").
/// (On a host whose huge-page setting is `always` rather than `madvise`, the
/// kernel uses them unasked: run with `MIMALLOC_ALLOW_THP=0` there.)
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Diffuse: Byzantine fault-tolerant state machine replication, in Rust.
#[derive(Parser)]
#[command(name = "diffuse", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start a local cluster (4 PBFT replicas by default, 3 with --protocol minbft or fastbft)
    /// as child processes, run a key-value workload against it and report
    /// throughput and latency (--chaos: kill and restart replicas mid-run). No setup
    /// needed.
    Demo(demo::DemoArgs),
    /// Run a protocol in the deterministic simulator over many seeds, with faults,
    /// and check every run for safety and liveness violations.
    Sim(sim::SimArgs),
    /// Measure a local cluster of real processes under closed-loop load: throughput,
    /// latency percentiles, CPU per operation, with CSV, JSON and SVG results.
    Bench(bench::BenchArgs),
    /// Write keys and configuration files for a cluster of real nodes.
    Testnet(testnet::TestnetArgs),
    /// Run one replica of a cluster (stops cleanly on SIGINT / SIGTERM).
    Node(node::NodeArgs),
    /// Run one key-value operation against a running cluster.
    Client(client::ClientArgs),
    /// Generate an Ed25519 key file for a replica or a client.
    Keygen(keygen::KeygenArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Sim(args) => sim::run(args),
        Command::Demo(args) => demo::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Testnet(args) => testnet::run(args),
        Command::Node(args) => node::run(args),
        Command::Client(args) => client::run(args),
        Command::Keygen(args) => keygen::run(args),
    }
}
