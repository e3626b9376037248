//! `diffuse`: the command-line entry point.

mod keygen;
mod sim;

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
    /// Generate an Ed25519 key file for a replica or a client.
    Keygen(keygen::KeygenArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Sim(args) => sim::run(args),
        Command::Keygen(args) => keygen::run(args),
    }
}
