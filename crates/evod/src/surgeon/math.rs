//! The per-tensor arithmetic of the surgeon, on dequantized f32 values:
//! the noise of `mutate`, the interpolations of `merge` and the distances
//! of `diff`. Pure functions of their inputs (no state, no I/O).

/// Above this |cos θ| slerp falls back to linear interpolation (mergekit's
/// `DOT_THRESHOLD`): the vectors are nearly parallel and `sin θ` too small
/// to divide by.
pub const SLERP_DOT_THRESHOLD: f64 = 0.9995;
/// Norms at or below this are not normalised (mergekit's `eps`).
const SLERP_EPS: f64 = 1e-8;

/// The noise stream of tensor `name` under `seed`:
/// `xxh3_64_with_seed(name, seed)`, the same as `evod.gguf.mutate`'s in the
/// Python package, so a tensor's noise depends only on (seed, name).
pub fn stream(seed: u64, name: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(name.as_bytes(), seed)
}

/// Root mean square of `x`, summed in f64.
pub fn rms(x: &[f32]) -> f64 {
    if x.is_empty() {
        return 0.0;
    }
    (x.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>() / x.len() as f64).sqrt()
}

/// `(1 − t)·a + t·b` per element in f32, one rounding per operation (never
/// fused). `out` may not alias the inputs; all three have one length.
pub fn lerp(a: &[f32], b: &[f32], t: f32, out: &mut [f32]) {
    let s = 1.0 - t;
    for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
        *o = s * x + t * y;
    }
}

/// How [`slerp`] combined the two tensors.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Interpolation {
    /// Spherical, over the angle `theta` (radians) between them.
    Spherical {
        /// The angle between the tensors as vectors.
        theta: f64,
    },
    /// Linear: the tensors were nearly parallel (|cos θ| > 0.9995).
    Linear,
}

/// Spherical linear interpolation of two tensors taken as flat vectors, as
/// mergekit's `slerp` computes it: the angle comes from the normalised
/// vectors, the weights `sin((1−t)θ)/sin θ` and `sin(tθ)/sin θ` are
/// applied to the vectors as they are (so their norms are interpolated
/// too), and nearly parallel (or antiparallel) vectors are interpolated
/// linearly. Dot product, norms and the weighted sum are computed in f64,
/// each value rounded once to f32.
pub fn slerp(a: &[f32], b: &[f32], t: f32, out: &mut [f32]) -> Interpolation {
    let (mut dot, mut na, mut nb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (f64::from(x), f64::from(y));
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    let (na, nb) = (na.sqrt(), nb.sqrt());
    // mergekit normalises only vectors whose norm exceeds eps.
    let cos = dot / if na > SLERP_EPS { na } else { 1.0 } / if nb > SLERP_EPS { nb } else { 1.0 };
    if cos.abs() > SLERP_DOT_THRESHOLD {
        lerp(a, b, t, out);
        return Interpolation::Linear;
    }
    let theta = cos.acos();
    let t = f64::from(t);
    let sin_theta = theta.sin();
    let s0 = (theta - theta * t).sin() / sin_theta;
    let s1 = (theta * t).sin() / sin_theta;
    for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
        *o = (s0 * f64::from(x) + s1 * f64::from(y)) as f32;
    }
    Interpolation::Spherical { theta }
}

/// How far `b` is from `a`, value by value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Distance {
    /// ‖b − a‖₂ / ‖a‖₂ (‖b − a‖₂ itself when `a` is all zeros; pairs of
    /// NaNs are left out; NaN or infinite when a value of one side is).
    pub rel_l2: f64,
    /// max |b − a| (NaN if a difference is NaN).
    pub max_abs: f64,
    /// Values that differ (two NaNs count as equal; `0.0` and `-0.0` too).
    pub differing: u64,
}

/// The distance between two equally long value arrays, in f64.
pub fn distance(a: &[f32], b: &[f32]) -> Distance {
    let (mut d2, mut a2, mut max_abs, mut differing) = (0f64, 0f64, 0f64, 0u64);
    for (&x, &y) in a.iter().zip(b) {
        if x.is_nan() && y.is_nan() {
            continue;
        }
        if x == y {
            a2 += f64::from(x) * f64::from(x);
            continue;
        }
        differing += 1;
        let d = f64::from(y) - f64::from(x);
        d2 += d * d;
        a2 += f64::from(x) * f64::from(x);
        // NaN must win over any number: f64::max would drop it.
        max_abs = if d.is_nan() || max_abs.is_nan() {
            f64::NAN
        } else {
            max_abs.max(d.abs())
        };
    }
    let rel_l2 = if a2 > 0.0 {
        (d2 / a2).sqrt()
    } else {
        d2.sqrt()
    };
    Distance {
        rel_l2,
        max_abs,
        differing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lerp_endpoints_and_midpoint() {
        let a = [1.0, -2.0, 0.5];
        let b = [3.0, 2.0, 0.5];
        let mut o = [0.0; 3];
        lerp(&a, &b, 0.0, &mut o);
        assert_eq!(o, a);
        lerp(&a, &b, 1.0, &mut o);
        assert_eq!(o, b);
        lerp(&a, &b, 0.5, &mut o);
        assert_eq!(o, [2.0, 0.0, 0.5]);
    }

    #[test]
    fn slerp_of_orthogonal_unit_vectors_stays_on_the_circle() {
        let a = [1.0, 0.0];
        let b = [0.0, 1.0];
        let mut o = [0.0; 2];
        let how = slerp(&a, &b, 0.5, &mut o);
        match how {
            Interpolation::Spherical { theta } => {
                assert!((theta - std::f64::consts::FRAC_PI_2).abs() < 1e-12)
            }
            Interpolation::Linear => panic!("orthogonal vectors interpolated linearly"),
        }
        let h = std::f32::consts::FRAC_1_SQRT_2;
        assert!((o[0] - h).abs() < 1e-6 && (o[1] - h).abs() < 1e-6, "{o:?}");
        // Endpoints.
        slerp(&a, &b, 0.0, &mut o);
        assert_eq!(o, a);
        slerp(&a, &b, 1.0, &mut o);
        assert!((o[0]).abs() < 1e-7 && o[1] == 1.0, "{o:?}");
    }

    #[test]
    fn slerp_of_nearly_parallel_vectors_is_linear() {
        let a = [1.0, 2.0, 3.0];
        let b = [2.0, 4.0, 6.0001];
        let mut o = [0.0; 3];
        assert_eq!(slerp(&a, &b, 0.25, &mut o), Interpolation::Linear);
        let mut l = [0.0; 3];
        lerp(&a, &b, 0.25, &mut l);
        assert_eq!(o, l);
        // Antiparallel too (mergekit compares |cos θ|).
        let c = [-1.0, -2.0, -3.0];
        assert_eq!(slerp(&a, &c, 0.5, &mut o), Interpolation::Linear);
    }

    #[test]
    fn slerp_with_a_zero_vector_does_not_divide_by_zero() {
        let a = [0.0, 0.0];
        let b = [3.0, 4.0];
        let mut o = [0.0; 2];
        slerp(&a, &b, 0.5, &mut o);
        assert!(o.iter().all(|v| v.is_finite()), "{o:?}");
    }

    #[test]
    fn distance_counts_only_real_differences() {
        let d = distance(&[1.0, f32::NAN, 0.0, 2.0], &[1.0, f32::NAN, -0.0, 2.5]);
        assert_eq!(d.differing, 1);
        assert_eq!(d.max_abs, 0.5);
        assert!((d.rel_l2 - 0.5 / 5f64.sqrt()).abs() < 1e-12);
        let z = distance(&[0.0, 0.0], &[0.0, 3.0]);
        assert_eq!((z.rel_l2, z.max_abs, z.differing), (3.0, 3.0, 1));
        assert!(distance(&[1.0], &[f32::NAN]).max_abs.is_nan());
    }

    #[test]
    fn rms_of_known_values() {
        assert_eq!(rms(&[3.0, -4.0]), (12.5f64).sqrt());
        assert_eq!(rms(&[]), 0.0);
    }
}
