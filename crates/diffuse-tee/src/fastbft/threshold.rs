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

/// From a polynomial's values at `x = 1, ..., t` (degree `t - 1`), its value at 0
/// and its values at `x = 1, ..., points` (at least the `t` given), by forward
/// differences: the `t - 1`-th difference of the values at consecutive points is
/// constant, so each further value costs `t - 1` additions and no multiplication
/// (Horner at every point cost `points * t` multiplications, ten times slower at
/// `n = 201`: `diffuse bench --preprocessing --fallback`).
fn extend_by_differences(first: &[Scalar], points: usize) -> (Scalar, Vec<Scalar>) {
    let t = first.len();
    // rows[k] = the k-th differences of the given values: rows[k][i] = Δ^k p(1 + i).
    let mut rows: Vec<Vec<Scalar>> = vec![first.to_vec()];
    for k in 1..t {
        let previous = &rows[k - 1];
        let next = previous.windows(2).map(|w| w[1] - w[0]).collect();
        rows.push(next);
    }
    // Backwards one step from x = 1 to x = 0 along the first diagonal.
    let mut at = Scalar::ZERO;
    for row in rows.iter().rev() {
        at = row[0] - at;
    }
    let secret = at;
    // Forwards from x = t along the last diagonal.
    let mut last: Vec<Scalar> = rows.iter().map(|row| row[row.len() - 1]).collect();
    let mut values = first.to_vec();
    for _ in t..points {
        for k in (0..t - 1).rev() {
            last[k] = last[k] + last[k + 1];
        }
        values.push(last[0]);
    }
    (secret, values)
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
    // The polynomial is drawn as its values at the first `threshold` points, each
    // from 64 random bytes reduced (uniform in the field): values at `threshold`
    // distinct points determine a polynomial of degree `threshold - 1` one to one,
    // so this is a uniform polynomial, and the rest follow by additions alone.
    let mut wide = vec![[0u8; 32]; 2 * threshold];
    randomness.fill(&mut wide);
    let first_values: Vec<Scalar> = wide
        .chunks_exact(2)
        .map(|pair| {
            let mut bytes = [0u8; 64];
            bytes[..32].copy_from_slice(&pair[0]);
            bytes[32..].copy_from_slice(&pair[1]);
            Scalar::from_bytes_mod_order_wide(&bytes)
        })
        .collect();
    let (secret, values) = extend_by_differences(&first_values, actives.len() + 1);
    let secret = to_share(&secret);
    let secret_hash = secret_hash(&secret, counter, view);
    let mut packages = Vec::with_capacity(actives.len());
    let mut hashes = Vec::with_capacity(actives.len());
    let mut body = [0u8; BODY_MAX_BYTES];
    for (i, (recipient, key)) in actives.iter().enumerate() {
        let share = to_share(&values[threshold_point(i) as usize - 1]);
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
        primary_share: Some(to_share(&values[THRESHOLD_PRIMARY_POINT as usize - 1])),
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

    #[test]
    fn differences_extend_a_polynomial_exactly() {
        // Degree 0, 1, 2 and 4, checked against Horner at every point and at 0.
        for coefficients in [vec![9u64], vec![4, 11], vec![7, 3, 5], vec![2, 0, 13, 1, 6]] {
            let coefficients: Vec<Scalar> = coefficients.into_iter().map(Scalar::from).collect();
            let horner = |x: u64| {
                let x = Scalar::from(x);
                coefficients
                    .iter()
                    .rev()
                    .fold(Scalar::ZERO, |acc, a| acc * x + a)
            };
            let t = coefficients.len();
            let first: Vec<Scalar> = (1..=t as u64).map(horner).collect();
            let (secret, values) = extend_by_differences(&first, 12);
            assert_eq!(secret, horner(0));
            assert_eq!(values.len(), 12);
            for (i, value) in values.iter().enumerate() {
                assert_eq!(
                    *value,
                    horner(i as u64 + 1),
                    "degree {} at {}",
                    t - 1,
                    i + 1
                );
            }
        }
        // Field wrap-around: p(1) = -1, p(2) = 1 is p(x) = 2x - 3.
        let minus_one = Scalar::ZERO - Scalar::ONE;
        let (secret, values) = extend_by_differences(&[minus_one, Scalar::ONE], 4);
        assert_eq!(values[3], Scalar::from(5u64));
        assert_eq!(secret, Scalar::ZERO - Scalar::from(3u64));
    }
}
