//! The fallback's secret sharing (§4.5): Shamir's scheme over the scalar field of
//! Curve25519 (`curve25519_dalek::Scalar`, a prime field of order about 2^252).
//!
//! For each counter value the primary's enclave draws a polynomial `p` of degree
//! `t - 1` (`t` the threshold, `f + 1`); the secret is `p(0)`, the primary's own
//! share is `p(1)` ([`THRESHOLD_PRIMARY_POINT`]) and backup `i` (in the order of the
//! epoch's actives) holds `p(i + 2)` ([`threshold_point`]). Any `t` shares give the
//! secret back by Lagrange interpolation at 0 ([`combine_threshold`]), so the
//! primary needs its own share and any `f` backups': `f` silent backups cannot stop
//! a round, and `f + 1` replicas (one correct) have taken every opened position.
//! Each backup's package also binds `H(p(x_i), c, v)` for the primary
//! (`root_children_hashes`), so a wrong share is caught before it spoils the sum.

use super::{
    BODY_MAX_BYTES, FastBftError, Package, PackageBody, Preprocessed, Randomness, SecretCommitment,
    Share, TAG_BYTES, aggregate_hash, package_aad, package_nonce, secret_hash,
};
use crate::enclave::SoftwareEnclave;
use curve25519_dalek::Scalar;
use diffuse_core::codec::Blob;
use diffuse_core::crypto::{PublicKey, Signed};
use ring::aead::{Aad, LessSafeKey};

/// The primary's point.
pub const THRESHOLD_PRIMARY_POINT: u64 = 1;

/// The point of the backup at position `i` of a threshold epoch's actives.
pub fn threshold_point(i: usize) -> u64 {
    i as u64 + 2
}

fn to_share(value: &Scalar) -> Share {
    Share(value.to_bytes())
}

fn to_scalar(share: &Share) -> Option<Scalar> {
    Option::from(Scalar::from_canonical_bytes(share.0))
}

/// The secret from `threshold` or more distinct points `(x, p(x))`: Lagrange
/// interpolation at 0. `None` if a share is not a canonical scalar, a point
/// repeats or is 0. (Wrong shares give a wrong secret: the caller checks each
/// share against its hash first, and the secret against its commitment.)
pub fn combine_threshold(points: &[(u64, Share)]) -> Option<Share> {
    let mut xs = Vec::with_capacity(points.len());
    let mut ys = Vec::with_capacity(points.len());
    for (x, y) in points {
        if *x == 0 || xs.contains(&Scalar::from(*x)) {
            return None;
        }
        xs.push(Scalar::from(*x));
        ys.push(to_scalar(y)?);
    }
    let mut secret = Scalar::ZERO;
    for (i, (xi, yi)) in xs.iter().zip(&ys).enumerate() {
        // λ_i = Π_{j ≠ i} x_j / (x_j - x_i)
        let mut numerator = Scalar::ONE;
        let mut denominator = Scalar::ONE;
        for (j, xj) in xs.iter().enumerate() {
            if i != j {
                numerator *= xj;
                denominator *= xj - xi;
            }
        }
        secret += yi * numerator * denominator.invert();
    }
    Some(to_share(&secret))
}

/// Binds a fresh polynomial of degree `threshold - 1` to `(counter, view)` and
/// seals one share per active replica under its package key (in `actives` order).
pub(super) fn prepare_one(
    enclave: &SoftwareEnclave,
    counter: u64,
    view: u64,
    actives: &[(PublicKey, LessSafeKey)],
    threshold: usize,
    randomness: &mut Randomness,
) -> Result<Preprocessed, FastBftError> {
    // Coefficients, each from 64 random bytes reduced (uniform in the field).
    let mut wide = vec![[0u8; 32]; 2 * threshold];
    randomness.fill(&mut wide);
    let coefficients: Vec<Scalar> = wide
        .chunks_exact(2)
        .map(|pair| {
            let mut bytes = [0u8; 64];
            bytes[..32].copy_from_slice(&pair[0]);
            bytes[32..].copy_from_slice(&pair[1]);
            Scalar::from_bytes_mod_order_wide(&bytes)
        })
        .collect();
    let evaluate = |x: u64| {
        let x = Scalar::from(x);
        coefficients
            .iter()
            .rev()
            .fold(Scalar::ZERO, |acc, a| acc * x + a)
    };
    let secret = to_share(&coefficients[0]);
    let secret_hash = secret_hash(&secret, counter, view);
    let mut packages = Vec::with_capacity(actives.len());
    let mut hashes = Vec::with_capacity(actives.len());
    let mut body = [0u8; BODY_MAX_BYTES];
    for (i, (recipient, key)) in actives.iter().enumerate() {
        let share = to_share(&evaluate(threshold_point(i)));
        hashes.push(aggregate_hash(&share, counter, view));
        let body_len = PackageBody::encode(&mut body, &share, counter, view, &[], &secret_hash)
            .ok_or(FastBftError::Invalid("a share without children fits"))?;
        let mut ciphertext = Vec::with_capacity(body_len + TAG_BYTES);
        ciphertext.extend_from_slice(&body[..body_len]);
        let tag = key
            .seal_in_place_separate_tag(
                package_nonce(counter),
                Aad::from(package_aad(counter, view, recipient)),
                &mut ciphertext,
            )
            .map_err(|_| FastBftError::Invalid("a package fits ChaCha20-Poly1305"))?;
        ciphertext.extend_from_slice(tag.as_ref());
        packages.push(Package {
            counter,
            view,
            recipient: *recipient,
            ciphertext: Blob::try_from_vec(ciphertext)
                .map_err(|_| FastBftError::Invalid("a package fits MAX_PACKAGE_BYTES"))?,
        });
    }
    Ok(Preprocessed {
        commitment: Signed::sign(
            SecretCommitment {
                secret_hash,
                counter,
                view,
            },
            enclave.secret_key(),
        ),
        root_children_hashes: hashes,
        packages,
        primary_share: Some(to_share(&evaluate(THRESHOLD_PRIMARY_POINT))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share(value: u64) -> Share {
        to_share(&Scalar::from(value))
    }

    #[test]
    fn any_threshold_points_give_the_secret_back() {
        // p(x) = 7 + 3x + 5x^2: threshold 3.
        let p = |x: u64| 7 + 3 * x + 5 * x * x;
        let all: Vec<(u64, Share)> = (1..=6).map(|x| (x, share(p(x)))).collect();
        for skip in 0..4 {
            let three: Vec<_> = all.iter().skip(skip).take(3).cloned().collect();
            assert_eq!(combine_threshold(&three), Some(share(7)));
        }
        assert_ne!(
            combine_threshold(&all[..2]),
            Some(share(7)),
            "two are not enough"
        );
        assert_eq!(
            combine_threshold(&[(0, share(7))]),
            None,
            "0 is not a point"
        );
        assert_eq!(
            combine_threshold(&[(1, share(1)), (1, share(1))]),
            None,
            "a repeated point"
        );
        assert_eq!(
            combine_threshold(&[(1, Share([0xff; 32]))]),
            None,
            "not canonical"
        );
    }
}
