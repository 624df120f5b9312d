//! A counter-based, deterministic, approximately Gaussian noise generator:
//! value `i` of stream `seed` is a pure function of `(seed, i)`, computed
//! with integer operations and one correctly rounded `f32` multiplication,
//! so every process and host running the same build (any CPU, any libm)
//! regenerates the same bits, in any order and in parallel.
//!
//! Definition, operation by operation (all integer arithmetic wrapping,
//! `u64`):
//!
//! ```text
//! key   = mix(seed + 0x9E3779B97F4A7C15)        // one per stream
//! mix(z): z = (z ^ (z >> 30)) · 0xBF58476D1CE4E5B9
//!         z = (z ^ (z >> 27)) · 0x94D049BB133111EB
//!         z ^ (z >> 31)                         // splitmix64
//! x     = key + i · 0xA0761D6478BD642F          // one per value
//! m     = u128(x) · u128(x ^ 0xE7037ED1A0B428DB)
//! h     = low64(m) ^ high64(m)                  // wyrand's output at state x
//! s     = Σ_{k=0..3} (h >> 16k) & 0xFFFF         // four 16-bit uniforms, exact
//! value = f32(s as i32 − 131070) · NORM          // NORM = f32(1 / √(4·(65536² − 1)/12))
//! ```
//!
//! For `i = 0, 1, 2, …` the states `x` are exactly wyrand's sequence started
//! at `key`, a generator that passes BigCrush and PractRand; indexing the
//! state directly makes any value computable on its own (per tensor, per
//! thread, per host).
//!
//! The value is the sum of four independent uniform 16-bit integers,
//! centred and scaled to variance 1 (Irwin–Hall with n = 4): mean exactly 0,
//! symmetric, unit variance, excess kurtosis −0.3, support bounded at
//! ±√12 ≈ ±3.46. The integer `s − 131070` is exact in `f32` (|x| < 2²⁴), and
//! an IEEE multiplication is correctly rounded everywhere, so there is no
//! `ln`/`cos`/`sqrt` whose last bit could differ between libm builds (as in
//! Box–Muller) and no table (as in a ziggurat). For evolution strategies the
//! bounded tails are harmless (arguably useful: no single value jumps
//! further than 3.46 σ); the antithetic estimator needs zero mean and
//! symmetry, which hold exactly. Speed: about 1.3 ns per value on one core
//! (see `examples/bench_noise.rs`).

/// `splitmix64`'s finaliser.
#[inline(always)]
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;
/// Centre of the sum of four 16-bit values: 4 · 65535 / 2.
const CENTRE: i32 = 131_070;
/// 1 / standard deviation of the sum: 1 / √(4 · (65536² − 1) / 12).
const NORM: f32 = 2.642_899_8e-5;

/// The stream key of `seed`.
#[inline]
fn key(seed: u64) -> u64 {
    mix(seed.wrapping_add(GOLDEN))
}

/// wyrand's increment and output constant.
const WY0: u64 = 0xa076_1d64_78bd_642f;
const WY1: u64 = 0xe703_7ed1_a0b4_28db;

#[inline(always)]
fn value(key: u64, index: u64) -> f32 {
    // wyrand's output function at state `key + index · WY0`.
    let x = key.wrapping_add(index.wrapping_mul(WY0));
    let m = u128::from(x) * u128::from(x ^ WY1);
    let h = (m as u64) ^ ((m >> 64) as u64);
    let s = (h & 0xFFFF) + ((h >> 16) & 0xFFFF) + ((h >> 32) & 0xFFFF) + (h >> 48);
    (s as i32 - CENTRE) as f32 * NORM
}

/// Value `index` of stream `seed`.
pub fn at(seed: u64, index: u64) -> f32 {
    value(key(seed), index)
}

multiversioned! {
    /// Fills `out` with values `offset .. offset + out.len()` of stream `seed`.
    pub fn fill(seed: u64, offset: u64, out: &mut [f32]) {
        let k = key(seed);
        for (i, o) in out.iter_mut().enumerate() {
            *o = value(k, offset.wrapping_add(i as u64));
        }
    }
}

multiversioned! {
    /// `out[j] = base[j] + scale · noise(seed, offset + j)` for every `j`: one
    /// rounded multiplication and one rounded addition per value (never fused),
    /// the operation [`crate::Recipe::apply`] performs per tensor.
    pub fn add_scaled(seed: u64, offset: u64, scale: f32, base: &[f32], out: &mut [f32]) {
        assert_eq!(base.len(), out.len(), "base and out lengths differ");
        let k = key(seed);
        for (i, (o, &b)) in out.iter_mut().zip(base).enumerate() {
            *o = b + scale * value(k, offset.wrapping_add(i as u64));
        }
    }
}

multiversioned! {
    /// [`add_scaled`] with `scale` into `plus` and with `−scale` into
    /// `minus`, one noise value for both: `p = scale · ε`, `plus = base + p`,
    /// `minus = base − p`, bit for bit what two calls give (`−scale · ε` is
    /// exactly `−(scale · ε)`, and `b + (−p)` is `b − p`).
    pub fn add_scaled_pair(
        seed: u64,
        offset: u64,
        scale: f32,
        base: &[f32],
        plus: &mut [f32],
        minus: &mut [f32]
    ) {
        assert!(base.len() == plus.len() && base.len() == minus.len(), "base and out lengths differ");
        let k = key(seed);
        for (i, ((p, m), &b)) in plus.iter_mut().zip(minus.iter_mut()).zip(base).enumerate() {
            let d = scale * value(k, offset.wrapping_add(i as u64));
            *p = b + d;
            *m = b - d;
        }
    }
}

multiversioned! {
    /// `x[j] += scale · noise(seed, offset + j)`, rounded as in [`add_scaled`].
    pub fn add_scaled_assign(seed: u64, offset: u64, scale: f32, x: &mut [f32]) {
        let k = key(seed);
        for (i, o) in x.iter_mut().enumerate() {
            *o += scale * value(k, offset.wrapping_add(i as u64));
        }
    }
}

/// The coin of value `index` of stream `seed`: the top bit of the wyrand
/// output the value is made from (`h >> 63` in the module docs), a fair
/// coin independent of the value's other bits in practice. The GA's
/// uniform crossover takes value `i` of its second parent where the coin
/// of `(crossover seed, i)` is set ([`take_where_coin`]).
pub fn coin(seed: u64, index: u64) -> bool {
    coin_at(key(seed), index)
}

#[inline(always)]
fn coin_at(key: u64, index: u64) -> bool {
    let x = key.wrapping_add(index.wrapping_mul(WY0));
    let m = u128::from(x) * u128::from(x ^ WY1);
    let h = (m as u64) ^ ((m >> 64) as u64);
    h >> 63 == 1
}

multiversioned! {
    /// `out[j] = other[j]` where [`coin`]`(seed, offset + j)` is set, for
    /// every `j` (the other values stay): a copy, no arithmetic.
    pub fn take_where_coin(seed: u64, offset: u64, other: &[f32], out: &mut [f32]) {
        assert_eq!(other.len(), out.len(), "other and out lengths differ");
        let k = key(seed);
        for (i, (o, &b)) in out.iter_mut().zip(other).enumerate() {
            if coin_at(k, offset.wrapping_add(i as u64)) {
                *o = b;
            }
        }
    }
}

multiversioned! {
    /// `acc[j] += w · noise(seed, offset + j)` in `f64`, for gradient estimates.
    pub fn accumulate(seed: u64, offset: u64, w: f64, acc: &mut [f64]) {
        let k = key(seed);
        for (i, a) in acc.iter_mut().enumerate() {
            *a += w * f64::from(value(k, offset.wrapping_add(i as u64)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn norm_constant_is_the_inverse_standard_deviation() {
        let sd = (4.0 * (65536.0f64 * 65536.0 - 1.0) / 12.0).sqrt();
        assert!((f64::from(NORM) * sd - 1.0).abs() < 1e-6);
    }

    #[test]
    fn fill_is_offset_consistent_and_seed_dependent() {
        let mut all = vec![0.0; 1000];
        fill(42, 0, &mut all);
        let mut tail = vec![0.0; 300];
        fill(42, 700, &mut tail);
        assert_eq!(&all[700..], &tail[..]);
        assert_eq!(all[17].to_bits(), at(42, 17).to_bits());
        let mut other = vec![0.0; 1000];
        fill(43, 0, &mut other);
        assert!(all.iter().zip(&other).filter(|(a, b)| a == b).count() < 10);
        // Neighbouring seeds are uncorrelated streams.
        let cross = all
            .iter()
            .zip(&other)
            .map(|(&a, &b)| f64::from(a) * f64::from(b))
            .sum::<f64>()
            / 1000.0;
        assert!(cross.abs() < 0.15, "seed 42 vs 43 correlation {cross}");
    }

    #[test]
    fn moments_are_those_of_a_unit_gaussian_approximation() {
        let n = 1 << 20;
        let mut v = vec![0.0; n];
        fill(7, 0, &mut v);
        let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / n as f64;
        let var = v
            .iter()
            .map(|&x| (f64::from(x) - mean).powi(2))
            .sum::<f64>()
            / n as f64;
        let k4 = v
            .iter()
            .map(|&x| (f64::from(x) - mean).powi(4))
            .sum::<f64>()
            / n as f64;
        assert!(mean.abs() < 0.005, "mean {mean}");
        assert!((var - 1.0).abs() < 0.01, "variance {var}");
        assert!(
            (k4 / (var * var) - 2.7).abs() < 0.05,
            "kurtosis {}",
            k4 / var / var
        );
        assert!(v.iter().all(|x| x.abs() <= 3.47));
        // Neighbouring values are uncorrelated.
        let lag1 = v
            .windows(2)
            .map(|w| f64::from(w[0]) * f64::from(w[1]))
            .sum::<f64>()
            / n as f64;
        assert!(lag1.abs() < 0.005, "lag-1 correlation {lag1}");
    }

    #[test]
    fn pinned_values_do_not_change_between_builds() {
        // The definition is a wire format: recipes sent to other hosts are
        // regenerated with it. These bits must never change.
        let got: Vec<u32> = (0..4).map(|i| at(0, i).to_bits()).collect();
        let again: Vec<u32> = (0..4).map(|i| at(0, i).to_bits()).collect();
        assert_eq!(got, again);
        assert_eq!(got, PINNED.to_vec(), "{got:#x?}");
    }

    #[test]
    fn the_coin_is_fair_offset_consistent_and_pinned() {
        let n = 1 << 16;
        let heads = (0..n).filter(|&i| coin(9, i)).count();
        assert!(
            (heads as f64 / n as f64 - 0.5).abs() < 0.01,
            "{heads} of {n}"
        );
        let a: Vec<f32> = (0..100).map(|i| i as f32).collect();
        let b: Vec<f32> = (0..100).map(|i| -(i as f32) - 1.0).collect();
        let mut out = a.clone();
        take_where_coin(9, 40, &b, &mut out);
        for i in 0..100 {
            let want = if coin(9, 40 + i as u64) { b[i] } else { a[i] };
            assert_eq!(out[i], want);
        }
        // A wire format too (GA recipes are rebuilt on other hosts).
        let bits: Vec<bool> = (0..8).map(|i| coin(0, i)).collect();
        assert_eq!(bits, PINNED_COINS.to_vec());
    }

    const PINNED_COINS: [bool; 8] = [true, false, true, true, false, false, true, true];

    const PINNED: [u32; 4] = [0x3f54_be9b, 0x3f80_93e5, 0xbf3e_dee2, 0x3ee9_e876];
}
