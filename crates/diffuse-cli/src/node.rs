//! `diffuse node`: runs one replica until SIGINT or SIGTERM.

use crate::runtime::{LogLevel, init_logging, shutdown_signal, tokio_runtime};
use clap::Args;
use diffuse_node::config::NodeConfig;
use std::path::PathBuf;
use std::process::ExitCode;

/// Arguments of `diffuse node`.
#[derive(Args)]
pub struct NodeArgs {
    /// The replica's configuration file (written by `diffuse testnet`).
    #[arg(long)]
    config: PathBuf,
    /// Log verbosity (logs go to stderr).
    #[arg(long, value_enum, default_value = "info")]
    log: LogLevel,
}

pub fn run(args: NodeArgs) -> ExitCode {
    init_logging(args.log);
    let settings = match NodeConfig::load(&args.config) {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio_runtime() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the runtime: {error}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(diffuse_node::replica::run_node(settings, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::from(1)
        }
    }
}
