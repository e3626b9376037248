//! The enclave side of FastBFT's view change (§4.4, Fig. 6), as Diffuse builds it
//! (`docs/protocols/fastbft.md`, "View change").
//!
//! The enclave's view `v` of Fig. 3 is what FastBFT calls the **epoch**: it changes
//! at every NEW-TREE. The protocol's **view** (who the primary is) is the epoch's
//! high 32 bits ([`view_of_epoch`]); a new view starts at epoch
//! [`first_epoch`]`(view)`, so epochs grow across views and each names one tree of
//! one primary.
//!
//! Three rules make the view change safe with `n = 2f + 1`:
//!
//! * **Leaving freezes.** [`crate::fastbft::FastBftComponent::leave_view`] certifies the replica's
//!   position together with the digest of its log, and from then on the enclave
//!   takes no position of its view: no share, no step. Every VIEW-CHANGE is
//!   therefore the whole truth up to a position the enclave vouches for.
//! * **One NEW-VIEW per view.** [`crate::fastbft::FastBftComponent::start_view`] moves the new
//!   primary's enclave to the view's first epoch and certifies the NEW-VIEW there,
//!   at counter value 0 (no other certificate ever takes counter value 0); it never
//!   starts that view, or a lower one, again.
//! * **A checked NEW-VIEW.** [`crate::fastbft::FastBftComponent::accept_view`] is a replica's vote
//!   that it checked a NEW-VIEW; [`crate::fastbft::FastBftComponent::enter_view`] enters the view
//!   only with votes from `f` distinct configured enclaves besides the new
//!   primary's. Of those `f + 1`, one is correct, so the execution history of every
//!   view an enclave is in was checked by a correct replica: a VIEW-CHANGE from
//!   that view can carry the history without the proof it was built from.

use super::{FastBftError, FastBftState, Tree, WrappedViewKey};
use crate::enclave::{SoftwareEnclave, TrustedComponent};
use diffuse_core::crypto::{Digest, PublicKey, Signable, Signed};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// Bits of an epoch that count trees within one view.
pub const TREE_BITS: u32 = 32;

/// The protocol view an epoch belongs to.
pub fn view_of_epoch(epoch: u64) -> u64 {
    epoch >> TREE_BITS
}

/// The first epoch of `view` (its NEW-VIEW's), if `view` is representable.
pub fn first_epoch(view: u64) -> Option<u64> {
    (view < 1 << (64 - TREE_BITS)).then_some(view << TREE_BITS)
}

/// `⟨H(L), (c, e), v'⟩_σi`: a replica's enclave, at position `(c, e)`, leaves its
/// view for view `target` with the log whose digest is `log`
/// ([`crate::fastbft::FastBftComponent::leave_view`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViewChangeCertificate {
    /// The digest of the sender's log.
    pub log: Digest,
    /// `c_latest` when the enclave left.
    pub counter: u64,
    /// The epoch it left.
    pub epoch: u64,
    /// The view it asks for.
    pub target: u64,
}

impl Signable for ViewChangeCertificate {
    const LABEL: &'static str = "diffuse/tee/fastbft/view-change";
}

/// A replica's enclave vouches that its host checked the NEW-VIEW `new_view`
/// ([`new_view_id`]) of the view starting at `epoch` ([`crate::fastbft::FastBftComponent::accept_view`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViewAccept {
    /// [`new_view_id`] of the NEW-VIEW's certificate.
    pub new_view: Digest,
    /// The view's first epoch.
    pub epoch: u64,
}

impl Signable for ViewAccept {
    const LABEL: &'static str = "diffuse/tee/fastbft/view-accept";
}

/// What names one NEW-VIEW: its certificate and the enclave that made it.
pub fn new_view_id(primary: &PublicKey, certificate: &Signed<super::CounterCertificate>) -> Digest {
    Digest::of_value(
        "diffuse/tee/fastbft/new-view-id",
        &(
            primary.to_bytes(),
            certificate.message,
            certificate.counter,
            certificate.view,
        ),
    )
}

impl SoftwareEnclave {
    /// The view the enclave is in.
    fn fastbft_view(&self) -> u64 {
        view_of_epoch(self.fastbft.view)
    }

    /// Checks that the enclave may enter `view`: above its own, and not below the
    /// view it left for.
    fn check_view_ahead(&self, view: u64) -> Result<(), FastBftError> {
        let current = self.fastbft_view();
        if view <= current || self.fastbft.leaving.is_some_and(|target| view < target) {
            return Err(FastBftError::WrongView {
                expected: current + 1,
                got: view,
            });
        }
        Ok(())
    }

    /// The enclave key of every configured peer and of this enclave, and `f + 1`.
    fn voters(&self) -> Result<(BTreeSet<[u8; 32]>, usize), FastBftError> {
        let (peers, threshold) = self.peer_set().ok_or(FastBftError::Invalid(
            "the enclave's peers are not configured",
        ))?;
        let mut voters = peers.clone();
        voters.insert(self.public_key().to_bytes());
        Ok((voters, threshold))
    }
}

/// What a primary certifies for a restarted replica's enclave `replica` with
/// nonce `nonce` to rejoin its view.
pub fn rejoin_digest(replica: &PublicKey, nonce: &Digest) -> Digest {
    Digest::of_value("diffuse/tee/fastbft/rejoin", &(replica.to_bytes(), nonce))
}

pub(super) fn rejoin_at(
    enclave: &mut SoftwareEnclave,
    primary: &PublicKey,
    certificate: &Signed<super::CounterCertificate>,
) -> Result<(), FastBftError> {
    enclave.fastbft_unlocked()?;
    let Some(nonce) = enclave.fastbft.rejoin_nonce else {
        return Err(FastBftError::WrongRole("restarted"));
    };
    let (voters, _) = enclave.voters()?;
    let me = enclave.public_key();
    if !voters.contains(&primary.to_bytes()) || *primary == me {
        return Err(FastBftError::Invalid(
            "the primary is another configured peer",
        ));
    }
    if !certificate.verify(primary) {
        return Err(FastBftError::BadSignature);
    }
    let floor = enclave.fastbft.leaving.map_or(0, |t| t.saturating_sub(1));
    if certificate.message != rejoin_digest(&me, &nonce)
        || certificate.counter == 0
        || view_of_epoch(certificate.view) < floor
    {
        return Err(FastBftError::Invalid(
            "a rejoin certificate binds this enclave's nonce, in its view or a later one",
        ));
    }
    enclave.fastbft = FastBftState {
        counter: certificate.counter,
        view: certificate.view,
        role: super::Role::Passive { primary: *primary },
        leaving: None,
        accepted: enclave.fastbft.accepted,
        rejoin_nonce: None,
    };
    Ok(())
}

pub(super) fn leave_view(
    enclave: &mut SoftwareEnclave,
    target: u64,
    log: &Digest,
) -> Result<Signed<ViewChangeCertificate>, FastBftError> {
    enclave.fastbft_unlocked()?;
    if first_epoch(target).is_none() {
        return Err(FastBftError::Invalid("the view is too high"));
    }
    enclave.check_view_ahead(target)?;
    enclave.fastbft.leaving = Some(target);
    enclave.fastbft.rejoin_nonce = None;
    Ok(Signed::sign(
        ViewChangeCertificate {
            log: *log,
            counter: enclave.fastbft.counter,
            epoch: enclave.fastbft.view,
            target,
        },
        enclave.secret_key(),
    ))
}

pub(super) fn start_view(
    enclave: &mut SoftwareEnclave,
    view: u64,
    new_view: &Digest,
    actives: &[PublicKey],
    tree: Tree,
) -> Result<(Signed<super::CounterCertificate>, Vec<WrappedViewKey>), FastBftError> {
    enclave.fastbft_unlocked()?;
    let epoch = first_epoch(view).ok_or(FastBftError::Invalid("the view is too high"))?;
    enclave.check_view_ahead(view)?;
    let role = enclave.primary_role(epoch, actives, super::Aggregation::Tree(tree))?;
    let wrapped = role.1;
    enclave.fastbft = FastBftState {
        counter: 0,
        view: epoch,
        role: role.0,
        leaving: None,
        accepted: enclave.fastbft.accepted.max(view),
        rejoin_nonce: None,
    };
    let certificate = Signed::sign(
        super::CounterCertificate {
            message: *new_view,
            counter: 0,
            view: epoch,
            kind: super::CertificateKind::Opaque,
        },
        enclave.secret_key(),
    );
    Ok((certificate, wrapped))
}

pub(super) fn accept_view(
    enclave: &mut SoftwareEnclave,
    new_primary: &PublicKey,
    certificate: &Signed<super::CounterCertificate>,
) -> Result<Signed<ViewAccept>, FastBftError> {
    enclave.fastbft_unlocked()?;
    check_new_view(enclave, new_primary, certificate)?;
    let view = view_of_epoch(certificate.view);
    enclave.fastbft.accepted = enclave.fastbft.accepted.max(view);
    Ok(Signed::sign(
        ViewAccept {
            new_view: new_view_id(new_primary, certificate),
            epoch: certificate.view,
        },
        enclave.secret_key(),
    ))
}

/// A NEW-VIEW certificate this enclave could enter: signed by `new_primary`, a
/// configured peer, at counter value 0 of a view's first epoch, for a view ahead.
fn check_new_view(
    enclave: &SoftwareEnclave,
    new_primary: &PublicKey,
    certificate: &Signed<super::CounterCertificate>,
) -> Result<(), FastBftError> {
    let (voters, _) = enclave.voters()?;
    if !voters.contains(&new_primary.to_bytes()) || *new_primary == enclave.public_key() {
        return Err(FastBftError::Invalid(
            "the new primary is another configured peer",
        ));
    }
    if !certificate.verify(new_primary) {
        return Err(FastBftError::BadSignature);
    }
    let view = view_of_epoch(certificate.view);
    if certificate.counter != 0 || first_epoch(view) != Some(certificate.view) {
        return Err(FastBftError::Invalid(
            "a NEW-VIEW takes counter value 0 of its view's first epoch",
        ));
    }
    enclave.check_view_ahead(view)
}

pub(super) fn enter_view(
    enclave: &mut SoftwareEnclave,
    new_primary: &PublicKey,
    certificate: &Signed<super::CounterCertificate>,
    accepts: &[(PublicKey, Signed<ViewAccept>)],
    view_key: Option<&WrappedViewKey>,
) -> Result<(), FastBftError> {
    enclave.fastbft_unlocked()?;
    check_new_view(enclave, new_primary, certificate)?;
    let (voters, threshold) = enclave.voters()?;
    let id = new_view_id(new_primary, certificate);
    let mut counted = BTreeSet::new();
    for (voter, accept) in accepts {
        let key = voter.to_bytes();
        if voter == new_primary
            || !voters.contains(&key)
            || accept.new_view != id
            || accept.epoch != certificate.view
            || !accept.verify(voter)
        {
            continue;
        }
        counted.insert(key);
    }
    // The new primary's certificate is its own vote: f more make f + 1.
    if counted.len() + 1 < threshold {
        return Err(FastBftError::Invalid(
            "entering a view needs f checked votes besides the new primary's",
        ));
    }
    let role = enclave.role_under(new_primary, certificate.view, view_key)?;
    enclave.fastbft = FastBftState {
        counter: 0,
        view: certificate.view,
        role,
        leaving: None,
        accepted: enclave
            .fastbft
            .accepted
            .max(view_of_epoch(certificate.view)),
        rejoin_nonce: None,
    };
    Ok(())
}
