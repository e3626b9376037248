//! `diffuse client`: one key-value operation against a running cluster.

use crate::runtime::{LogLevel, block_on, init_logging};
use clap::{Args, Subcommand};
use diffuse_node::client::KvClient;
use diffuse_node::config::ClientConfig;
use std::path::PathBuf;
use std::process::ExitCode;

/// Arguments of `diffuse client`.
#[derive(Args)]
pub struct ClientArgs {
    /// The client's configuration file (written by `diffuse testnet`).
    #[arg(long)]
    config: PathBuf,
    /// Log verbosity (logs go to stderr).
    #[arg(long, value_enum, default_value = "warn")]
    log: LogLevel,
    #[command(subcommand)]
    operation: Operation,
}

/// A key-value operation.
#[derive(Subcommand)]
enum Operation {
    /// Store VALUE under KEY.
    Put { key: String, value: String },
    /// Print the value of KEY (exit status 1 if it is absent).
    Get { key: String },
    /// Store NEW under KEY if it holds OLD (or, with --if-absent, if it is absent).
    Cas {
        /// Swap only if KEY is absent; then give KEY and NEW only.
        #[arg(long)]
        if_absent: bool,
        key: String,
        /// OLD NEW, or NEW with --if-absent.
        #[arg(num_args = 1..=2, required = true)]
        values: Vec<String>,
    },
    /// Remove KEY (exit status 1 if it was absent).
    Delete { key: String },
}

pub fn run(args: ClientArgs) -> ExitCode {
    init_logging(args.log);
    let settings = match ClientConfig::load(&args.config) {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(2);
        }
    };
    block_on(async move {
        let mut kv = match KvClient::connect(settings).await {
            Ok(kv) => kv,
            Err(error) => {
                eprintln!("error: {error}");
                return ExitCode::from(2);
            }
        };
        let outcome = match args.operation {
            Operation::Put { key, value } => {
                kv.put(key.as_bytes(), value.as_bytes()).await.map(|()| {
                    println!("ok");
                    true
                })
            }
            Operation::Get { key } => kv.get(key.as_bytes()).await.map(|value| match value {
                Some(value) => {
                    println!("{}", String::from_utf8_lossy(&value));
                    true
                }
                None => {
                    eprintln!("{key}: absent");
                    false
                }
            }),
            Operation::Cas {
                if_absent,
                key,
                values,
            } => {
                let (old, new) = match (if_absent, values.as_slice()) {
                    (true, [new]) => (None, new),
                    (false, [old, new]) => (Some(old.as_bytes()), new),
                    _ => {
                        eprintln!("error: give KEY OLD NEW, or --if-absent KEY NEW");
                        return ExitCode::from(2);
                    }
                };
                kv.cas(key.as_bytes(), old, new.as_bytes())
                    .await
                    .map(|(swapped, previous)| {
                        let previous = previous.map_or("(absent)".to_string(), |p| {
                            String::from_utf8_lossy(&p).into_owned()
                        });
                        println!(
                            "{} (was {previous})",
                            if swapped { "swapped" } else { "not swapped" }
                        );
                        swapped
                    })
            }
            Operation::Delete { key } => kv.delete(key.as_bytes()).await.inspect(|existed| {
                println!("{}", if *existed { "deleted" } else { "absent" });
            }),
        };
        match outcome {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::from(1),
            Err(error) => {
                eprintln!("error: {error}");
                ExitCode::from(1)
            }
        }
    })
}
