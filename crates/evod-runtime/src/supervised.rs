//! Small supervised tasks: XOR and sine regression, and the [`Dataset`]
//! scoring they share with [`crate::csv`].
//!
//! Fitness is the negative mean squared error over the whole data set
//! (higher is better, 0 is perfect); the evaluation seed is not used.
//!
//! - XOR: inputs `(a, b)` in `{0, 1}²`, target `a xor b` (one output); 4 rows.
//! - Sine: 64 points `x_k = -π + (k + 0.5)·2π/64`, input `x_k / π` (in
//!   `[-1, 1]`), target `sin(x_k)` (one output).

use crate::RuntimeError;
use crate::arch::Architecture;
use crate::mlp::{Scratch, forward_batch};

/// Inputs and targets, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// Values per input row.
    pub n_in: usize,
    /// Values per target row (1 for a class label).
    pub n_target: usize,
    /// `[rows][n_in]`.
    pub inputs: Vec<f32>,
    /// `[rows][n_target]`; for classification, the class index.
    pub targets: Vec<f32>,
}

impl Dataset {
    /// Number of rows.
    pub fn len(&self) -> usize {
        self.inputs.len().checked_div(self.n_in).unwrap_or(0)
    }

    /// True when there are no rows.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The network's outputs on every row, computed in chunks of rows of
    /// about [`crate::cartpole::TICK_WORK`] multiply-adds with `tick`
    /// called after each (rows are independent: the same values as one
    /// batch, bit for bit).
    fn outputs(
        &self,
        arch: &Architecture,
        params: &[f32],
        tick: &mut dyn FnMut(),
    ) -> Result<Vec<f32>, RuntimeError> {
        let (ni, no) = (arch.inputs(), arch.outputs());
        let mut out = vec![0.0; self.len() * no];
        let rows = (crate::cartpole::TICK_WORK / arch.n_params().max(1)).max(1);
        let mut scratch = Scratch::new();
        for (inputs, out) in self
            .inputs
            .chunks(rows * ni.max(1))
            .zip(out.chunks_mut(rows * no))
        {
            let batch = inputs.len() / ni.max(1);
            forward_batch(arch, params, inputs, batch, out, &mut scratch)?;
            tick();
        }
        Ok(out)
    }

    /// Negative mean squared error of the network's outputs against the
    /// targets, averaged over rows and outputs (accumulated in f64).
    pub fn neg_mse(&self, arch: &Architecture, params: &[f32]) -> Result<f64, RuntimeError> {
        self.neg_mse_with(arch, params, &mut || {})
    }

    /// [`Dataset::neg_mse`], calling `tick` every few milliseconds of
    /// network work (e.g. to refresh a heartbeat); the same value.
    pub fn neg_mse_with(
        &self,
        arch: &Architecture,
        params: &[f32],
        tick: &mut dyn FnMut(),
    ) -> Result<f64, RuntimeError> {
        let out = self.outputs(arch, params, tick)?;
        let n = out.len().max(1) as f64;
        let sum: f64 = out
            .iter()
            .zip(&self.targets)
            .map(|(&y, &t)| {
                let d = f64::from(y) - f64::from(t);
                d * d
            })
            .sum();
        Ok(-sum / n)
    }

    /// Negative mean cross-entropy of `softmax(outputs)` against the class
    /// labels (natural log, computed in f64 with the usual max shift).
    pub fn neg_cross_entropy(
        &self,
        arch: &Architecture,
        params: &[f32],
    ) -> Result<f64, RuntimeError> {
        self.neg_cross_entropy_with(arch, params, &mut || {})
    }

    /// [`Dataset::neg_cross_entropy`], calling `tick` every few
    /// milliseconds of network work; the same value.
    pub fn neg_cross_entropy_with(
        &self,
        arch: &Architecture,
        params: &[f32],
        tick: &mut dyn FnMut(),
    ) -> Result<f64, RuntimeError> {
        let k = arch.outputs();
        let out = self.outputs(arch, params, tick)?;
        let mut total = 0.0;
        for (row, &label) in out.chunks_exact(k).zip(&self.targets) {
            let max = row
                .iter()
                .fold(f64::NEG_INFINITY, |m, &v| m.max(f64::from(v)));
            let log_sum = row
                .iter()
                .map(|&v| (f64::from(v) - max).exp())
                .sum::<f64>()
                .ln();
            let picked = row.get(label as usize).copied().unwrap_or(f32::NAN);
            total += log_sum - (f64::from(picked) - max);
        }
        Ok(-total / self.len().max(1) as f64)
    }

    /// Fraction of rows whose argmax output (first maximum) is the label.
    pub fn accuracy(&self, arch: &Architecture, params: &[f32]) -> Result<f64, RuntimeError> {
        let k = arch.outputs();
        let out = self.outputs(arch, params, &mut || {})?;
        let correct = out
            .chunks_exact(k)
            .zip(&self.targets)
            .filter(|(row, label)| {
                let mut best = 0;
                for (i, &v) in row.iter().enumerate() {
                    if v > row[best] {
                        best = i;
                    }
                }
                best == **label as usize
            })
            .count();
        Ok(correct as f64 / self.len().max(1) as f64)
    }
}

/// The XOR truth table.
pub fn xor() -> Dataset {
    Dataset {
        n_in: 2,
        n_target: 1,
        inputs: vec![0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0],
        targets: vec![0.0, 1.0, 1.0, 0.0],
    }
}

/// Number of points of the sine task.
pub const SINE_POINTS: usize = 64;

/// Sine regression on [`SINE_POINTS`] points over one period.
pub fn sine() -> Dataset {
    let pi = std::f64::consts::PI;
    let xs: Vec<f64> = (0..SINE_POINTS)
        .map(|k| -pi + (k as f64 + 0.5) * 2.0 * pi / SINE_POINTS as f64)
        .collect();
    Dataset {
        n_in: 1,
        n_target: 1,
        inputs: xs.iter().map(|x| (x / pi) as f32).collect(),
        targets: xs.iter().map(|x| x.sin() as f32).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::Activation;

    #[test]
    fn xor_by_hand_is_perfect() {
        // h0 = relu(a + b), h1 = relu(a + b - 1), y = h0 - 2 h1
        let arch = Architecture::new(vec![2, 2, 1], Activation::Relu).unwrap();
        let params = [1.0, 1.0, 1.0, 1.0, 0.0, -1.0, 1.0, -2.0, 0.0];
        assert_eq!(xor().neg_mse(&arch, &params).unwrap(), 0.0);
        let zero = [0.0; 9];
        assert_eq!(xor().neg_mse(&arch, &zero).unwrap(), -0.5);
    }

    #[test]
    fn sine_of_zero_network_is_minus_half() {
        let arch = Architecture::new(vec![1, 4, 1], Activation::Tanh).unwrap();
        let f = sine().neg_mse(&arch, &vec![0.0; arch.n_params()]).unwrap();
        // mean of sin² over a period is 1/2
        assert!((f + 0.5).abs() < 1e-6, "{f}");
    }

    #[test]
    fn classification_scores() {
        let data = Dataset {
            n_in: 1,
            n_target: 1,
            inputs: vec![-1.0, 1.0],
            targets: vec![0.0, 1.0],
        };
        // 1-2 identity: out = [-x, x]
        let arch = Architecture::new(vec![1, 2], Activation::Identity).unwrap();
        assert_eq!(data.accuracy(&arch, &[-1.0, 1.0, 0.0, 0.0]).unwrap(), 1.0);
        assert_eq!(data.accuracy(&arch, &[1.0, -1.0, 0.0, 0.0]).unwrap(), 0.0);
        let ce = data
            .neg_cross_entropy(&arch, &[-1.0, 1.0, 0.0, 0.0])
            .unwrap();
        let want = -(1.0 + (-2.0f64).exp()).ln();
        assert!((ce - want).abs() < 1e-9, "{ce} vs {want}");
        // All-zero outputs: cross-entropy is ln 2.
        let ce0 = data.neg_cross_entropy(&arch, &[0.0; 4]).unwrap();
        assert!((ce0 + 2f64.ln()).abs() < 1e-12);
    }
}
