//! `diffuse node`: runs one replica until SIGINT or SIGTERM.

use crate::runtime::{LogLevel, block_on_threads, init_logging, shutdown_signal};
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
    /// Threads of the node's async runtime. With 1 (the default) the replica
    /// loop, its connections and its timers share one thread, and a message costs
    /// no wake-up of another thread (storage has a thread of its own either way);
    /// 0 runs one worker per core beside the replica loop. On two cores, one
    /// thread gave 3-7 % more throughput with 4 PBFT replicas and 10-19 % with 103
    /// FastBFT replicas (`docs/performance.md`).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Also shut down when stdin closes (used by `diffuse demo` and `bench`, so that
    /// their children never outlive them).
    #[arg(long, hide = true)]
    exit_on_stdin_close: bool,
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
    let watch_stdin = args.exit_on_stdin_close;
    let shutdown = async move {
        tokio::select! {
            () = shutdown_signal() => {}
            () = stdin_closed(), if watch_stdin => {}
        }
    };
    block_on_threads(args.threads, async {
        match diffuse_node::replica::run_node(settings, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("error: {error}");
                ExitCode::from(1)
            }
        }
    })
}

/// Completes when stdin reaches end of file (the parent process is gone).
async fn stdin_closed() {
    use tokio::io::AsyncReadExt;
    let mut stdin = tokio::io::stdin();
    let mut buf = [0u8; 64];
    while let Ok(read) = stdin.read(&mut buf).await {
        if read == 0 {
            break;
        }
    }
}
