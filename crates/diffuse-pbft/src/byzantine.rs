//! PBFT-specific Byzantine behaviours for the simulator.
//!
//! Each runs on top of an honest replica and rewrites its traffic. A behaviour signs
//! with the faulty replica's own key, so its lies are validly signed where the
//! replica is entitled to sign (for example two different PRE-PREPAREs as primary);
//! it cannot produce another replica's signature, and the network does not let it
//! lie about who sends a message.

use crate::message::{
    Authenticator, Batch, CheckpointCert, CheckpointVote, Commit, Message, NewView, PrePrepare,
    PrepareVote, PreparedCert, Proposal, Request, RequestBody, ViewChangeBody,
};
use crate::options::PbftOptions;
use diffuse_core::codec::BoundedVec;
use diffuse_core::crypto::{Digest, Mac, SecretKey, Signature, Signed};
use diffuse_core::ids::{ClientId, NodeId, ReplicaId, Seq, View};
use diffuse_core::suite::{
    Behaviour, ClientSetup, Coalition, Entropy, Named, Outgoing, ReplicaSetup,
};
use std::collections::BTreeMap;

/// The PBFT-specific behaviours.
pub const BEHAVIOURS: &[Named] = &[
    Named {
        name: "equivocate",
        description: "as primary, sends different PRE-PREPAREs (and matching COMMITs) to different backups",
    },
    Named {
        name: "wrong-digest",
        description: "votes, checkpoints, replies, state chunks and batches carry wrong digests or data",
    },
    Named {
        name: "forge-sender",
        description: "claims to be another replica (or a client) inside its messages",
    },
    Named {
        name: "false-certificates",
        description: "VIEW-CHANGE with forged prepared and checkpoint certificates, bad NEW-VIEWs, and spurious view changes",
    },
    Named {
        name: "collude",
        description: "all faulty replicas together make exactly f correct replicas prepare a batch, then hide it in the view change",
    },
    Named {
        name: "forge-requests",
        description: "as primary, adds requests their clients never sent to its batches, or strips a request's signature and spoils its MACs for some backups",
    },
];

/// The PBFT-specific Byzantine client behaviours.
pub const CLIENT_BEHAVIOURS: &[Named] = &[Named {
    name: "split-macs",
    description: "a client whose requests carry bad MACs for some replicas, each preceded half of the time by a twin with a bad signature and a good MAC for its recipient only",
}];

/// Builds the client behaviour `name` for the client of `setup`.
pub fn build_client(
    name: &str,
    _setup: &ClientSetup<PbftOptions>,
) -> Option<Box<dyn Behaviour<Message>>> {
    match name {
        "split-macs" => Some(Box::new(SplitMacs)),
        _ => None,
    }
}

/// Builds the behaviour `name` for the replica of `setup`, one of `coalition`.
pub fn build(
    name: &str,
    setup: &ReplicaSetup<PbftOptions>,
    coalition: &Coalition,
) -> Option<Box<dyn Behaviour<Message>>> {
    let me = Me {
        id: setup.id,
        n: setup.keys.n(),
        secret: setup.secret.clone(),
        window: setup.options.window,
    };
    match name {
        "equivocate" => Some(Box::new(Equivocate {
            me,
            alternatives: BTreeMap::new(),
        })),
        "wrong-digest" => Some(Box::new(WrongDigest { me })),
        "forge-sender" => Some(Box::new(ForgeSender { me })),
        "false-certificates" => Some(Box::new(FalseCertificates { me })),
        "forge-requests" => Some(Box::new(ForgeRequests {
            clients: setup.keys.clients().collect(),
            me,
            variants: BTreeMap::new(),
        })),
        "collude" => Some(Box::new(Collude {
            me,
            coalition: coalition.clone(),
            // Long enough for the clients to retransmit to every backup, short
            // enough that the primary's own request timer has not fired yet.
            hold_back: setup
                .options
                .view_change_timeout
                .saturating_sub(std::time::Duration::from_millis(60)),
        })),
        _ => None,
    }
}

struct Me {
    id: ReplicaId,
    n: usize,
    secret: SecretKey,
    window: u64,
}

impl Me {
    /// Lie by omission: the same VIEW-CHANGE, re-signed, claiming nothing prepared.
    fn claim_nothing_prepared(&self, vc: crate::message::ViewChange) -> Message {
        let body = ViewChangeBody {
            prepared: BoundedVec::new(),
            ..vc.value
        };
        Message::ViewChange(Signed::sign(body, &self.secret))
    }

    fn other_replica(&self, entropy: &mut dyn Entropy) -> ReplicaId {
        let other = entropy.below(self.n as u64 - 1) as u16;
        ReplicaId(if other >= self.id.0 { other + 1 } else { other })
    }
}

/// A second, validly signed PRE-PREPARE for the same view and sequence number, made of
/// the same genuine client requests in another order or with one fewer.
fn alternative_pre_prepare(pp: &PrePrepare, secret: &SecretKey) -> Option<PrePrepare> {
    let Proposal { view, seq, .. } = pp.proposal.value;
    let mut requests = pp.batch.requests.to_vec();
    if requests.is_empty() {
        return None;
    }
    if requests.len() > 1 && seq.0 % 2 == 0 {
        requests.reverse();
    } else {
        requests.pop();
    }
    let batch = Batch {
        requests: BoundedVec::truncating(requests),
    };
    let digest = batch.digest();
    let proposal = Signed::sign(Proposal { view, seq, digest }, secret);
    Some(PrePrepare { proposal, batch })
}

fn random_digest(entropy: &mut dyn Entropy) -> Digest {
    let mut bytes = [0u8; 32];
    for chunk in bytes.chunks_mut(8) {
        chunk.copy_from_slice(&entropy.next_u64().to_le_bytes());
    }
    Digest(bytes)
}

fn random_signature(entropy: &mut dyn Entropy) -> Signature {
    let mut bytes = [0u8; 64];
    for chunk in bytes.chunks_mut(8) {
        chunk.copy_from_slice(&entropy.next_u64().to_le_bytes());
    }
    Signature(bytes)
}

/// The primary sends one batch to some backups and another to the rest, for the
/// same sequence number, and sends each side COMMITs for its own version.
struct Equivocate {
    me: Me,
    alternatives: BTreeMap<(View, Seq), (Digest, PrePrepare)>,
}

impl Equivocate {
    fn alternative(&mut self, pp: &PrePrepare) -> Option<(Digest, PrePrepare)> {
        let Proposal { view, seq, .. } = pp.proposal.value;
        if let Some(alt) = self.alternatives.get(&(view, seq)) {
            return Some(alt.clone());
        }
        let alt = alternative_pre_prepare(pp, &self.me.secret)?;
        let alt = (alt.proposal.digest, alt);
        if self.alternatives.len() > 4096 {
            self.alternatives.pop_first();
        }
        self.alternatives.insert((view, seq), alt.clone());
        Some(alt)
    }

    fn second_side(&self, to: NodeId, seq: Seq) -> bool {
        to.replica()
            .is_some_and(|r| (r.index() + seq.0 as usize) % 2 == 1)
    }
}

impl Behaviour<Message> for Equivocate {
    fn outgoing(
        &mut self,
        to: NodeId,
        message: Message,
        entropy: &mut dyn Entropy,
        out: &mut Vec<Outgoing<Message>>,
    ) {
        match message {
            Message::PrePrepare(pp) if pp.proposal.view.primary(self.me.n) == self.me.id => {
                let seq = pp.proposal.seq;
                let Some((_, alt)) = self.alternative(&pp) else {
                    out.push(Outgoing::now(to, Message::PrePrepare(pp)));
                    return;
                };
                if entropy.chance(1, 3) {
                    // Both versions to the same backup, one after the other.
                    out.push(Outgoing::now(to, Message::PrePrepare(pp)));
                    out.push(Outgoing::now(to, Message::PrePrepare(alt)));
                } else if self.second_side(to, seq) {
                    out.push(Outgoing::now(to, Message::PrePrepare(alt)));
                } else {
                    out.push(Outgoing::now(to, Message::PrePrepare(pp)));
                }
            }
            Message::Commit(commit) => {
                let alt = self
                    .alternatives
                    .get(&(commit.view, commit.seq))
                    .map(|(d, _)| *d);
                match alt {
                    Some(digest) if self.second_side(to, commit.seq) => {
                        out.push(Outgoing::now(
                            to,
                            Message::Commit(Commit { digest, ..commit }),
                        ));
                    }
                    _ => out.push(Outgoing::now(to, Message::Commit(commit))),
                }
            }
            Message::ViewChange(vc) => {
                out.push(Outgoing::now(to, self.me.claim_nothing_prepared(vc)));
            }
            other => out.push(Outgoing::now(to, other)),
        }
    }
}

/// Votes and data with wrong digests or bytes.
struct WrongDigest {
    me: Me,
}

impl Behaviour<Message> for WrongDigest {
    fn outgoing(
        &mut self,
        to: NodeId,
        message: Message,
        entropy: &mut dyn Entropy,
        out: &mut Vec<Outgoing<Message>>,
    ) {
        let lie = entropy.chance(1, 2);
        let message = match message {
            Message::Prepare(p) if lie => Message::Prepare(Signed::sign(
                PrepareVote {
                    digest: random_digest(entropy),
                    ..p.value
                },
                &self.me.secret,
            )),
            Message::Commit(c) if lie => Message::Commit(Commit {
                digest: random_digest(entropy),
                ..c
            }),
            Message::Checkpoint(c) if lie => Message::Checkpoint(Signed::sign(
                CheckpointVote {
                    state: random_digest(entropy),
                    ..c.value
                },
                &self.me.secret,
            )),
            Message::Reply(mut r) if lie => {
                let mut result = r.result.to_vec();
                match result.last_mut() {
                    Some(byte) => *byte ^= 0x5a,
                    None => result.push(1),
                }
                r.result = diffuse_core::codec::Blob::try_from_vec(result).unwrap_or_default();
                Message::Reply(r)
            }
            Message::StateChunk(mut chunk) if lie => {
                // Flip the lowest bit of one byte: length prefixes mostly stay intact,
                // so the corrupted state often still decodes, as a real attacker's would.
                let mut data = chunk.data.to_vec();
                if !data.is_empty() {
                    let at = entropy.below(data.len() as u64) as usize;
                    data[at] ^= 0x01;
                }
                chunk.data = diffuse_core::codec::Blob::try_from_vec(data).unwrap_or_default();
                Message::StateChunk(chunk)
            }
            Message::BatchData(mut data) if lie => {
                data.batch = Batch::default();
                Message::BatchData(data)
            }
            Message::PrePrepare(pp) if lie && entropy.chance(1, 2) => {
                let proposal = Signed::sign(
                    Proposal {
                        digest: random_digest(entropy),
                        ..pp.proposal.value
                    },
                    &self.me.secret,
                );
                Message::PrePrepare(PrePrepare { proposal, ..pp })
            }
            other => other,
        };
        out.push(Outgoing::now(to, message));
    }
}

/// Claims to be someone else inside its messages.
struct ForgeSender {
    me: Me,
}

impl Behaviour<Message> for ForgeSender {
    fn outgoing(
        &mut self,
        to: NodeId,
        message: Message,
        entropy: &mut dyn Entropy,
        out: &mut Vec<Outgoing<Message>>,
    ) {
        if !entropy.chance(1, 2) {
            out.push(Outgoing::now(to, message));
            return;
        }
        let other = self.me.other_replica(entropy);
        let message = match message {
            Message::Prepare(p) => Message::Prepare(Signed::sign(
                PrepareVote {
                    replica: other,
                    ..p.value
                },
                &self.me.secret,
            )),
            Message::Commit(c) => Message::Commit(Commit {
                replica: other,
                ..c
            }),
            Message::Checkpoint(c) => Message::Checkpoint(Signed::sign(
                CheckpointVote {
                    replica: other,
                    ..c.value
                },
                &self.me.secret,
            )),
            Message::ViewChange(vc) => Message::ViewChange(Signed::sign(
                ViewChangeBody {
                    replica: other,
                    ..vc.value
                },
                &self.me.secret,
            )),
            Message::Reply(r) => Message::Reply(crate::message::Reply {
                replica: other,
                ..r
            }),
            Message::Request(r) => {
                // A request "from" the client, signed with the replica's key.
                Message::Request(crate::message::Request {
                    signed: Signed::sign(r.signed.value, &self.me.secret),
                    authenticator: r.authenticator,
                })
            }
            other => other,
        };
        out.push(Outgoing::now(to, message));
    }
}

/// Forged certificates in view changes, bad NEW-VIEWs, and spurious view changes.
struct FalseCertificates {
    me: Me,
}

impl FalseCertificates {
    /// A prepared certificate for `seq` claiming the null batch prepared in `view`,
    /// with prepares "from" other replicas that only this replica signed.
    fn forged_cert(&self, view: View, seq: Seq, entropy: &mut dyn Entropy) -> PreparedCert {
        let digest = if entropy.chance(3, 4) {
            Batch::default().digest()
        } else {
            random_digest(entropy)
        };
        let proposal = Signed {
            value: Proposal { view, seq, digest },
            signature: random_signature(entropy),
        };
        let prepares = (0..self.me.n as u16)
            .map(ReplicaId)
            .filter(|r| *r != view.primary(self.me.n))
            .map(|replica| {
                Signed::sign(
                    PrepareVote {
                        view,
                        seq,
                        digest,
                        replica,
                    },
                    &self.me.secret,
                )
            })
            .collect();
        PreparedCert {
            proposal,
            prepares: BoundedVec::truncating(prepares),
        }
    }

    fn forge_view_change(&self, body: ViewChangeBody, entropy: &mut dyn Entropy) -> ViewChangeBody {
        let low = body.stable.seq;
        let claimed = View(body.new_view.0.saturating_sub(1));
        let mut certs: BTreeMap<Seq, PreparedCert> = body
            .prepared
            .iter()
            .map(|c| (c.proposal.seq, c.clone()))
            .collect();
        let span = self.me.window.max(1);
        // Where it hurts: the sequence numbers that really prepared (and may have
        // committed somewhere) get a "newer" certificate for another batch.
        let prepared: Vec<Seq> = certs.keys().copied().collect();
        for seq in prepared {
            if entropy.chance(3, 4) {
                certs.insert(seq, self.forged_cert(claimed, seq, entropy));
            }
        }
        for _ in 0..entropy.below(3) {
            let seq = low.plus(1 + entropy.below(span));
            certs.insert(seq, self.forged_cert(claimed, seq, entropy));
        }
        let mut stable = body.stable;
        if entropy.chance(1, 4) {
            stable = CheckpointCert {
                seq: low.plus(span),
                state: random_digest(entropy),
                votes: BoundedVec::truncating(vec![Signed {
                    value: CheckpointVote {
                        seq: low.plus(span),
                        state: random_digest(entropy),
                        replica: self.me.id,
                    },
                    signature: random_signature(entropy),
                }]),
            };
        }
        ViewChangeBody {
            stable,
            prepared: BoundedVec::truncating(certs.into_values().collect()),
            ..body
        }
    }
}

impl Behaviour<Message> for FalseCertificates {
    fn outgoing(
        &mut self,
        to: NodeId,
        message: Message,
        entropy: &mut dyn Entropy,
        out: &mut Vec<Outgoing<Message>>,
    ) {
        let message = match message {
            Message::ViewChange(vc) => {
                let body = self.forge_view_change(vc.value, entropy);
                Message::ViewChange(Signed::sign(body, &self.me.secret))
            }
            Message::NewView(nv) if entropy.chance(1, 2) => {
                // Drop the last proposal of O, or replace one with the null batch.
                let mut proposals = nv.proposals.to_vec();
                if entropy.chance(1, 2) {
                    proposals.pop();
                } else if let Some(p) = proposals.first_mut() {
                    *p = Signed::sign(
                        Proposal {
                            digest: Batch::default().digest(),
                            ..p.value
                        },
                        &self.me.secret,
                    );
                }
                Message::NewView(NewView {
                    proposals: BoundedVec::truncating(proposals),
                    ..nv
                })
            }
            Message::CheckpointCert(mut cert) => {
                cert.state = random_digest(entropy);
                Message::CheckpointCert(cert)
            }
            other => other,
        };
        out.push(Outgoing::now(to, message));
    }

    fn incoming(
        &mut self,
        from: NodeId,
        message: &Message,
        entropy: &mut dyn Entropy,
        out: &mut Vec<Outgoing<Message>>,
    ) -> bool {
        // Now and then, demand a view change nobody else wants.
        let Message::Prepare(p) = message else {
            return true;
        };
        if !entropy.chance(1, 40) {
            return true;
        }
        let body = ViewChangeBody {
            new_view: p.view.next(),
            replica: self.me.id,
            stable: CheckpointCert {
                seq: Seq(0),
                state: Digest::default(),
                votes: BoundedVec::new(),
            },
            prepared: BoundedVec::new(),
        };
        let body = self.forge_view_change(body, entropy);
        out.push(Outgoing::now(
            from,
            Message::ViewChange(Signed::sign(body, &self.me.secret)),
        ));
        true
    }
}

/// What the coalition decided for one proposal.
#[derive(Debug, Clone)]
struct CollusionPlan {
    digest: Digest,
    /// The correct backups that get the PRE-PREPARE.
    receivers: Vec<ReplicaId>,
    /// The correct replicas the faulty ones help to prepare: exactly `f` of them, never
    /// the next primary.
    favoured: Vec<ReplicaId>,
    /// What the other correct replicas get instead, so that they refuse the real batch
    /// when retransmission brings it.
    alternative: Option<PrePrepare>,
}

#[derive(Debug, Default)]
struct CollusionPlans {
    plans: BTreeMap<(View, Seq), CollusionPlan>,
    /// Requests in planned batches, whose replies the coalition withholds so that the
    /// clients time out and the replicas that never executed them start a view change.
    withheld: std::collections::BTreeSet<(diffuse_core::ids::ClientId, u64)>,
}

/// The faulty replicas act together. As primary, one sends a PRE-PREPARE to only
/// `f + 1` correct backups and a conflicting one (same requests, other order) to the
/// rest; the faulty backups send their PREPAREs and COMMITs only to `f` of the first
/// group ("favoured", never the next primary), so that exactly `f` correct replicas
/// prepare. They withhold their replies for that batch, so its clients
/// retransmit and the replicas that never executed it start a view change; their
/// VIEW-CHANGEs claim nothing prepared. With the real quorums
/// the batch cannot commit; with a commit quorum one short it commits at the favoured
/// replicas and a view-change quorum that avoids them drops it.
struct Collude {
    me: Me,
    coalition: Coalition,
    /// How long the faulty primary holds a planned PRE-PREPARE back.
    hold_back: std::time::Duration,
}

impl Collude {
    fn f(&self) -> usize {
        (self.me.n - 1) / 3
    }

    fn existing_plan(&self, view: View, seq: Seq) -> Option<CollusionPlan> {
        self.coalition
            .with(|plans: &mut CollusionPlans| plans.plans.get(&(view, seq)).cloned())
    }

    fn make_plan(&self, pp: &PrePrepare, entropy: &mut dyn Entropy) -> CollusionPlan {
        let Proposal { view, seq, digest } = pp.proposal.value;
        if let Some(plan) = self.existing_plan(view, seq) {
            return plan;
        }
        let members = self.coalition.members().to_vec();
        let next_primary = view.next().primary(self.me.n);
        let mut backups: Vec<ReplicaId> = (0..self.me.n as u16)
            .map(ReplicaId)
            .filter(|r| !members.contains(r) && *r != self.me.id)
            .collect();
        // Shuffle, then move the next primary to the end so it is never favoured.
        for i in (1..backups.len()).rev() {
            backups.swap(i, entropy.below(i as u64 + 1) as usize);
        }
        backups.sort_by_key(|r| *r == next_primary);
        let f = self.f();
        let favoured: Vec<ReplicaId> = backups.iter().copied().take(f).collect();
        let receivers: Vec<ReplicaId> = backups.iter().copied().take(f + 1).collect();
        let plan = CollusionPlan {
            digest,
            receivers,
            favoured,
            alternative: alternative_pre_prepare(pp, &self.me.secret),
        };
        self.coalition.with(|plans: &mut CollusionPlans| {
            if plans.plans.len() >= 4096 {
                plans.plans.pop_first();
                plans.withheld.pop_first();
            }
            plans.plans.insert((view, seq), plan.clone());
            plans
                .withheld
                .extend(pp.batch.requests.iter().map(|r| (r.client, r.timestamp)));
        });
        plan
    }

    fn is_member(&self, to: NodeId) -> bool {
        to.replica()
            .is_some_and(|r| self.coalition.members().contains(&r))
    }
}

impl Collude {
    /// Whether a vote for `(view, seq, digest)` may go to `to`: planned votes go only
    /// to the favoured replicas and the coalition.
    fn vote_reaches(&self, to: NodeId, view: View, seq: Seq, digest: Digest) -> bool {
        match self
            .existing_plan(view, seq)
            .filter(|plan| plan.digest == digest)
        {
            Some(plan) => {
                self.is_member(to) || to.replica().is_some_and(|r| plan.favoured.contains(&r))
            }
            None => true,
        }
    }
}

impl Behaviour<Message> for Collude {
    /// The faulty replicas ignore COMMITs of planned batches: they never execute them,
    /// so they too time out and join the view change that drops them.
    fn incoming(
        &mut self,
        _: NodeId,
        message: &Message,
        _: &mut dyn Entropy,
        _: &mut Vec<Outgoing<Message>>,
    ) -> bool {
        match message {
            Message::Commit(c) => self
                .existing_plan(c.view, c.seq)
                .is_none_or(|plan| plan.digest != c.digest),
            _ => true,
        }
    }

    fn outgoing(
        &mut self,
        to: NodeId,
        message: Message,
        entropy: &mut dyn Entropy,
        out: &mut Vec<Outgoing<Message>>,
    ) {
        let mut delay = std::time::Duration::ZERO;
        let message = match message {
            Message::PrePrepare(pp) => {
                let Proposal { view, seq, digest } = pp.proposal.value;
                let primary = view.primary(self.me.n) == self.me.id;
                let plan = if primary {
                    Some(self.make_plan(&pp, entropy))
                } else {
                    self.existing_plan(view, seq).filter(|p| p.digest == digest)
                };
                if primary && plan.is_some() {
                    // Both versions leave together, just before the backups would
                    // suspect the primary.
                    delay = self.hold_back;
                }
                match plan {
                    None => Message::PrePrepare(pp),
                    Some(plan)
                        if self.is_member(to)
                            || to.replica().is_some_and(|r| plan.receivers.contains(&r)) =>
                    {
                        Message::PrePrepare(pp)
                    }
                    // The other correct replicas get the alternative, so that they
                    // refuse the real batch if retransmission brings it later.
                    Some(plan) => match plan.alternative {
                        Some(alternative) if primary => Message::PrePrepare(alternative),
                        _ => return,
                    },
                }
            }
            Message::Prepare(p) if !self.vote_reaches(to, p.view, p.seq, p.digest) => return,
            Message::Commit(c) if !self.vote_reaches(to, c.view, c.seq, c.digest) => return,
            Message::Reply(r)
                if self.coalition.with(|plans: &mut CollusionPlans| {
                    plans.withheld.contains(&(r.client, r.timestamp))
                }) =>
            {
                return;
            }
            Message::ViewChange(vc) => self.me.claim_nothing_prepared(vc),
            other => other,
        };
        out.push(Outgoing {
            to,
            payload: diffuse_core::suite::Payload::Message(message),
            delay,
        });
    }
}

/// Spoils the MAC entries of a random subset of the replicas (each with probability
/// one half) and returns whether it spoiled any.
fn spoil_macs(authenticator: &mut Authenticator, entropy: &mut dyn Entropy) -> bool {
    let mut entries = authenticator.to_vec();
    let mut spoiled = false;
    for entry in &mut entries {
        if entropy.chance(1, 2) {
            entry.0[0] ^= 0x5a;
            spoiled = true;
        }
    }
    *authenticator = Authenticator::truncating(entries);
    spoiled
}

/// As primary, sends (to every backup alike, so that it is one proposal, not an
/// equivocation) batches that hold a request its client never sent (signed with
/// the primary's own key, with made-up MACs), or in which a genuine request's
/// signature is replaced by garbage and its MACs spoiled for some backups: backups
/// whose MAC still verifies accept that one, the others must refuse the batch.
struct ForgeRequests {
    me: Me,
    clients: Vec<ClientId>,
    variants: BTreeMap<(View, Seq), PrePrepare>,
}

impl ForgeRequests {
    fn variant(&self, pp: &PrePrepare, entropy: &mut dyn Entropy) -> PrePrepare {
        let mut requests = pp.batch.requests.to_vec();
        let Some(template) = requests.first().cloned() else {
            return pp.clone();
        };
        match entropy.below(3) {
            0 => return pp.clone(),
            1 => {
                let taken: Vec<ClientId> = requests.iter().map(|r| r.client).collect();
                let free: Vec<ClientId> = self
                    .clients
                    .iter()
                    .copied()
                    .filter(|c| !taken.contains(c))
                    .collect();
                if free.is_empty() {
                    return pp.clone();
                }
                let client = free[entropy.below(free.len() as u64) as usize];
                // A timestamp far ahead: if it were ever executed, the client's own
                // requests would be ignored as stale, which the checkers would see.
                let body = RequestBody {
                    client,
                    timestamp: template.timestamp.saturating_add(1 << 40),
                    operation: template.operation.clone(),
                };
                let macs = (0..self.me.n)
                    .map(|_| {
                        let mut mac = [0u8; 16];
                        mac[..8].copy_from_slice(&entropy.next_u64().to_le_bytes());
                        mac[8..].copy_from_slice(&entropy.next_u64().to_le_bytes());
                        Mac(mac)
                    })
                    .collect();
                requests.push(Request {
                    signed: Signed::sign(body, &self.me.secret),
                    authenticator: Authenticator::truncating(macs),
                });
            }
            _ => {
                let at = entropy.below(requests.len() as u64) as usize;
                let stripped = &mut requests[at];
                stripped.signed.signature = random_signature(entropy);
                spoil_macs(&mut stripped.authenticator, entropy);
            }
        }
        let batch = Batch {
            requests: BoundedVec::truncating(requests),
        };
        let proposal = Signed::sign(
            Proposal {
                digest: batch.digest(),
                ..pp.proposal.value
            },
            &self.me.secret,
        );
        PrePrepare { proposal, batch }
    }
}

impl Behaviour<Message> for ForgeRequests {
    fn outgoing(
        &mut self,
        to: NodeId,
        message: Message,
        entropy: &mut dyn Entropy,
        out: &mut Vec<Outgoing<Message>>,
    ) {
        match message {
            Message::PrePrepare(pp) if pp.proposal.view.primary(self.me.n) == self.me.id => {
                let slot = (pp.proposal.view, pp.proposal.seq);
                let variant = match self.variants.get(&slot) {
                    Some(variant) => variant.clone(),
                    None => {
                        let variant = self.variant(&pp, entropy);
                        if self.variants.len() > 4096 {
                            self.variants.pop_first();
                        }
                        self.variants.insert(slot, variant.clone());
                        variant
                    }
                };
                out.push(Outgoing::now(to, Message::PrePrepare(variant)));
            }
            other => out.push(Outgoing::now(to, other)),
        }
    }
}

/// A Byzantine client. Half of the time, each request it sends to a replica is
/// preceded by a twin with a garbage signature whose only valid MAC is the
/// recipient's (the "MAC attack": a primary that trusted its MAC would propose a
/// request no other correct replica can authenticate). Half of its genuine requests
/// carry spoiled MACs for a random subset of the replicas; their signature stays
/// valid, so they must still complete.
struct SplitMacs;

impl Behaviour<Message> for SplitMacs {
    fn outgoing(
        &mut self,
        to: NodeId,
        message: Message,
        entropy: &mut dyn Entropy,
        out: &mut Vec<Outgoing<Message>>,
    ) {
        let Message::Request(mut request) = message else {
            out.push(Outgoing::now(to, message));
            return;
        };
        if entropy.chance(1, 2) {
            let mut twin = request.clone();
            twin.signed.signature = random_signature(entropy);
            let entries = twin
                .authenticator
                .iter()
                .enumerate()
                .map(|(i, mac)| {
                    let mut mac = *mac;
                    if to.replica().map(ReplicaId::index) != Some(i) {
                        mac.0[0] ^= 0x5a;
                    }
                    mac
                })
                .collect();
            twin.authenticator = Authenticator::truncating(entries);
            out.push(Outgoing::now(to, Message::Request(twin)));
        }
        if entropy.chance(1, 2) {
            spoil_macs(&mut request.authenticator, entropy);
        }
        out.push(Outgoing::now(to, Message::Request(request)));
    }
}
