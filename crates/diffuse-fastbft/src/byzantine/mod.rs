//! FastBFT-specific Byzantine behaviours for the simulator.
//!
//! Each runs on top of an honest replica and rewrites its traffic. An active
//! replica can spoil or withhold its part of a secret, and lie about its children;
//! any replica can send forged UPDATEs and REPLYs, and requests no client sent
//! (`forge-requests`); a primary can equivocate
//! through its host and send bad NEW-VIEWs (`primary`), or have its host run a
//! rolled-back copy of its enclave (`rollback`), which only an enclave without
//! rollback protection lets certify anything. None of it may break safety; the
//! tree rebuilds restore liveness without a view change when the primary is
//! correct, a view change when it is not.

mod primary;
mod rollback;

use crate::message::{ClientReply, Message, Suspect, TreeConfig, Update};
use crate::options::FastBftOptions;
use diffuse_apps::kv::KvResult;
use diffuse_core::codec::{Blob, BoundedVec};
use diffuse_core::ids::{NodeId, ReplicaId};
use diffuse_core::suite::{Behaviour, Coalition, Entropy, Named, Outgoing, ReplicaSetup};
use diffuse_pbft::message::Batch;
use diffuse_tee::{Share, Tree};
use std::collections::BTreeSet;

/// The FastBFT-specific behaviours.
pub const BEHAVIOURS: &[Named] = &[
    Named {
        name: "wrong-share",
        description: "as an active replica, sends random aggregates up the tree: its parent must catch it and the primary rebuild the tree",
    },
    Named {
        name: "silent-active",
        description: "sends nothing at all: as an active replica its parent times out and the primary replaces it",
    },
    Named {
        name: "false-accuse",
        description: "as an active replica with children, accuses its first child of every round it takes part in: the primary moves it to a leaf",
    },
    Named {
        name: "withhold-reply-share",
        description: "as an active replica, opens PREPAREs but withholds its aggregate of every COMMIT's secret",
    },
    Named {
        name: "equivocate",
        description: "as primary, sends some active replicas a second PREPARE for a sequence number, with another batch, certified at the next counter value, instead of the first",
    },
    Named {
        name: "rollback",
        description: "as primary, has its host restore an old sealed enclave state to certify an empty PREPARE, then its COMMIT, at the positions of its first PREPARE and that PREPARE's COMMIT, and sends them to the upper half of the active backups (a protected enclave comes up locked)",
    },
    Named {
        name: "bad-new-view",
        description: "as primary orders nothing; as a new primary, certifies and sends a NEW-VIEW with a decision that drops its last batch, only f VIEW-CHANGEs, or an impossible tree",
    },
    Named {
        name: "forge-requests",
        description: "for each client request it sees (from the client, or in a PREPARE or UPDATE), sends every replica, itself included, a request that client never sent: a put of a fresh value to the key it used, at a timestamp far ahead, signed with the replica's own key; only the primary's enclave's check keeps it out of the batches",
    },
    Named {
        name: "forge-update",
        description: "on each PREPARE it sees, sends every other backup a forged UPDATE (an empty batch at that sequence number, random secrets) and every client of the batch a forged REPLY",
    },
];

/// Builds the behaviour `name` for the replica of `setup`.
pub fn build(
    name: &str,
    setup: &ReplicaSetup<FastBftOptions>,
    _coalition: &Coalition,
) -> Option<Box<dyn Behaviour<Message>>> {
    let me = setup.id;
    let n = setup.keys.n();
    match name {
        "wrong-share" => Some(Box::new(WrongShare)),
        "silent-active" => Some(Box::new(Silent)),
        "false-accuse" => Some(Box::new(FalseAccuse { me, config: None })),
        "withhold-reply-share" => Some(Box::new(WithholdReplyShare {
            commits: BTreeSet::new(),
        })),
        "forge-update" => Some(Box::new(ForgeUpdate { me, n })),
        "forge-requests" => Some(Box::new(ForgeRequests {
            me,
            n,
            secret: setup.secret.clone(),
            forged: BTreeSet::new(),
        })),
        "equivocate" => Some(Box::new(primary::Equivocate::new(setup))),
        "bad-new-view" => Some(Box::new(primary::BadNewView::new(setup))),
        "rollback" => Some(Box::new(rollback::Rollback::new(setup))),
        _ => None,
    }
}

fn random_share(entropy: &mut dyn Entropy) -> Share {
    let mut bytes = [0u8; 32];
    for chunk in bytes.chunks_mut(8) {
        chunk.copy_from_slice(&entropy.next_u64().to_le_bytes());
    }
    Share(bytes)
}

struct WrongShare;

impl Behaviour<Message> for WrongShare {
    fn outgoing(
        &mut self,
        to: NodeId,
        mut message: Message,
        entropy: &mut dyn Entropy,
        out: &mut Vec<Outgoing<Message>>,
    ) {
        if let Message::Share(share) = &mut message {
            share.aggregate = random_share(entropy);
        }
        out.push(Outgoing::now(to, message));
    }
}

struct Silent;

impl Behaviour<Message> for Silent {
    fn outgoing(
        &mut self,
        _to: NodeId,
        _message: Message,
        _entropy: &mut dyn Entropy,
        _out: &mut Vec<Outgoing<Message>>,
    ) {
    }
}

struct FalseAccuse {
    me: ReplicaId,
    config: Option<TreeConfig>,
}

impl FalseAccuse {
    fn first_child(&self) -> Option<ReplicaId> {
        let config = self.config.as_ref()?;
        let i = config.actives.iter().position(|r| *r == self.me)?;
        let tree = Tree::balanced(config.actives.len(), usize::from(config.fan_out)).ok()?;
        tree.children(i).next().map(|c| config.actives[c])
    }
}

impl Behaviour<Message> for FalseAccuse {
    fn incoming(
        &mut self,
        from: NodeId,
        message: &Message,
        _entropy: &mut dyn Entropy,
        out: &mut Vec<Outgoing<Message>>,
    ) -> bool {
        let round = match message {
            Message::NewTree(new_tree) => {
                self.config = Some(new_tree.config.clone());
                None
            }
            Message::Prepare(p) => Some((p.cert.view, p.cert.counter)),
            Message::Commit(c) => Some((c.cert.view, c.cert.counter)),
            _ => None,
        };
        if let (Some((epoch, counter)), Some(accused)) = (round, self.first_child()) {
            let suspect = Suspect {
                epoch,
                counter,
                accused,
            };
            out.push(Outgoing::now(from, Message::Suspect(suspect)));
        }
        true
    }
}

struct WithholdReplyShare {
    commits: BTreeSet<(u64, u64)>,
}

impl Behaviour<Message> for WithholdReplyShare {
    fn outgoing(
        &mut self,
        to: NodeId,
        message: Message,
        _entropy: &mut dyn Entropy,
        out: &mut Vec<Outgoing<Message>>,
    ) {
        if let Message::Share(share) = &message
            && self.commits.contains(&(share.epoch, share.counter))
        {
            return;
        }
        out.push(Outgoing::now(to, message));
    }

    fn incoming(
        &mut self,
        _from: NodeId,
        message: &Message,
        _entropy: &mut dyn Entropy,
        _out: &mut Vec<Outgoing<Message>>,
    ) -> bool {
        if let Message::Commit(commit) = message {
            self.commits.insert((commit.cert.view, commit.cert.counter));
            while self.commits.len() > 1024 {
                self.commits.pop_first();
            }
        }
        true
    }
}

/// Requests forged for, at most (then it stops).
const MAX_FORGED: usize = 4096;

/// Sends every replica (itself included: as primary, its own host hands the
/// request to its enclave like any other) a forged twin of each client request it
/// sees: the same client, a timestamp `2^40` ahead, a put of a value no client
/// writes to the key the genuine operation used, signed with this replica's key.
/// The primary's host does not check signatures (its enclave does, for the whole
/// batch), so the twin reaches the enclave, which must refuse it: were it ordered,
/// a client would read a value no client wrote (linearizability), and its own
/// later requests would be stale (liveness). The backups check the signature on
/// arrival and blame this replica.
struct ForgeRequests {
    me: ReplicaId,
    n: usize,
    secret: diffuse_core::crypto::SecretKey,
    /// `(client, timestamp)` of the requests forged for already.
    forged: BTreeSet<(diffuse_core::ids::ClientId, u64)>,
}

impl ForgeRequests {
    fn forge(
        &mut self,
        genuine: &diffuse_pbft::message::Request,
        out: &mut Vec<Outgoing<Message>>,
    ) {
        use diffuse_apps::kv::KvOp;
        if self.forged.len() >= MAX_FORGED
            || !self.forged.insert((genuine.client, genuine.timestamp))
        {
            return;
        }
        let Ok(op) = KvOp::decode(&genuine.operation) else {
            return;
        };
        let text = format!(
            "forged by r{} for c{} t{}",
            self.me.0, genuine.client.0, genuine.timestamp
        );
        let Ok(value) = Blob::try_from_vec(text.into_bytes()) else {
            return;
        };
        let Ok(key) = Blob::try_from_vec(op.key().to_vec()) else {
            return;
        };
        let forged_op = KvOp::Put { key, value };
        let Ok(operation) = Blob::try_from_vec(forged_op.encode()) else {
            return;
        };
        let body = diffuse_pbft::message::RequestBody {
            client: genuine.client,
            timestamp: genuine.timestamp.saturating_add(1 << 40),
            operation,
        };
        let request = diffuse_pbft::message::Request {
            signed: diffuse_core::crypto::Signed::sign(body, &self.secret),
            authenticator: Default::default(),
        };
        for r in (0..self.n as u16).map(ReplicaId) {
            out.push(Outgoing::now(r.into(), Message::Request(request.clone())));
        }
    }
}

impl Behaviour<Message> for ForgeRequests {
    fn incoming(
        &mut self,
        from: NodeId,
        message: &Message,
        _entropy: &mut dyn Entropy,
        out: &mut Vec<Outgoing<Message>>,
    ) -> bool {
        match message {
            Message::Request(request) if matches!(from, NodeId::Client(_)) => {
                self.forge(request, out);
            }
            Message::Prepare(prepare) => {
                for request in prepare.batch.requests.iter() {
                    self.forge(request, out);
                }
            }
            Message::Update(update) => {
                for request in update.batch.requests.iter() {
                    self.forge(request, out);
                }
            }
            _ => {}
        }
        true
    }
}

struct ForgeUpdate {
    me: ReplicaId,
    n: usize,
}

impl Behaviour<Message> for ForgeUpdate {
    fn incoming(
        &mut self,
        _from: NodeId,
        message: &Message,
        entropy: &mut dyn Entropy,
        out: &mut Vec<Outgoing<Message>>,
    ) -> bool {
        let Message::Prepare(prepare) = message else {
            return true;
        };
        let opened = |entropy: &mut dyn Entropy| crate::message::Opened {
            commitment: diffuse_core::crypto::Signed {
                value: diffuse_tee::SecretCommitment {
                    secret_hash: diffuse_core::crypto::Digest([7; 32]),
                    counter: prepare.cert.counter,
                    view: prepare.cert.view,
                },
                signature: prepare.cert.signature,
            },
            secret: random_share(entropy),
        };
        let update = Update {
            seq: prepare.seq,
            batch: Batch::default().into(),
            checkpoint: None,
            results_root: diffuse_core::crypto::Digest([9; 32]),
            state: None,
            prepare_cert: prepare.cert.clone(),
            prepared: opened(entropy),
            commit_cert: prepare.cert.clone(),
            replied: opened(entropy),
        };
        for r in (1..self.n as u16).map(ReplicaId) {
            if r != self.me {
                out.push(Outgoing::now(r.into(), Message::Update(update.clone())));
            }
        }
        let Ok(value) = Blob::try_from_vec(b"forged".to_vec()) else {
            return true;
        };
        let Ok(result) = Blob::try_from_vec(KvResult::Value(Some(value)).encode()) else {
            return true;
        };
        for request in prepare.batch.requests.iter() {
            let reply = ClientReply {
                client: request.client,
                timestamp: request.timestamp,
                result: result.clone(),
                seq: prepare.seq,
                index: 0,
                len: 1,
                request_path: BoundedVec::new(),
                result_path: BoundedVec::new(),
                batch_root: diffuse_core::crypto::Digest([1; 32]),
                results_root: diffuse_core::crypto::Digest([2; 32]),
                checkpoint: None,
                state: None,
                prepare_cert: prepare.cert.clone(),
                prepared: opened(entropy),
                commit_cert: prepare.cert.clone(),
                replied: opened(entropy),
            };
            out.push(Outgoing::now(request.client.into(), Message::Reply(reply)));
        }
        true
    }
}
