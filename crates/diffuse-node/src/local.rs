//! A cluster of `diffuse node` child processes on loopback, for the demo, the
//! benchmark and the real-process tests.
//!
//! Children are started with a pipe on stdin and the hidden `--exit-on-stdin-close`
//! flag: if this process dies, even by SIGKILL, the pipe closes and they shut down.
//! Dropping a [`LocalCluster`] kills them.

use crate::config::{ClientConfig, ClientSettings, SettingsError};
use crate::testnet::{self, Testnet, TestnetSpec};
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Child replica processes of one cluster.
pub struct LocalCluster {
    exe: PathBuf,
    /// The testnet the processes run.
    pub testnet: Testnet,
    metrics: Vec<Option<SocketAddr>>,
    children: Vec<Option<Child>>,
    log: String,
}

impl LocalCluster {
    /// Writes a fresh testnet into `dir` (free loopback ports, metrics on) and
    /// starts every replica with the `diffuse` binary at `exe`.
    pub fn start(
        exe: &Path,
        dir: &Path,
        protocol: &str,
        n: usize,
        clients: usize,
    ) -> std::io::Result<LocalCluster> {
        let mut cluster =
            LocalCluster::prepare(exe, dir, protocol, n, clients, toml::Table::new())?;
        cluster.start_all()?;
        Ok(cluster)
    }

    /// Writes a fresh testnet into `dir` with protocol options for every member,
    /// and starts nothing yet (set the log level, then
    /// [`LocalCluster::start_all`]).
    pub fn prepare(
        exe: &Path,
        dir: &Path,
        protocol: &str,
        n: usize,
        clients: usize,
        options: toml::Table,
    ) -> std::io::Result<LocalCluster> {
        Self::prepare_hosted(exe, dir, protocol, n, clients, options, 1)
    }

    /// [`LocalCluster::prepare`] with clients sharing keys in groups of
    /// `clients_per_key`, so that one process can host each group on one
    /// connection per replica.
    pub fn prepare_hosted(
        exe: &Path,
        dir: &Path,
        protocol: &str,
        n: usize,
        clients: usize,
        options: toml::Table,
        clients_per_key: usize,
    ) -> std::io::Result<LocalCluster> {
        let host = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let ports = testnet::free_ports(host, 2 * n)?;
        let spec = TestnetSpec {
            protocol: protocol.to_string(),
            n,
            clients,
            replica_addresses: ports[..n]
                .iter()
                .map(|p| SocketAddr::new(host, *p))
                .collect(),
            metrics_addresses: Some(
                ports[n..]
                    .iter()
                    .map(|p| SocketAddr::new(host, *p))
                    .collect(),
            ),
            options,
            clients_per_key,
        };
        let testnet = testnet::write(dir, &spec)?;
        Ok(LocalCluster::new(
            exe,
            testnet,
            spec.metrics_addresses.unwrap_or_default(),
        ))
    }

    /// Starts every replica (again).
    pub fn start_all(&mut self) -> std::io::Result<()> {
        for i in 0..self.n() {
            self.restart(i)?;
        }
        Ok(())
    }

    /// Manages the replicas of an existing testnet (nothing is started yet).
    pub fn new(exe: &Path, testnet: Testnet, metrics: Vec<SocketAddr>) -> LocalCluster {
        let n = testnet.replicas.len();
        LocalCluster {
            exe: exe.to_path_buf(),
            metrics: (0..n).map(|i| metrics.get(i).copied()).collect(),
            children: (0..n).map(|_| None).collect(),
            testnet,
            log: "warn".into(),
        }
    }

    /// Sets the log level of replicas started from now on.
    pub fn set_log_level(&mut self, level: &str) {
        self.log = level.to_string();
    }

    /// Number of replicas.
    pub fn n(&self) -> usize {
        self.children.len()
    }

    /// Where replica `i` writes its log.
    pub fn log_path(&self, i: usize) -> PathBuf {
        self.testnet.dir.join(format!("replica-{i}.log"))
    }

    /// Starts replica `i` (again), appending to its log.
    pub fn restart(&mut self, i: usize) -> std::io::Result<()> {
        self.kill(i);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(i))?;
        let child = Command::new(&self.exe)
            .arg("node")
            .arg("--config")
            .arg(&self.testnet.replicas[i])
            .arg("--log")
            .arg(&self.log)
            .arg("--exit-on-stdin-close")
            .stdin(Stdio::piped())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.children[i] = Some(child);
        Ok(())
    }

    /// Kills replica `i` with SIGKILL (no chance to clean up), if it runs.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.children[i].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops replica `i` cleanly: closes its stdin and waits up to five seconds.
    pub fn stop(&mut self, i: usize) {
        if let Some(mut child) = self.children[i].take() {
            drop(child.stdin.take());
            for _ in 0..50 {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether replica `i` runs (it may have exited on its own).
    pub fn is_running(&mut self, i: usize) -> bool {
        match self.children[i].as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The process id of replica `i`, if it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.children[i].as_ref().map(Child::id)
    }

    /// Settings of client identity `j`.
    pub fn client(&self, j: usize) -> Result<ClientSettings, SettingsError> {
        ClientConfig::load(&self.testnet.clients[j])
    }

    /// Replica `i`'s metrics in Prometheus text, if it answers.
    pub fn metrics(&self, i: usize) -> Option<String> {
        scrape(self.metrics.get(i).copied().flatten()?)
    }

    /// The value of metric `name` (without labels) at replica `i`.
    pub fn metric(&self, i: usize, name: &str) -> Option<f64> {
        metric_value(&self.metrics(i)?, name)
    }

    /// The highest view any running replica reports.
    pub fn view(&mut self) -> Option<u64> {
        (0..self.n())
            .filter(|i| self.children[*i].is_some())
            .filter_map(|i| self.metric(i, "diffuse_view"))
            .map(|v| v as u64)
            .max()
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for i in 0..self.children.len() {
            self.kill(i);
        }
    }
}

/// Fetches `GET /metrics` from `address` with a short deadline.
pub fn scrape(address: SocketAddr) -> Option<String> {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_millis(500)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (_, body) = response.split_once("\r\n\r\n")?;
    Some(body.to_string())
}

/// The value of an unlabelled metric in Prometheus text.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (metric, value) = line.split_once(' ')?;
            (metric == name)
                .then(|| value.trim().parse().ok())
                .flatten()
        })
}
