//! `diffuse testnet`: keys and configuration files for a cluster.

use clap::Args;
use diffuse_node::testnet::{self, TestnetSpec};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

/// Arguments of `diffuse testnet`.
#[derive(Args)]
pub struct TestnetArgs {
    /// The protocol the cluster runs.
    #[arg(long, default_value = "pbft", value_parser = crate::runtime::PROTOCOLS)]
    protocol: String,
    /// Number of replicas (default: 4 for PBFT, 3 for MinBFT and FastBFT).
    #[arg(long)]
    n: Option<usize>,
    /// Number of client identities to register.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Clients share keys in consecutive groups of this many, so that one process
    /// can host a group on one connection per replica (docs/runtime.md, "Client
    /// hosts"); 1 gives every client a key of its own.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    clients_per_key: u32,
    /// The directory to write (existing files are never overwritten).
    #[arg(long)]
    out: PathBuf,
    /// Host of every replica, when --addresses is not given.
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// Port of replica 0; replica i listens on PORT + i.
    #[arg(long, default_value_t = 7100)]
    port: u16,
    /// Port of replica 0's metrics endpoint; replica i serves on METRICS_PORT + i
    /// (of its own host, with --addresses).
    #[arg(long, default_value_t = 9100)]
    metrics_port: u16,
    /// Explicit replica addresses (host:port, comma-separated, one per replica),
    /// for a cluster spread over machines.
    #[arg(long, value_delimiter = ',')]
    addresses: Vec<SocketAddr>,
}

pub fn run(mut args: TestnetArgs) -> ExitCode {
    match crate::runtime::cluster_size(&args.protocol, args.n) {
        Ok(n) => args.n = Some(n),
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(2);
        }
    }
    let mut spec = TestnetSpec::on_host(
        &args.protocol,
        args.n(),
        args.clients,
        args.host,
        args.port,
        Some(args.metrics_port),
    );
    spec.clients_per_key = args.clients_per_key as usize;
    if !args.addresses.is_empty() {
        if args.addresses.len() != args.n() {
            eprintln!(
                "error: --addresses lists {} addresses for {} replicas",
                args.addresses.len(),
                args.n()
            );
            return ExitCode::from(2);
        }
        spec.replica_addresses = args.addresses.clone();
        // Replica i serves metrics on METRICS_PORT + i of its own host, so that
        // replicas sharing a host never collide.
        spec.metrics_addresses = Some(
            args.addresses
                .iter()
                .enumerate()
                .map(|(i, a)| SocketAddr::new(a.ip(), args.metrics_port.saturating_add(i as u16)))
                .collect(),
        );
    }
    match testnet::write(&args.out, &spec) {
        Ok(written) => {
            let dir = written.dir.display();
            println!(
                "wrote a {}-replica {} cluster and {} client identities to {dir}",
                args.n(),
                args.protocol,
                args.clients
            );
            println!("start each replica:   diffuse node --config {dir}/replica-<i>.toml");
            println!(
                "then use the cluster: diffuse client --config {dir}/client-0.toml put greeting hello"
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::from(1)
        }
    }
}

impl TestnetArgs {
    /// The cluster size, resolved by `run` (see `runtime::cluster_size`).
    fn n(&self) -> usize {
        self.n.unwrap_or_default()
    }
}
