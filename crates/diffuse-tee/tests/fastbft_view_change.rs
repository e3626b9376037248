//! The enclave side of FastBFT's view change: leaving freezes a replica's position,
//! a view is started once, and a view is entered only with `f` votes besides the
//! new primary's.

use diffuse_core::crypto::{Digest, PublicKey, Signed};
use diffuse_tee::{
    CounterCertificate, FastBftComponent, FastBftError, SoftwareEnclave, SoftwarePlatform, Tree,
    TrustedComponent, ViewAccept, first_epoch, view_of_epoch,
};
use std::sync::Arc;

fn digest(text: &str) -> Digest {
    Digest::of("test", text.as_bytes())
}

/// `n = 2f + 1` enclaves configured with each other (reset threshold `f + 1`),
/// replica 0 the primary of view 0 with replicas `1..=f` active.
fn cluster(n: usize) -> Vec<SoftwareEnclave> {
    cluster_and_platforms(n).0
}

/// As [`cluster`], with each enclave's platform.
fn cluster_and_platforms(n: usize) -> (Vec<SoftwareEnclave>, Vec<Arc<SoftwarePlatform>>) {
    let f = (n - 1) / 2;
    let platforms: Vec<Arc<SoftwarePlatform>> = (0..n)
        .map(|i| Arc::new(SoftwarePlatform::new([i as u8 + 1; 32])))
        .collect();
    let mut enclaves: Vec<SoftwareEnclave> = platforms
        .iter()
        .map(|p| SoftwareEnclave::create(p.clone()))
        .collect();
    let keys = public_keys(&enclaves);
    for enclave in &mut enclaves {
        enclave.configure(keys.clone(), f + 1).unwrap();
    }
    let tree = Tree::balanced(f, 2).unwrap();
    let cert = enclaves[0].request_counter(&digest("genesis")).unwrap();
    let wrapped = enclaves[0].be_primary(&keys[1..=f], tree).unwrap();
    for (i, enclave) in enclaves.iter_mut().enumerate().skip(1) {
        let key = wrapped.get(i - 1).filter(|_| i <= f);
        enclave.update_view(&keys[0], &cert, key).unwrap();
    }
    (enclaves, platforms)
}

fn public_keys(enclaves: &[SoftwareEnclave]) -> Vec<PublicKey> {
    enclaves.iter().map(|e| e.public_key()).collect()
}

/// Replica `primary` starts `view` with the `f` replicas after it as actives.
fn start(
    enclaves: &mut [SoftwareEnclave],
    primary: usize,
    view: u64,
) -> (
    Signed<CounterCertificate>,
    Vec<diffuse_tee::WrappedViewKey>,
    Vec<usize>,
) {
    let n = enclaves.len();
    let f = (n - 1) / 2;
    let keys = public_keys(enclaves);
    let actives: Vec<usize> = (1..=f).map(|k| (primary + k) % n).collect();
    let active_keys: Vec<PublicKey> = actives.iter().map(|i| keys[*i]).collect();
    let (cert, wrapped) = enclaves[primary]
        .start_view(
            view,
            &digest("new view"),
            &active_keys,
            Tree::balanced(f, 2).unwrap(),
        )
        .unwrap();
    (cert, wrapped, actives)
}

#[test]
fn leaving_freezes_the_position_and_is_certified() {
    let mut enclaves = cluster(5);
    let keys = public_keys(&enclaves);
    let prepared = enclaves[0].preprocessing(2).unwrap();
    let first = enclaves[0].request_counter(&digest("prepare 1")).unwrap();
    let second = enclaves[0].request_counter(&digest("prepare 2")).unwrap();
    enclaves[1]
        .verify_counter(&first, &prepared[0].packages[0])
        .unwrap();
    let position = enclaves[1].fastbft_counter();

    let left = enclaves[1].leave_view(1, &digest("log")).unwrap();
    assert!(left.verify(&keys[1]));
    assert_eq!(
        (left.counter, left.epoch, left.target, left.log),
        (position.0, position.1, 1, digest("log"))
    );
    assert_eq!(enclaves[1].fastbft_leaving(), Some(1));
    assert_eq!(
        enclaves[1].verify_counter(&second, &prepared[1].packages[0]),
        Err(FastBftError::Leaving(1)),
        "no share after leaving"
    );
    assert_eq!(
        enclaves[1].follow_counter(&second),
        Err(FastBftError::Leaving(1))
    );
    assert_eq!(enclaves[1].fastbft_counter(), position);

    // Again for the same view (same position), or a later one; never an earlier one.
    let again = enclaves[1].leave_view(1, &digest("log")).unwrap();
    assert_eq!((again.counter, again.epoch), (left.counter, left.epoch));
    enclaves[1].leave_view(3, &digest("log")).unwrap();
    assert!(matches!(
        enclaves[1].leave_view(2, &digest("log")),
        Err(FastBftError::WrongView { .. })
    ));
    assert!(matches!(
        enclaves[1].leave_view(0, &digest("log")),
        Err(FastBftError::WrongView { .. })
    ));

    // A leaving primary certifies nothing more.
    enclaves[0].leave_view(1, &digest("log")).unwrap();
    assert_eq!(
        enclaves[0].request_counter(&digest("x")),
        Err(FastBftError::Leaving(1))
    );
    assert_eq!(
        enclaves[0].preprocessing(1).err(),
        Some(FastBftError::Leaving(1))
    );
}

#[test]
fn a_view_is_started_once_at_counter_zero_of_its_first_epoch() {
    let mut enclaves = cluster(5);
    let (cert, wrapped, _) = start(&mut enclaves, 1, 1);
    let epoch = first_epoch(1).unwrap();
    assert_eq!((cert.counter, cert.view), (0, epoch));
    assert_eq!(view_of_epoch(cert.view), 1);
    assert!(wrapped.iter().all(|w| w.view == epoch));
    assert_eq!(enclaves[1].fastbft_counter(), (0, epoch));
    let keys = public_keys(&enclaves);
    let tree = Tree::balanced(2, 2).unwrap();
    for view in [0, 1] {
        assert!(
            enclaves[1]
                .start_view(view, &digest("again"), &keys[2..4], tree)
                .is_err(),
            "view {view} cannot be started again"
        );
    }
    // Its first certificate of the view comes after the NEW-VIEW.
    let next = enclaves[1].request_counter(&digest("prepare")).unwrap();
    assert_eq!((next.counter, next.view), (1, epoch));
    // A primary with fewer than f actives is refused.
    assert!(
        enclaves[2]
            .start_view(
                2,
                &digest("small"),
                &keys[3..4],
                Tree::balanced(1, 2).unwrap()
            )
            .is_err()
    );
}

/// The votes of `voters` for the NEW-VIEW `cert` from `primary`.
fn votes(
    enclaves: &mut [SoftwareEnclave],
    primary: usize,
    cert: &Signed<CounterCertificate>,
    voters: &[usize],
) -> Vec<(PublicKey, Signed<ViewAccept>)> {
    let key = enclaves[primary].public_key();
    voters
        .iter()
        .map(|&i| {
            let vote = enclaves[i].accept_view(&key, cert).unwrap();
            (enclaves[i].public_key(), vote)
        })
        .collect()
}

#[test]
fn a_view_is_entered_with_f_votes_besides_the_new_primary_only() {
    let mut enclaves = cluster(5);
    let keys = public_keys(&enclaves);
    enclaves[3].leave_view(1, &digest("log")).unwrap();
    let (cert, wrapped, actives) = start(&mut enclaves, 1, 1);
    assert_eq!(actives, vec![2, 3]);
    let one_vote = votes(&mut enclaves, 1, &cert, &[3]);
    assert!(
        enclaves[3]
            .enter_view(&keys[1], &cert, &one_vote, Some(&wrapped[1]))
            .is_err(),
        "one vote is not f = 2"
    );
    let mut twice = one_vote.clone();
    twice.extend(one_vote.clone());
    assert!(
        enclaves[3]
            .enter_view(&keys[1], &cert, &twice, Some(&wrapped[1]))
            .is_err(),
        "the same voter twice counts once"
    );
    // The primary's own vote does not count twice.
    let primary_vote = (
        keys[1],
        enclaves[1].accept_view(&keys[1], &cert).err().map(|_| ()),
    );
    assert!(primary_vote.1.is_some(), "the new primary does not vote");
    // A vote for another NEW-VIEW does not count.
    let mut other_tee = SoftwareEnclave::create(Arc::new(SoftwarePlatform::new([99; 32])));
    let forged_cert = Signed::sign(
        CounterCertificate {
            message: digest("other"),
            counter: 0,
            view: cert.view,
            kind: diffuse_tee::CertificateKind::Opaque,
        },
        &diffuse_core::crypto::SecretKey::from_seed([7; 32]),
    );
    assert!(
        enclaves[4].accept_view(&keys[1], &forged_cert).is_err(),
        "a NEW-VIEW certificate must be the new primary's"
    );
    assert!(
        other_tee.accept_view(&keys[1], &cert).is_err(),
        "not configured"
    );

    let mut enough = votes(&mut enclaves, 1, &cert, &[3, 4]);
    enclaves[3]
        .enter_view(&keys[1], &cert, &enough, Some(&wrapped[1]))
        .unwrap();
    assert_eq!(enclaves[3].fastbft_counter(), (0, cert.view));
    assert_eq!(enclaves[3].fastbft_leaving(), None);
    // Entered: the new primary's shares open, the old primary's stream is refused.
    let prepared = enclaves[1].preprocessing(1).unwrap();
    let prepare = enclaves[1].request_counter(&digest("prepare")).unwrap();
    enclaves[3]
        .verify_counter(&prepare, &prepared[0].packages[1])
        .unwrap();
    let old = enclaves[0].request_counter(&digest("old view")).unwrap();
    assert!(enclaves[3].follow_counter(&old).is_err());
    // A view is entered once.
    enough.truncate(2);
    assert!(
        enclaves[3]
            .enter_view(&keys[1], &cert, &enough, Some(&wrapped[1]))
            .is_err()
    );
    // A passive replica enters without a key.
    let votes_for_4 = votes(&mut enclaves, 1, &cert, &[2, 4]);
    enclaves[4]
        .enter_view(&keys[1], &cert, &votes_for_4, None)
        .unwrap();
    assert!(enclaves[4].follow_counter(&prepare).is_ok());
}

#[test]
fn a_replica_that_left_for_a_view_enters_no_lower_one() {
    let mut enclaves = cluster(5);
    let keys = public_keys(&enclaves);
    let (cert, _, _) = start(&mut enclaves, 1, 1);
    let accepts = votes(&mut enclaves, 1, &cert, &[2, 3]);
    enclaves[4].leave_view(2, &digest("log")).unwrap();
    assert!(matches!(
        enclaves[4].enter_view(&keys[1], &cert, &accepts, None),
        Err(FastBftError::WrongView { .. })
    ));
    assert!(matches!(
        enclaves[4].accept_view(&keys[1], &cert),
        Err(FastBftError::WrongView { .. })
    ));
    // View 2's NEW-VIEW is fine.
    let (cert2, _, _) = start(&mut enclaves, 2, 2);
    let accepts2 = votes(&mut enclaves, 2, &cert2, &[3, 4]);
    enclaves[4]
        .enter_view(&keys[2], &cert2, &accepts2, None)
        .unwrap();
    assert_eq!(view_of_epoch(enclaves[4].fastbft_counter().1), 2);
}

#[test]
fn a_new_tree_stays_in_its_view_and_comes_from_its_primary() {
    let mut enclaves = cluster(3);
    let keys = public_keys(&enclaves);
    // Replica 2 (passive) gets a NEW-TREE certificate from replica 1, not the
    // primary of its epoch.
    let rogue = enclaves[1].request_counter(&digest("rogue"));
    assert_eq!(rogue, Err(FastBftError::WrongRole("the primary")));
    let cert = enclaves[0].request_counter(&digest("tree")).unwrap();
    enclaves[0]
        .be_primary(&keys[2..3], Tree::balanced(1, 2).unwrap())
        .unwrap();
    let impostor = Signed::sign(
        cert.value,
        &diffuse_core::crypto::SecretKey::from_seed([5; 32]),
    );
    assert!(enclaves[2].update_view(&keys[1], &impostor, None).is_err());
    enclaves[2].update_view(&keys[0], &cert, None).unwrap();
    assert_eq!(view_of_epoch(enclaves[2].fastbft_counter().1), 0);
}

/// After an unscheduled reboot the enclave is locked; `f + 1` peers' reports
/// unlock it out of the highest view any of them knows, which bounds every view
/// it took part in (one of any `f + 1` enclaves voted for each view it entered).
/// It then enters the next view by its NEW-VIEW, like any replica.
#[test]
fn a_rebooted_enclave_rejoins_out_of_every_view_it_may_have_been_in() {
    let mut enclaves = cluster(5);
    let keys = public_keys(&enclaves);
    // Replica 4 seals, and comes back on a machine whose counter does not match
    // the sealed state: an unscheduled reboot (or a rollback).
    let sealed = enclaves[4].seal_and_stop();
    let locked =
        SoftwareEnclave::resume(Arc::new(SoftwarePlatform::new([5; 32])), &sealed).unwrap();
    assert!(locked.is_locked());
    enclaves[4] = locked;
    assert!(enclaves[4].leave_view(1, &digest("log")).is_err());
    // View 1 started by replica 1, voted for by replicas 2 and 3.
    let (cert, _, _) = start(&mut enclaves, 1, 1);
    votes(&mut enclaves, 1, &cert, &[2, 3]);
    let challenge = enclaves[4].rejoin_challenge().unwrap();
    let me = keys[4];
    // Replicas 0 (view 0 only), 2 and 3 (voted for view 1) report.
    let reports: Vec<_> = [0, 2, 3]
        .iter()
        .map(|&i| enclaves[i].report_counter(me, challenge).unwrap())
        .collect();
    assert_eq!(reports[0].value.fastbft_view, 0);
    assert_eq!(reports[2].value.fastbft_view, 1);
    assert!(
        enclaves[4].reset_counter(&reports[..2], 0).is_err(),
        "f + 1 = 3 reports"
    );
    enclaves[4].reset_counter(&reports, 0).unwrap();
    assert!(!enclaves[4].is_locked());
    assert_eq!(
        enclaves[4].fastbft_leaving(),
        Some(2),
        "out of view 1 and below"
    );
    assert_eq!(view_of_epoch(enclaves[4].fastbft_counter().1), 1);
    // View 1's NEW-VIEW is refused; view 2's is entered.
    let accepts = votes(&mut enclaves, 1, &cert, &[2, 3]);
    assert!(
        enclaves[4]
            .enter_view(&keys[1], &cert, &accepts, None)
            .is_err()
    );
    let (cert2, _, _) = start(&mut enclaves, 2, 2);
    let accepts2 = votes(&mut enclaves, 2, &cert2, &[1, 3]);
    enclaves[4]
        .enter_view(&keys[2], &cert2, &accepts2, None)
        .unwrap();
    assert_eq!(enclaves[4].fastbft_counter(), (0, first_epoch(2).unwrap()));
}

/// A rebooted enclave, once REJOIN reset it, rejoins its view at a position its
/// primary certified over the enclave's fresh nonce: after everything it did
/// before the reboot.
#[test]
fn a_rebooted_enclave_rejoins_at_a_certified_position_over_its_nonce() {
    let mut enclaves = cluster(5);
    let keys = public_keys(&enclaves);
    let sealed = enclaves[4].seal_and_stop();
    let mut rebooted =
        SoftwareEnclave::resume(Arc::new(SoftwarePlatform::new([5; 32])), &sealed).unwrap();
    assert!(rebooted.is_locked());
    assert_eq!(rebooted.fastbft_rejoin_nonce(), None, "not while locked");
    let challenge = rebooted.rejoin_challenge().unwrap();
    let reports: Vec<_> = [0, 1, 2]
        .iter()
        .map(|&i| enclaves[i].report_counter(keys[4], challenge).unwrap())
        .collect();
    rebooted.reset_counter(&reports, 0).unwrap();
    assert_eq!(rebooted.fastbft_leaving(), Some(1));
    let nonce = rebooted.fastbft_rejoin_nonce().expect("a fresh nonce");
    let wrong = enclaves[0]
        .request_counter(&diffuse_tee::rejoin_digest(&keys[4], &digest("old")))
        .unwrap();
    assert!(rebooted.rejoin_at(&keys[0], &wrong).is_err());
    let cert = enclaves[0]
        .request_counter(&diffuse_tee::rejoin_digest(&keys[4], &nonce))
        .unwrap();
    assert!(
        rebooted.rejoin_at(&keys[1], &cert).is_err(),
        "not signed by replica 1"
    );
    rebooted.rejoin_at(&keys[0], &cert).unwrap();
    assert_eq!(rebooted.fastbft_counter(), (cert.counter, cert.view));
    assert_eq!(rebooted.fastbft_leaving(), None);
    assert_eq!(
        rebooted.fastbft_rejoin_nonce(),
        None,
        "a nonce is used once"
    );
    // A passive replica of the epoch from there on.
    let next = enclaves[0].request_counter(&digest("prepare")).unwrap();
    rebooted.follow_counter(&next).unwrap();
    // A replica that left its view normally has no nonce: it cannot rejoin.
    enclaves[3].leave_view(1, &digest("log")).unwrap();
    assert_eq!(enclaves[3].fastbft_rejoin_nonce(), None);
}

/// A backup far behind jumps forward to a later position of its primary in the
/// same view, never backwards, never to another view or another primary's
/// certificate; past an epoch it is passive.
#[test]
fn a_backup_far_behind_follows_to_a_later_position_of_its_view_only() {
    let mut enclaves = cluster(5);
    let keys = public_keys(&enclaves);
    let prepared = enclaves[0].preprocessing(3).unwrap();
    let first = enclaves[0].request_counter(&digest("1")).unwrap();
    enclaves[0].request_counter(&digest("2")).unwrap();
    let third = enclaves[0].request_counter(&digest("3")).unwrap();
    // Replica 1 (active) jumps over the first two positions to the third.
    enclaves[1].follow_to(&keys[0], &third).unwrap();
    assert_eq!(enclaves[1].fastbft_counter(), (third.counter, third.view));
    assert!(
        enclaves[1].follow_to(&keys[0], &first).is_err(),
        "never backwards"
    );
    assert!(
        enclaves[1]
            .verify_counter(&first, &prepared[0].packages[0])
            .is_err(),
        "no share for a position it skipped"
    );
    // Not with another replica's certificate.
    let rogue = Signed::sign(
        third.value,
        &diffuse_core::crypto::SecretKey::from_seed([3; 32]),
    );
    assert!(enclaves[2].follow_to(&keys[0], &rogue).is_err());
    // Past a NEW-TREE: the primary's next epoch.
    let tree = enclaves[0].request_counter(&digest("tree")).unwrap();
    enclaves[0]
        .be_primary(&keys[1..3], Tree::balanced(2, 2).unwrap())
        .unwrap();
    let later = enclaves[0].request_counter(&digest("later")).unwrap();
    assert!(later.view > tree.view);
    enclaves[3].follow_to(&keys[0], &later).unwrap();
    assert_eq!(enclaves[3].fastbft_counter(), (later.counter, later.view));
    // Another view's certificate is not followed to.
    let (cert, _, _) = start(&mut enclaves, 1, 1);
    let next_view = enclaves[1].request_counter(&digest("v1")).unwrap();
    assert_eq!(view_of_epoch(cert.view), 1);
    assert!(enclaves[4].follow_to(&keys[1], &next_view).is_err());
}

/// Why REJOIN needs `f + 1` reports (§6.1), at `n = 3`: replica 1 starts view 1
/// (replica 0 votes for it, replica 2 never hears of it), then crashes; only a
/// sealed state from before view 1 is left. With `f + 1 = 2` reports, one comes
/// from an enclave that voted for view 1, so the rebooted enclave is out of view
/// 1 and cannot start it again. With one report (the broken variant, threshold
/// `f`), replica 2's alone unlocks it, and it starts view 1 a second time under a
/// different NEW-VIEW: two certificates for one position, the equivocation the
/// trusted counter exists to prevent.
#[test]
fn rejoin_with_f_reports_would_let_a_primary_start_its_view_twice() {
    for threshold in [2, 1] {
        let (mut enclaves, platforms) = cluster_and_platforms(3);
        let keys = public_keys(&enclaves);
        let platform = platforms[1].clone();
        // A scheduled restart of replica 1 before view 1: the last state it seals.
        let old = enclaves[1].seal_and_stop();
        enclaves[1] = SoftwareEnclave::resume(platform.clone(), &old).unwrap();
        assert!(!enclaves[1].is_locked());
        enclaves[1].leave_view(1, &digest("log")).unwrap();
        let (first, _, _) = start(&mut enclaves, 1, 1);
        votes(&mut enclaves, 1, &first, &[0]);
        // The crash: the live enclave is gone, the host resumes the old state.
        enclaves[1] = SoftwareEnclave::resume(platform.clone(), &old).unwrap();
        assert!(enclaves[1].is_locked());
        if threshold == 1 {
            enclaves[1].weaken_rejoin_for_tests(1);
        }
        let challenge = enclaves[1].rejoin_challenge().unwrap();
        let report = |i: usize| enclaves[i].report_counter(keys[1], challenge).unwrap();
        let (from_voter, from_unaware) = (report(0), report(2));
        assert_eq!(from_unaware.value.fastbft_view, 0);
        let reset = enclaves[1].reset_counter(std::slice::from_ref(&from_unaware), 0);
        let again = enclaves[1].start_view(
            1,
            &digest("another new view"),
            &[keys[2]],
            Tree::balanced(1, 2).unwrap(),
        );
        if threshold == 2 {
            assert!(reset.is_err(), "one report is not f + 1");
            enclaves[1]
                .reset_counter(&[from_unaware, from_voter], 0)
                .unwrap();
            assert!(
                enclaves[1]
                    .start_view(
                        1,
                        &digest("another new view"),
                        &[keys[2]],
                        Tree::balanced(1, 2).unwrap()
                    )
                    .is_err(),
                "view 1 is started once"
            );
        } else {
            assert!(reset.is_ok(), "the broken variant unlocks with f reports");
            let (second, _) = again.expect("the broken variant starts view 1 again");
            assert_eq!((second.counter, second.view), (first.counter, first.view));
            assert_ne!(
                second.message, first.message,
                "two NEW-VIEWs at one position"
            );
        }
    }
}
