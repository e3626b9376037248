//! What the commands that run real nodes share: logging, the tokio runtime and
//! shutdown on SIGINT / SIGTERM.

use std::process::ExitCode;

/// Log verbosity of the runtime commands.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    /// The level's name as `--log` takes it.
    pub fn name(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}

/// Sends `tracing` output to stderr at `level`.
pub fn init_logging(level: LogLevel) {
    let level = match level {
        LogLevel::Error => tracing::Level::ERROR,
        LogLevel::Warn => tracing::Level::WARN,
        LogLevel::Info => tracing::Level::INFO,
        LogLevel::Debug => tracing::Level::DEBUG,
        LogLevel::Trace => tracing::Level::TRACE,
    };
    let _ = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}

/// Runs `work` to completion on a multi-threaded tokio runtime, or reports why
/// the runtime cannot start.
pub fn block_on(work: impl std::future::Future<Output = ExitCode>) -> ExitCode {
    block_on_threads(0, work)
}

/// Runs `work` to completion on a tokio runtime with `threads` worker threads: 0
/// for one per core, 1 for everything on the calling thread.
pub fn block_on_threads(
    threads: usize,
    work: impl std::future::Future<Output = ExitCode>,
) -> ExitCode {
    let built = match threads {
        1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        0 => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build(),
    };
    match built {
        Ok(runtime) => runtime.block_on(work),
        Err(error) => {
            eprintln!("error: cannot start the runtime: {error}");
            ExitCode::from(1)
        }
    }
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            match signal(SignalKind::terminate()) {
                Ok(mut term) => {
                    tokio::select! {
                        _ = tokio::signal::ctrl_c() => {}
                        _ = term.recv() => {}
                    }
                }
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// The protocols the runtime commands can run.
pub const PROTOCOLS: [&str; 3] = diffuse_node::protocols::NAMES;

/// The smallest cluster of `protocol` that tolerates `f` faults (PBFT 3f + 1,
/// MinBFT and FastBFT 2f + 1), from the protocol's own quorum system.
pub fn smallest_cluster_for(protocol: &str, f: usize) -> Result<usize, String> {
    let tolerated = |n: usize| diffuse_node::protocols::quorum(protocol, n).map(|q| q.f());
    if f == 0 || f > MAX_COMPARED_FAULTS {
        return Err(format!("f = {f}: expected 1 to {MAX_COMPARED_FAULTS}"));
    }
    (1..=3 * f + 1)
        .find(|&n| tolerated(n) == Ok(f))
        .ok_or_else(|| format!("{protocol} has no cluster that tolerates f = {f}"))
}

/// The most faults `smallest_cluster_for` accepts (a local cluster of a hundred
/// processes is about what one machine runs).
pub const MAX_COMPARED_FAULTS: usize = 33;

/// The cluster size for `protocol`: `n` if given (checked against the protocol's
/// fault model), else the smallest that tolerates one fault (4 for PBFT, 3 for
/// MinBFT and FastBFT).
pub fn cluster_size(protocol: &str, n: Option<usize>) -> Result<usize, String> {
    let n = n.unwrap_or(if diffuse_node::protocols::is_hybrid(protocol) {
        3
    } else {
        4
    });
    match diffuse_node::protocols::quorum(protocol, n) {
        Ok(q) if q.f() >= 1 => Ok(n),
        Ok(_) => Err(format!("{protocol} with n = {n} tolerates no fault")),
        Err(error) => Err(error.to_string()),
    }
}
