//! Fault mixes and the scenario of one run, drawn from its seed.
//!
//! A run has two phases. Before the global stabilisation time (GST) the network
//! loses, duplicates, reorders and partitions messages, and replicas crash and
//! restart (after a crash, or a scheduled shutdown). From GST on, every message between live nodes arrives within a bound and
//! every crashed replica is back; Byzantine replicas stay Byzantine. Safety is checked
//! over the whole run, liveness from GST on.

use crate::rng::SimRng;
use diffuse_core::ids::ReplicaId;
use diffuse_core::suite::Entropy;
use std::collections::BTreeMap;

const MS: u64 = 1_000_000;

/// Which faults a run injects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FaultMix {
    /// A clean network with random delays only.
    None,
    /// Loss, duplication, reordering, delay spikes and healing partitions.
    Network,
    /// Network faults plus crashes and restarts of correct replicas.
    Crash,
    /// Network faults plus scheduled restarts of correct replicas: each shuts down
    /// cleanly (an upgrade, say) and starts again. Not a fault for any protocol.
    Restart,
    /// `f` replicas with the named Byzantine behaviour, plus network faults; or, if
    /// the name is a client behaviour, one Byzantine client and network faults.
    Byzantine(String),
    /// Everything at once: network faults, crashes, up to `f` Byzantine replicas
    /// with behaviours drawn at random, and in half the runs a Byzantine client.
    Mixed,
}

/// What a protocol survives, as far as drawing scenarios goes (from its
/// [`diffuse_core::suite::ProtocolSuite`] constants).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tolerance {
    /// A reboot without a scheduled shutdown counts against `f` until the replica
    /// is back in.
    pub reboot_is_a_fault: bool,
    /// A faulty primary is replaced; if not, replica 0 stays correct and up.
    pub replaces_primary: bool,
    /// Restarted replicas take part again; if not, nothing restarts.
    pub survives_restarts: bool,
}

impl Tolerance {
    /// The tolerance of protocol `P`.
    pub fn of<P: diffuse_core::suite::ProtocolSuite>() -> Tolerance {
        Tolerance {
            reboot_is_a_fault: P::REBOOT_IS_A_FAULT,
            replaces_primary: P::REPLACES_PRIMARY,
            survives_restarts: P::SURVIVES_RESTARTS,
        }
    }

    /// Everything: what PBFT survives.
    pub const FULL: Tolerance = Tolerance {
        reboot_is_a_fault: false,
        replaces_primary: true,
        survives_restarts: true,
    };
}

impl FaultMix {
    /// Whether a protocol with `tolerance` can be judged under this mix.
    pub fn applies_to(&self, tolerance: Tolerance) -> bool {
        tolerance.survives_restarts || !matches!(self, FaultMix::Crash | FaultMix::Restart)
    }

    /// The mix's command-line name.
    pub fn name(&self) -> &str {
        match self {
            FaultMix::None => "none",
            FaultMix::Network => "network",
            FaultMix::Crash => "crash",
            FaultMix::Restart => "restart",
            FaultMix::Byzantine(behaviour) => behaviour,
            FaultMix::Mixed => "mixed",
        }
    }

    /// Every mix, given the available Byzantine behaviours, in the order `--faults all`
    /// cycles through them.
    pub fn all(behaviours: &[&str]) -> Vec<FaultMix> {
        let mut mixes = vec![
            FaultMix::None,
            FaultMix::Network,
            FaultMix::Crash,
            FaultMix::Restart,
        ];
        mixes.extend(
            behaviours
                .iter()
                .map(|b| FaultMix::Byzantine(b.to_string())),
        );
        mixes.push(FaultMix::Mixed);
        mixes
    }

    /// Parses a mix name.
    pub fn parse(name: &str, behaviours: &[&str]) -> Option<FaultMix> {
        match name {
            "none" => Some(FaultMix::None),
            "network" => Some(FaultMix::Network),
            "crash" => Some(FaultMix::Crash),
            "restart" => Some(FaultMix::Restart),
            "mixed" => Some(FaultMix::Mixed),
            other if behaviours.contains(&other) => Some(FaultMix::Byzantine(other.to_string())),
            _ => None,
        }
    }
}

/// Network behaviour before and after GST.
#[derive(Debug, Clone)]
pub struct NetworkModel {
    /// Probability of losing a message before GST, in parts per million.
    pub loss_ppm: u64,
    /// Probability of duplicating a message before GST, in parts per million.
    pub duplicate_ppm: u64,
    /// Smallest one-way delay.
    pub latency_min_ns: u64,
    /// Largest ordinary one-way delay before GST.
    pub latency_max_ns: u64,
    /// Probability of a delay spike before GST, in parts per million.
    pub spike_ppm: u64,
    /// Largest extra delay of a spike.
    pub spike_max_ns: u64,
    /// Largest one-way delay after GST: the synchrony bound.
    pub stable_latency_max_ns: u64,
}

/// Replicas cut off from the rest for a while (before GST).
#[derive(Debug, Clone)]
pub struct Partition {
    /// Start of the partition.
    pub start_ns: u64,
    /// When it heals.
    pub end_ns: u64,
    /// The replicas on the small side.
    pub isolated: Vec<ReplicaId>,
    /// If true only messages *to* the isolated side are lost.
    pub one_way: bool,
}

/// A crash (or a scheduled shutdown) and the later restart of a correct replica.
#[derive(Debug, Clone)]
pub struct CrashRestart {
    /// The replica.
    pub replica: ReplicaId,
    /// When it crashes.
    pub crash_ns: u64,
    /// When it restarts from its persisted state.
    pub restart_ns: u64,
    /// A scheduled shutdown rather than a crash: the replica gets to seal what it
    /// keeps outside its store (`Replica::shutdown`).
    pub scheduled: bool,
}

/// The client workload.
#[derive(Debug, Clone)]
pub struct WorkloadModel {
    /// Number of clients.
    pub clients: usize,
    /// Operations per client.
    pub ops_per_client: usize,
    /// Number of distinct keys (few keys: much contention).
    pub keys: usize,
    /// Largest think time between a completion and the next invocation.
    pub think_max_ns: u64,
}

/// Everything that will happen to one run, drawn from its seed.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// The fault mix.
    pub mix: FaultMix,
    /// Global stabilisation time.
    pub gst_ns: u64,
    /// The network.
    pub network: NetworkModel,
    /// Partitions (all heal before GST).
    pub partitions: Vec<Partition>,
    /// Crashes (all restart before GST).
    pub crashes: Vec<CrashRestart>,
    /// Byzantine replicas and their behaviour names.
    pub byzantine: BTreeMap<ReplicaId, String>,
    /// The behaviour of the Byzantine client (client 0), if there is one.
    pub byzantine_client: Option<String>,
    /// The workload.
    pub workload: WorkloadModel,
}

impl Scenario {
    /// Draws the scenario of a run with `n` replicas tolerating `f` faults, given
    /// the replica and the client behaviours available.
    pub fn draw(
        mix: &FaultMix,
        n: usize,
        f: usize,
        behaviours: &[&str],
        client_behaviours: &[&str],
        tolerance: Tolerance,
        rng: &mut SimRng,
    ) -> Scenario {
        let reboot_is_a_fault = tolerance.reboot_is_a_fault;
        let gst_ns = rng.between(500, 3000) * MS;
        let hostile = !matches!(mix, FaultMix::None);
        let network = if hostile {
            NetworkModel {
                loss_ppm: rng.between(0, 100_000),
                duplicate_ppm: rng.between(0, 50_000),
                latency_min_ns: MS,
                latency_max_ns: rng.between(2, 30) * MS,
                spike_ppm: rng.between(0, 50_000),
                spike_max_ns: rng.between(50, 400) * MS,
                stable_latency_max_ns: 10 * MS,
            }
        } else {
            NetworkModel {
                loss_ppm: 0,
                duplicate_ppm: 0,
                latency_min_ns: MS,
                latency_max_ns: 5 * MS,
                spike_ppm: 0,
                spike_max_ns: 0,
                stable_latency_max_ns: 5 * MS,
            }
        };
        let client_mix =
            matches!(mix, FaultMix::Byzantine(name) if client_behaviours.contains(&name.as_str()));
        let byzantine = if client_mix {
            BTreeMap::new()
        } else {
            Self::draw_byzantine(mix, n, f, behaviours, tolerance.replaces_primary, rng)
        };
        let partitions = if matches!(
            mix,
            FaultMix::Network | FaultMix::Crash | FaultMix::Restart | FaultMix::Mixed
        ) {
            (0..rng.between(0, 3))
                .map(|_| Self::draw_partition(n, gst_ns, rng))
                .collect()
        } else {
            Vec::new()
        };
        let crashes = if !tolerance.survives_restarts {
            Vec::new()
        } else if matches!(mix, FaultMix::Crash | FaultMix::Mixed) {
            let mut correct: Vec<ReplicaId> = (0..n as u16)
                .map(ReplicaId)
                .filter(|r| !byzantine.contains_key(r))
                .filter(|r| tolerance.replaces_primary || r.0 != 0)
                .collect();
            if reboot_is_a_fault {
                // Crashed replicas are faults until they rejoin: keep the total at f.
                let budget = f.saturating_sub(byzantine.len());
                let start = rng.between(0, correct.len().saturating_sub(1) as u64) as usize;
                correct.rotate_left(start);
                correct.truncate(budget);
            }
            if correct.is_empty() {
                Vec::new()
            } else {
                (0..rng.between(1, 3))
                    .map(|_| {
                        let crash_ns = rng.between(0, gst_ns * 3 / 4);
                        CrashRestart {
                            replica: *rng.pick(&correct),
                            crash_ns,
                            restart_ns: rng.between(crash_ns + 10 * MS, gst_ns),
                            scheduled: false,
                        }
                    })
                    .collect()
            }
        } else if *mix == FaultMix::Restart {
            Self::draw_scheduled_restarts(n, gst_ns, &byzantine, rng)
        } else {
            Vec::new()
        };
        let workload = WorkloadModel {
            clients: rng.between(2, 4) as usize,
            ops_per_client: rng.between(20, 40) as usize,
            keys: rng.between(2, 6) as usize,
            think_max_ns: rng.between(0, 30) * MS,
        };
        // Drawn last, so that the rest of a scenario does not depend on whether the
        // protocol has client behaviours.
        let byzantine_client = match mix {
            FaultMix::Byzantine(name) if client_mix => Some(name.clone()),
            FaultMix::Mixed if !client_behaviours.is_empty() && rng.chance(1, 2) => {
                Some(rng.pick(client_behaviours).to_string())
            }
            _ => None,
        };
        Scenario {
            mix: mix.clone(),
            gst_ns,
            network,
            partitions,
            crashes,
            byzantine,
            byzantine_client,
            workload,
        }
    }

    /// One to three scheduled restarts of correct replicas (a rolling upgrade,
    /// say), at most one replica down at a time.
    fn draw_scheduled_restarts(
        n: usize,
        gst_ns: u64,
        byzantine: &BTreeMap<ReplicaId, String>,
        rng: &mut SimRng,
    ) -> Vec<CrashRestart> {
        let correct: Vec<ReplicaId> = (0..n as u16)
            .map(ReplicaId)
            .filter(|r| !byzantine.contains_key(r))
            .collect();
        let mut restarts = Vec::new();
        let mut free_from = 0;
        for _ in 0..rng.between(1, 3) {
            let crash_ns = rng.between(free_from, (free_from + gst_ns / 2).min(gst_ns * 3 / 4));
            let restart_ns = rng.between(crash_ns + 10 * MS, gst_ns);
            restarts.push(CrashRestart {
                replica: *rng.pick(&correct),
                crash_ns,
                restart_ns,
                scheduled: true,
            });
            if restart_ns + MS >= gst_ns * 3 / 4 {
                break;
            }
            free_from = restart_ns + MS;
        }
        restarts
    }

    fn draw_byzantine(
        mix: &FaultMix,
        n: usize,
        f: usize,
        behaviours: &[&str],
        replaces_primary: bool,
        rng: &mut SimRng,
    ) -> BTreeMap<ReplicaId, String> {
        let mut byzantine = BTreeMap::new();
        // A mix named after a behaviour runs it at full strength (f faulty replicas);
        // `mixed` draws how many, and which behaviours.
        let count = match mix {
            FaultMix::Byzantine(_) => f,
            FaultMix::Mixed if f > 0 => rng.between(1, f as u64) as usize,
            _ => 0,
        };
        // The first primary is faulty in most runs: that is where the interesting
        // attacks are (equivocation, stalling, bad NEW-VIEWs after it rotates back).
        let mut candidates: Vec<ReplicaId> = (0..n as u16).map(ReplicaId).collect();
        if !replaces_primary {
            candidates.retain(|r| r.0 != 0);
        } else if count > 0 && rng.chance(3, 4) {
            candidates.retain(|r| r.0 != 0);
            byzantine.insert(ReplicaId(0), Self::behaviour_for(mix, behaviours, rng));
        }
        while byzantine.len() < count {
            let index = rng.below(candidates.len() as u64) as usize;
            let replica = candidates.swap_remove(index);
            byzantine.insert(replica, Self::behaviour_for(mix, behaviours, rng));
        }
        byzantine
    }

    fn behaviour_for(mix: &FaultMix, behaviours: &[&str], rng: &mut SimRng) -> String {
        match mix {
            FaultMix::Byzantine(name) => name.clone(),
            _ => rng.pick(behaviours).to_string(),
        }
    }

    fn draw_partition(n: usize, gst_ns: u64, rng: &mut SimRng) -> Partition {
        let start_ns = rng.between(0, gst_ns * 3 / 4);
        let end_ns = rng.between(start_ns + 50 * MS, gst_ns);
        let size = rng.between(1, (n as u64 / 2).max(1));
        let mut isolated: Vec<ReplicaId> = Vec::new();
        while isolated.len() < size as usize {
            let r = ReplicaId(rng.below(n as u64) as u16);
            if !isolated.contains(&r) {
                isolated.push(r);
            }
        }
        Partition {
            start_ns,
            end_ns,
            isolated,
            one_way: rng.chance(1, 4),
        }
    }
}
