//! The MLP forward pass: single precision, no allocation per call.
//!
//! Arithmetic is defined exactly so that other implementations (the numpy
//! reference in `tests/py/`) can reproduce it bit for bit: every output `j`
//! of a layer starts from its bias and adds `w[j][i] * x[i]` for
//! `i = 0, 1, …` in order, each product and sum rounded to `f32` (no fused
//! multiply-add); then the hidden activation ([`activate`]) is applied; the
//! output layer has no activation.

use crate::RuntimeError;
use crate::arch::{Activation, Architecture};

/// Clamp bound of [`tanh`]: beyond it the rational form would exceed 1.
// The constants are written as the f64 literals of Eigen's `ptanh_float`
// rounded once to f32, exactly as `np.float32(literal)` does in the reference.
/// Clamp bound of [`tanh`]: beyond it the rational form would exceed 1.
const TANH_CLAMP: f32 = 7.905_311_107_635_498_f64 as f32;
// Numerator (odd powers) and denominator (even powers) of the approximation.
const TANH_A: [f32; 7] = [
    4.893_524_558_917_86e-3_f64 as f32,
    6.372_619_288_754_36e-4_f64 as f32,
    1.485_722_357_179_79e-5_f64 as f32,
    5.122_297_090_371_14e-8_f64 as f32,
    -8.604_671_522_137_35e-11_f64 as f32,
    2.000_187_904_824_77e-13_f64 as f32,
    -2.760_768_477_423_55e-16_f64 as f32,
];
const TANH_B: [f32; 4] = [
    4.893_525_185_543_85e-3_f64 as f32,
    2.268_434_632_439_00e-3_f64 as f32,
    1.185_347_056_866_54e-4_f64 as f32,
    1.198_258_394_667_02e-6_f64 as f32,
];

/// evod's `tanh`: a rational approximation in `f32` (relative error below
/// 4e-7, a few ULP, for normal results; the result is within `[-1, 1]`).
///
/// Exactly: clamp `x` to `±7.905311`, `x2 = x*x`, numerator
/// `p = x * (((((((a6*x2 + a5)*x2 + a4)*x2 + a3)*x2 + a2)*x2 + a1)*x2 + a0)`,
/// denominator `q = ((b3*x2 + b2)*x2 + b1)*x2 + b0`, result `p / q`, every
/// operation rounded to `f32`. NaN stays NaN.
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    let x = x.clamp(-TANH_CLAMP, TANH_CLAMP);
    let x2 = x * x;
    let mut p = x2 * TANH_A[6] + TANH_A[5];
    p = x2 * p + TANH_A[4];
    p = x2 * p + TANH_A[3];
    p = x2 * p + TANH_A[2];
    p = x2 * p + TANH_A[1];
    p = x2 * p + TANH_A[0];
    p *= x;
    let mut q = x2 * TANH_B[3] + TANH_B[2];
    q = x2 * q + TANH_B[1];
    q = x2 * q + TANH_B[0];
    p / q
}

/// Applies `activation` to one value (see [`Activation`] for definitions).
#[inline(always)]
pub fn activate(activation: Activation, x: f32) -> f32 {
    match activation {
        Activation::Tanh => tanh(x),
        Activation::Relu => {
            if x > 0.0 {
                x
            } else {
                0.0
            }
        }
        Activation::Sigmoid => 0.5 * tanh(0.5 * x) + 0.5,
        Activation::Identity => x,
    }
}

#[inline(always)]
fn activate_all(activation: Activation, xs: &mut [f32]) {
    // One loop per activation so that each one vectorises.
    match activation {
        Activation::Tanh => xs.iter_mut().for_each(|x| *x = tanh(*x)),
        Activation::Relu => xs
            .iter_mut()
            .for_each(|x| *x = activate(Activation::Relu, *x)),
        Activation::Sigmoid => xs
            .iter_mut()
            .for_each(|x| *x = activate(Activation::Sigmoid, *x)),
        Activation::Identity => {}
    }
}

/// Reusable buffers for [`forward_batch`]; grows on first use only.
#[derive(Debug, Default, Clone)]
pub struct Scratch {
    a: Vec<f32>,
    b: Vec<f32>,
}

impl Scratch {
    /// Empty scratch space.
    pub fn new() -> Scratch {
        Scratch::default()
    }
}

/// Runs the network on `batch` inputs.
///
/// `inputs` is row-major `[batch][arch.inputs()]`, `out` row-major
/// `[batch][arch.outputs()]`; `params` is the flat vector described in
/// [`crate::arch`]. Every length is checked; nothing is allocated once
/// `scratch` has grown to the widest layer.
pub fn forward_batch(
    arch: &Architecture,
    params: &[f32],
    inputs: &[f32],
    batch: usize,
    out: &mut [f32],
    scratch: &mut Scratch,
) -> Result<(), RuntimeError> {
    arch.validate_mlp()?;
    arch.check_params(params)?;
    let (n_in, n_out) = (arch.inputs(), arch.outputs());
    let check = |what: &'static str, expected: Option<usize>, found: usize| match expected {
        Some(e) if e == found => Ok(()),
        _ => Err(RuntimeError::BufferSize {
            what,
            expected: expected.unwrap_or(usize::MAX),
            found,
        }),
    };
    check("input", batch.checked_mul(n_in), inputs.len())?;
    check("output", batch.checked_mul(n_out), out.len())?;
    let widest = arch.layers.iter().copied().max().unwrap_or(0);
    scratch.a.resize(widest.max(scratch.a.len()), 0.0);
    scratch.b.resize(widest.max(scratch.b.len()), 0.0);
    let last = arch.n_blocks() - 1;
    for (x, y) in inputs.chunks_exact(n_in).zip(out.chunks_exact_mut(n_out)) {
        scratch.a[..n_in].copy_from_slice(x);
        let mut at = 0;
        for (n, w) in arch.layers.windows(2).enumerate() {
            let (li, lo) = (w[0], w[1]);
            let weights = &params[at..at + li * lo];
            let bias = &params[at + li * lo..at + li * lo + lo];
            at += li * lo + lo;
            let (src, dst) = (&scratch.a[..li], &mut scratch.b[..lo]);
            for ((d, row), &b) in dst.iter_mut().zip(weights.chunks_exact(li)).zip(bias) {
                let mut acc = b;
                for (&wv, &xv) in row.iter().zip(src) {
                    acc += wv * xv;
                }
                *d = acc;
            }
            if n != last {
                activate_all(arch.activation, dst);
            }
            std::mem::swap(&mut scratch.a, &mut scratch.b);
        }
        y.copy_from_slice(&scratch.a[..n_out]);
    }
    Ok(())
}

/// Lanes per chunk of [`Mlp`]'s padded layers.
const LANES: usize = 8;

/// A network prepared for many single-input forward passes (a policy):
/// each layer's weights transposed once into panels of [`BLOCK`] outputs
/// (`[in][BLOCK]` each, stored one after another, so a sweep over the
/// inputs reads memory in order) and padded with zero weights to a multiple
/// of 8 outputs. Same arithmetic, bit for bit, as [`forward_batch`]
/// (padding lanes are never read): every output keeps its own accumulator,
/// bias first, then `+ w[j][i] * x[i]` for `i = 0, 1, …`; a panel only lets
/// [`BLOCK`] independent accumulators share one sweep over the inputs, so
/// that the additions of different outputs overlap instead of each waiting
/// on the one before.
#[derive(Debug, Clone)]
pub struct Mlp {
    arch: Architecture,
    /// Per block: (in, padded out, weights in panels (see [`panel`]),
    /// padded bias).
    blocks: Vec<(usize, usize, Vec<f32>, Vec<f32>)>,
    /// Activations of every layer (padded), concatenated, input layer first.
    acts: Vec<f32>,
    offsets: Vec<usize>,
}

/// Samples [`MlpLanes::forward`] runs side by side.
pub const BATCH_LANES: usize = 8;

/// One value of each of [`BATCH_LANES`] samples: the lane-major layout of
/// [`MlpLanes`] (`x[i][lane]` is input `i` of sample `lane`).
pub type Lanes = [f32; BATCH_LANES];

/// Outputs per panel of [`Mlp`]'s weights: eight vectors of [`LANES`]
/// accumulators, which the vector registers hold through a sweep.
const BLOCK: usize = 8 * LANES;

/// The panel holding output `j` of a layer of `li` inputs and `lp` padded
/// outputs: `(start, width)`, the panel being `wt[start .. start + li ·
/// width]` with weight `(i, j)` at `start + i · width + j % BLOCK`.
#[inline(always)]
fn panel(li: usize, lp: usize, j: usize) -> (usize, usize) {
    let c0 = j - j % BLOCK;
    (li * c0, BLOCK.min(lp - c0))
}

impl Mlp {
    /// Prepares `params` for `arch`; checks the parameter count.
    pub fn new(arch: &Architecture, params: &[f32]) -> Result<Mlp, RuntimeError> {
        arch.validate_mlp()?;
        arch.check_params(params)?;
        let pad = |w: usize| w.div_ceil(LANES) * LANES;
        let mut blocks = Vec::with_capacity(arch.n_blocks());
        for w in arch.layers.windows(2) {
            let (li, lo) = (w[0], w[1]);
            let lp = pad(lo);
            blocks.push((li, lp, vec![0.0f32; li * lp], vec![0.0f32; lp]));
        }
        let mut offsets = Vec::with_capacity(arch.layers.len() + 1);
        let mut total = 0;
        for &w in &arch.layers {
            offsets.push(total);
            total += pad(w);
        }
        offsets.push(total);
        let mut mlp = Mlp {
            arch: arch.clone(),
            blocks,
            acts: vec![0.0; total],
            offsets,
        };
        mlp.reload(params)?;
        Ok(mlp)
    }

    /// The architecture this network was built for.
    pub fn arch(&self) -> &Architecture {
        &self.arch
    }

    /// Replaces the parameters with `params` (same architecture), reusing
    /// every buffer: no allocation. Checks the parameter count.
    pub fn reload(&mut self, params: &[f32]) -> Result<(), RuntimeError> {
        self.arch.check_params(params)?;
        let mut at = 0;
        for (w, (_, lp, wt, bias)) in self.arch.layers.windows(2).zip(&mut self.blocks) {
            let (li, lo, lp) = (w[0], w[1], *lp);
            let weights = &params[at..at + li * lo];
            // Transposed one panel at a time, input by input: input `i` of
            // the panel's rows (one value from each of `width` rows, whose
            // cache lines serve the next inputs too) becomes one panel row,
            // written in order (a row-by-row transpose of a 10^7-weight
            // layer misses on every write).
            for j0 in (0..lo).step_by(BLOCK) {
                let (start, width) = panel(li, lp, j0);
                let rows = (lo - j0).min(width);
                let p = &mut wt[start..start + li * width];
                for (i, dst) in p.chunks_exact_mut(width).enumerate() {
                    for (jj, d) in dst[..rows].iter_mut().enumerate() {
                        *d = weights[(j0 + jj) * li + i];
                    }
                }
            }
            bias[..lo].copy_from_slice(&params[at + li * lo..at + li * lo + lo]);
            at += li * lo + lo;
        }
        Ok(())
    }

    /// Runs one input; returns the output layer. Panics if `input` is not
    /// exactly `arch.inputs()` long (callers own that size).
    #[inline]
    pub fn forward(&mut self, input: &[f32]) -> &[f32] {
        self.forward_inline(input)
    }

    /// [`Mlp::forward`], always inlined: callers compiled for wider vector
    /// units get the wide instructions.
    #[inline(always)]
    pub(crate) fn forward_inline(&mut self, input: &[f32]) -> &[f32] {
        let n_in = self.arch.inputs();
        self.acts[..n_in].copy_from_slice(input);
        let last = self.blocks.len() - 1;
        let activation = self.arch.activation;
        for (n, (li, lp, wt, bias)) in self.blocks.iter().enumerate() {
            let (li, lp) = (*li, *lp);
            let (head, tail) = self.acts.split_at_mut(self.offsets[n + 1]);
            let src = &head[self.offsets[n]..self.offsets[n] + li];
            let dst = &mut tail[..lp];
            let hidden = (n != last).then_some(activation);
            let mut c = 0;
            while c + BLOCK <= lp {
                let (start, width) = panel(li, lp, c);
                let p = &wt[start..start + li * width];
                panel_outputs::<BLOCK>(src, p, width, 0, &bias[c..], &mut dst[c..], hidden);
                c += BLOCK;
            }
            // The last, narrower panel, one vector of outputs at a time.
            if c < lp {
                let (start, width) = panel(li, lp, c);
                let p = &wt[start..start + li * width];
                for k in (0..width).step_by(LANES) {
                    panel_outputs::<LANES>(
                        src,
                        p,
                        width,
                        k,
                        &bias[c + k..],
                        &mut dst[c + k..],
                        hidden,
                    );
                }
            }
        }
        let out = self.arch.outputs();
        let start = self.offsets[self.offsets.len() - 2];
        &self.acts[start..start + out]
    }
}

/// `N` outputs of one layer of [`Mlp`] from the panel `p` (rows of `width`
/// weights, one per input) starting at column `col`: `dst[k] = bias[k] +
/// p[0][col + k]·src[0] + p[1][col + k]·src[1] + …`, each product and sum
/// rounded to `f32` in that order, then `hidden`'s activation if any.
#[inline(always)]
fn panel_outputs<const N: usize>(
    src: &[f32],
    p: &[f32],
    width: usize,
    col: usize,
    bias: &[f32],
    dst: &mut [f32],
    hidden: Option<Activation>,
) {
    let mut acc = [0.0f32; N];
    acc.copy_from_slice(&bias[..N]);
    for (&xv, row) in src.iter().zip(p.chunks_exact(width)) {
        let w: &[f32; N] = row[col..col + N].try_into().unwrap_or(&[0.0; N]);
        for k in 0..N {
            acc[k] += w[k] * xv;
        }
    }
    if let Some(a) = hidden {
        activate_all(a, &mut acc);
    }
    dst[..N].copy_from_slice(&acc);
}

/// [`BATCH_LANES`] networks of one architecture run side by side, each
/// lane with its own parameters (the same policy in every lane, or several
/// candidates at once).
///
/// Everything is lane-major: parameter `p` of lane `k` is `params[p][k]`
/// (the flat layout of [`crate::arch`] per lane), inputs and activations
/// `x[i][k]`. Each lane's arithmetic is exactly that of [`forward_batch`]
/// (bias, then `+ w[j][i] * x[i]` for `i` in order, no fused
/// multiply-add), so every lane equals [`Mlp::forward`] bit for bit; the
/// lanes only let independent samples share vector instructions and hide
/// each other's latency.
#[derive(Debug, Clone)]
pub struct MlpLanes {
    arch: Architecture,
    params: Vec<Lanes>,
    acts: Vec<Lanes>,
    /// Start of each layer in `acts`, plus the total.
    offsets: Vec<usize>,
}

impl MlpLanes {
    /// Lanes for `arch`, every lane holding `params`.
    pub fn new(arch: &Architecture, params: &[f32]) -> Result<MlpLanes, RuntimeError> {
        arch.validate_mlp()?;
        arch.check_params(params)?;
        let mut offsets = Vec::with_capacity(arch.layers.len() + 1);
        let mut total = 0;
        for &w in &arch.layers {
            offsets.push(total);
            total += w;
        }
        offsets.push(total);
        Ok(MlpLanes {
            arch: arch.clone(),
            params: params.iter().map(|&p| [p; BATCH_LANES]).collect(),
            acts: vec![[0.0; BATCH_LANES]; total],
            offsets,
        })
    }

    /// The architecture of every lane.
    pub fn arch(&self) -> &Architecture {
        &self.arch
    }

    /// Gives lane `lane` (below [`BATCH_LANES`]) the parameters `params`.
    pub fn set_lane(&mut self, lane: usize, params: &[f32]) -> Result<(), RuntimeError> {
        self.arch.check_params(params)?;
        if lane >= BATCH_LANES {
            return Err(RuntimeError::LaneIndex {
                lane,
                lanes: BATCH_LANES,
            });
        }
        self.load_lane(lane, params);
        Ok(())
    }

    /// [`MlpLanes::set_lane`] for arguments the caller has checked; extra or
    /// missing values and a lane out of range are ignored.
    #[inline]
    pub(crate) fn load_lane(&mut self, lane: usize, params: &[f32]) {
        for (slot, &p) in self.params.iter_mut().zip(params) {
            if let Some(v) = slot.get_mut(lane) {
                *v = p;
            }
        }
    }

    /// Runs one input per lane (`input[i][k]`: input `i` of lane `k`);
    /// returns the output layer the same way (`out[j][k]`). Panics if
    /// `input` is not exactly `arch.inputs()` long (callers own that size).
    #[inline]
    pub fn forward(&mut self, input: &[Lanes]) -> &[Lanes] {
        self.forward_inline(input)
    }

    /// [`MlpLanes::forward`], always inlined: callers compiled for wider
    /// vector units (`cartpole`'s lockstep runner) get the wide
    /// instructions.
    #[inline(always)]
    pub(crate) fn forward_inline(&mut self, input: &[Lanes]) -> &[Lanes] {
        let n_in = self.arch.inputs();
        self.acts[..n_in].copy_from_slice(input);
        let last = self.arch.n_blocks() - 1;
        let activation = self.arch.activation;
        let mut at = 0;
        for (n, w) in self.arch.layers.windows(2).enumerate() {
            let (li, lo) = (w[0], w[1]);
            let weights = &self.params[at..at + li * lo];
            let bias = &self.params[at + li * lo..at + li * lo + lo];
            at += li * lo + lo;
            let (head, tail) = self.acts.split_at_mut(self.offsets[n + 1]);
            let src = &head[self.offsets[n]..];
            let dst = &mut tail[..lo];
            for ((d, row), b) in dst.iter_mut().zip(weights.chunks_exact(li)).zip(bias) {
                let mut acc = *b;
                for (wv, x) in row.iter().zip(src) {
                    for k in 0..BATCH_LANES {
                        acc[k] += wv[k] * x[k];
                    }
                }
                if n != last {
                    activate_all(activation, &mut acc);
                }
                *d = acc;
            }
        }
        let start = self.offsets[self.offsets.len() - 2];
        &self.acts[start..start + self.arch.outputs()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tanh_is_close_and_bounded() {
        let mut x = -20.0f32;
        while x < 20.0 {
            let got = f64::from(tanh(x));
            let want = f64::from(x).tanh();
            assert!(got.abs() <= 1.0, "tanh({x}) = {got}");
            let tol = 4e-7 * want.abs() + 1e-30;
            assert!((got - want).abs() <= tol, "tanh({x}) = {got}, want {want}");
            x += 0.000_731;
        }
        assert!(tanh(f32::NAN).is_nan());
        assert_eq!(tanh(f32::INFINITY), tanh(TANH_CLAMP));
        assert_eq!(tanh(0.0), 0.0);
    }

    #[test]
    fn activations() {
        assert_eq!(activate(Activation::Relu, -1.5), 0.0);
        assert_eq!(activate(Activation::Relu, 2.5), 2.5);
        assert_eq!(activate(Activation::Identity, -3.0), -3.0);
        assert!((activate(Activation::Sigmoid, 0.0) - 0.5).abs() < 1e-7);
        assert!((activate(Activation::Sigmoid, 3.0) - 0.952_574_1).abs() < 1e-6);
    }

    #[test]
    fn forward_matches_hand_computation() {
        // 2-2-1 identity: y = w1 . (W0 x + b0) + b1
        let arch = Architecture::new(vec![2, 2, 1], Activation::Identity).unwrap();
        let params = [1.0, 2.0, 3.0, 4.0, 0.5, -0.5, 1.0, -1.0, 0.25];
        let mut out = [0.0; 2];
        forward_batch(
            &arch,
            &params,
            &[1.0, 1.0, 0.0, 2.0],
            2,
            &mut out,
            &mut Scratch::new(),
        )
        .unwrap();
        // sample 0: h = [3.5, 6.5], y = 3.5 - 6.5 + 0.25
        // sample 1: h = [4.5, 7.5], y = 4.5 - 7.5 + 0.25
        assert_eq!(out, [-2.75, -2.75]);
    }

    #[test]
    fn mlp_equals_forward_batch_bit_for_bit() {
        for act in Activation::ALL {
            let arch = Architecture::new(vec![3, 7, 5, 2], act).unwrap();
            let params: Vec<f32> = (0..arch.n_params())
                .map(|i| ((i * 7919 % 113) as f32 - 56.0) / 17.0)
                .collect();
            let inputs: Vec<f32> = (0..30).map(|i| (i as f32 - 15.0) / 3.3).collect();
            let mut out = vec![0.0; 20];
            forward_batch(&arch, &params, &inputs, 10, &mut out, &mut Scratch::new()).unwrap();
            let mut mlp = Mlp::new(&arch, &params).unwrap();
            for (x, y) in inputs.chunks(3).zip(out.chunks(2)) {
                let got = mlp.forward(x);
                assert_eq!(got[0].to_bits(), y[0].to_bits());
                assert_eq!(got[1].to_bits(), y[1].to_bits());
            }
        }
    }

    #[test]
    fn mlp_panels_equal_forward_batch_bit_for_bit() {
        // Widths around the panel size: whole panels, a narrower last
        // panel, padding, one output; and a reload with other parameters.
        for layers in [
            vec![4, 150, 70, 2],
            vec![5, 64, 128, 1],
            vec![3, 200, 9],
            vec![65, 63, 8],
        ] {
            let arch = Architecture::new(layers, Activation::Tanh).unwrap();
            let make = |k: usize| -> Vec<f32> {
                (0..arch.n_params())
                    .map(|i| (((i + k) * 7919 % 113) as f32 - 56.0) / 170.0)
                    .collect()
            };
            let n_in = arch.inputs();
            let inputs: Vec<f32> = (0..5 * n_in).map(|i| (i as f32 - 15.0) / 3.3).collect();
            let mut mlp = Mlp::new(&arch, &make(0)).unwrap();
            for k in [0, 1] {
                let params = make(k);
                if k > 0 {
                    mlp.reload(&params).unwrap();
                }
                let mut out = vec![0.0; 5 * arch.outputs()];
                forward_batch(&arch, &params, &inputs, 5, &mut out, &mut Scratch::new()).unwrap();
                for (x, y) in inputs.chunks(n_in).zip(out.chunks(arch.outputs())) {
                    let got: Vec<u32> = mlp.forward(x).iter().map(|v| v.to_bits()).collect();
                    let want: Vec<u32> = y.iter().map(|v| v.to_bits()).collect();
                    assert_eq!(got, want, "{:?}", arch.layers);
                }
            }
        }
    }

    #[test]
    fn lanes_equal_forward_bit_for_bit() {
        for act in Activation::ALL {
            let arch = Architecture::new(vec![3, 7, 5, 2], act).unwrap();
            let lane_params: Vec<Vec<f32>> = (0..BATCH_LANES)
                .map(|k| {
                    (0..arch.n_params())
                        .map(|i| ((i * 7919 % 113) as f32 - 56.0 + k as f32) / 17.0)
                        .collect()
                })
                .collect();
            let mut lanes = MlpLanes::new(&arch, &lane_params[0]).unwrap();
            let mut input = [[0.0f32; BATCH_LANES]; 3];
            for (i, row) in input.iter_mut().enumerate() {
                for (k, v) in row.iter_mut().enumerate() {
                    *v = ((i * 11 + k * 5) as f32 - 20.0) / 3.7;
                }
            }
            // Every lane with lane 0's parameters, then each with its own.
            for own in [false, true] {
                if own {
                    for (k, p) in lane_params.iter().enumerate() {
                        lanes.set_lane(k, p).unwrap();
                    }
                }
                let out = lanes.forward(&input).to_vec();
                assert_eq!(out.len(), 2);
                for k in 0..BATCH_LANES {
                    let mut mlp = Mlp::new(&arch, &lane_params[if own { k } else { 0 }]).unwrap();
                    let y = mlp.forward(&[input[0][k], input[1][k], input[2][k]]);
                    assert_eq!(y[0].to_bits(), out[0][k].to_bits(), "{act:?} lane {k}");
                    assert_eq!(y[1].to_bits(), out[1][k].to_bits(), "{act:?} lane {k}");
                }
                assert_ne!(out[0][0], out[0][1]);
            }
        }
    }

    #[test]
    fn wrong_sizes_are_errors() {
        let arch = Architecture::new(vec![2, 3, 1], Activation::Tanh).unwrap();
        let params = vec![0.0; arch.n_params()];
        let mut s = Scratch::new();
        let mut out = [0.0; 2];
        assert!(matches!(
            forward_batch(&arch, &params[1..], &[0.0; 4], 2, &mut out, &mut s),
            Err(RuntimeError::ParamCount {
                expected: 13,
                found: 12
            })
        ));
        assert!(matches!(
            forward_batch(&arch, &params, &[0.0; 3], 2, &mut out, &mut s),
            Err(RuntimeError::BufferSize { what: "input", .. })
        ));
        assert!(matches!(
            forward_batch(&arch, &params, &[0.0; 4], 2, &mut out[..1], &mut s),
            Err(RuntimeError::BufferSize { what: "output", .. })
        ));
        assert!(Mlp::new(&arch, &params[..5]).is_err());
        assert!(MlpLanes::new(&arch, &params[..5]).is_err());
        let mut lanes = MlpLanes::new(&arch, &params).unwrap();
        assert!(matches!(
            lanes.set_lane(0, &params[1..]),
            Err(RuntimeError::ParamCount { .. })
        ));
        assert!(matches!(
            lanes.set_lane(BATCH_LANES, &params),
            Err(RuntimeError::LaneIndex {
                lane: BATCH_LANES,
                ..
            })
        ));
    }
}
