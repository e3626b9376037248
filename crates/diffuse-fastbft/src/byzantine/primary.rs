//! Byzantine primaries. Their host controls the enclave as much as any host does:
//! it can make the enclave certify whatever digest it likes at the next counter
//! value, and start a view with whatever decision it likes, but never certify
//! two things at one position or start a view twice.

use crate::checkpoint::primary_of;
use crate::message::{Message, Prepare, TreeConfig, certify_prepare};
use crate::options::FastBftOptions;
use crate::view_log::{NewView, Rules, ViewChange, decide, new_view_digest};
use diffuse_core::codec::BoundedVec;
use diffuse_core::crypto::PublicKey;
use diffuse_core::ids::{NodeId, ReplicaId};
use diffuse_core::suite::{Behaviour, Entropy, Outgoing, ReplicaSetup};
use diffuse_minbft::TeeHost;
use diffuse_pbft::message::Batch;
use diffuse_tee::{FastBftComponent, Tree, first_epoch};
use std::collections::{BTreeMap, BTreeSet};

/// Sends odd-numbered active replicas, in place of a PREPARE, a twin for the
/// same sequence number with its last request dropped, certified at the next
/// counter value (through the enclave's batch check, which the twin's genuine
/// requests pass). The twin's recipients find the original missing and fetch it,
/// then meet the twin, whose batch the original fixed already; the others find
/// the twin's position missing. Either way the view must change, and the twin
/// never counts.
pub(crate) struct Equivocate {
    me: ReplicaId,
    tee: TeeHost,
}

impl Equivocate {
    pub(crate) fn new(setup: &ReplicaSetup<FastBftOptions>) -> Self {
        Self {
            me: setup.id,
            tee: setup.options.tee.clone(),
        }
    }

    fn twin(&self, original: &Prepare) -> Option<Prepare> {
        let mut requests = original.batch.requests.to_vec();
        requests.pop()?;
        let batch = Batch {
            requests: BoundedVec::truncating(requests),
        };
        let checkpoint = original.checkpoint.as_ref().map(|p| p.digest());
        let cert = self
            .tee
            .call_live_enclave(self.me, |e| {
                certify_prepare(e, original.seq, &batch, checkpoint.as_ref())
            })?
            .ok()?;
        Some(Prepare {
            seq: original.seq,
            batch: batch.into(),
            checkpoint: original.checkpoint.clone(),
            cert,
        })
    }
}

impl Behaviour<Message> for Equivocate {
    fn outgoing(
        &mut self,
        to: NodeId,
        message: Message,
        _entropy: &mut dyn Entropy,
        out: &mut Vec<Outgoing<Message>>,
    ) {
        if let (Message::Prepare(prepare), NodeId::Replica(r)) = (&message, to)
            && r.0 % 2 == 1
            && let Some(twin) = self.twin(prepare)
        {
            return out.push(Outgoing::now(to, Message::Prepare(twin)));
        }
        out.push(Outgoing::now(to, message));
    }
}

/// As the primary of a view it is asked to lead, keeps the VIEW-CHANGEs from its
/// honest self and, with `f + 1` of them, has its enclave start the view with a
/// NEW-VIEW a correct replica must refuse: a decision without its last batch
/// (or with a made-up one when there is none), or the right decision with only
/// `f` VIEW-CHANGEs to back it, or an impossible tree. As the primary of a view
/// it is in (the first one), it orders nothing, so that views change.
pub(crate) struct BadNewView {
    me: ReplicaId,
    n: usize,
    tee: TeeHost,
    interval: u64,
    fan_out: usize,
    received: BTreeMap<u64, BTreeMap<ReplicaId, ViewChange>>,
    started: BTreeSet<u64>,
}

impl BadNewView {
    pub(crate) fn new(setup: &ReplicaSetup<FastBftOptions>) -> Self {
        Self {
            me: setup.id,
            n: setup.keys.n(),
            tee: setup.options.tee.clone(),
            interval: setup.options.base.checkpoint_interval.max(1),
            fan_out: setup.options.fan_out,
            received: BTreeMap::new(),
            started: BTreeSet::new(),
        }
    }

    /// A certified NEW-VIEW for `view` from `view_changes`, spoiled one way.
    fn spoiled(&self, view: u64, view_changes: Vec<ViewChange>, way: u64) -> Option<NewView> {
        let enclave_keys: Vec<PublicKey> = self.tee.enclave_keys()?;
        let f = (self.n - 1) / 2;
        let rules = Rules {
            enclave_keys: &enclave_keys,
            interval: self.interval,
            drop_last_decided: false,
        };
        let mut decision = decide(&view_changes, &rules);
        let mut included = view_changes;
        let mut fan_out = self.fan_out as u16;
        match way {
            0 => {
                let mut batches = decision.batches.to_vec();
                if batches.pop().is_none() {
                    batches.push(Batch::default());
                }
                decision.batches = BoundedVec::truncating(batches);
            }
            1 => {
                included.pop();
            }
            _ => fan_out = 0,
        }
        let actives: Vec<ReplicaId> = (1..self.n)
            .map(|k| ReplicaId(((self.me.index() + k) % self.n) as u16))
            .take(f)
            .collect();
        let config = TreeConfig {
            epoch: first_epoch(view)?,
            actives: BoundedVec::truncating(actives.clone()),
            fan_out,
            fallback: false,
        };
        let digest = new_view_digest(view, &config, &decision);
        let keys: Vec<PublicKey> = actives.iter().map(|r| enclave_keys[r.index()]).collect();
        let tree = Tree::balanced(f, self.fan_out).ok()?;
        let (cert, wrapped) = self
            .tee
            .call_live_enclave(self.me, |e| e.start_view(view, &digest, &keys, tree))?
            .ok()?;
        Some(NewView {
            view,
            view_changes: BoundedVec::truncating(included),
            config,
            cert,
            keys: BoundedVec::truncating(wrapped),
        })
    }
}

impl Behaviour<Message> for BadNewView {
    /// It orders nothing as primary (only a primary sends these), so that the
    /// view changes.
    fn outgoing(
        &mut self,
        to: NodeId,
        message: Message,
        _entropy: &mut dyn Entropy,
        out: &mut Vec<Outgoing<Message>>,
    ) {
        if !matches!(
            message,
            Message::Prepare(_)
                | Message::Commit(_)
                | Message::NewTree(_)
                | Message::Packages(_)
                | Message::Update(_)
                | Message::Reply(_)
        ) {
            out.push(Outgoing::now(to, message));
        }
    }

    fn incoming(
        &mut self,
        from: NodeId,
        message: &Message,
        entropy: &mut dyn Entropy,
        out: &mut Vec<Outgoing<Message>>,
    ) -> bool {
        let Message::ViewChange(vc) = message else {
            return true;
        };
        let view = vc.cert.target;
        if primary_of(view, self.n) != self.me || NodeId::Replica(vc.replica) != from {
            return true;
        }
        // The honest replica never sees the VIEW-CHANGEs of the views it leads.
        if self.started.contains(&view) {
            return false;
        }
        let f = (self.n - 1) / 2;
        let got = self.received.entry(view).or_default();
        got.insert(vc.replica, (**vc).clone());
        if got.len() <= f {
            return false;
        }
        let chosen: Vec<ViewChange> = got.values().take(f + 1).cloned().collect();
        self.started.insert(view);
        if let Some(nv) = self.spoiled(view, chosen, entropy.below(3)) {
            for r in (0..self.n as u16).map(ReplicaId) {
                if r != self.me {
                    out.push(Outgoing::now(
                        r.into(),
                        Message::NewView(Box::new(nv.clone())),
                    ));
                }
            }
        }
        false
    }
}
