//! `diffuse`: the command-line entry point.

mod client;
mod keygen;
mod node;
mod runtime;
mod sim;
mod testnet;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// Diffuse: Byzantine fault-tolerant state machine replication, in Rust.
#[derive(Parser)]
#[command(name = "diffuse", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a protocol in the deterministic simulator over many seeds, with faults,
    /// and check every run for safety and liveness violations.
    Sim(sim::SimArgs),
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
        Command::Testnet(args) => testnet::run(args),
        Command::Node(args) => node::run(args),
        Command::Client(args) => client::run(args),
        Command::Keygen(args) => keygen::run(args),
    }
}
