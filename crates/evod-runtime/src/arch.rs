//! The network family evod evolves: a fully connected MLP described by its
//! layer sizes and one hidden-layer activation.
//!
//! The parameters of an [`Architecture`] live in one flat `f32` vector, in
//! this order: `blk.0.weight`, `blk.0.bias`, `blk.1.weight`, `blk.1.bias`, …
//! Each weight block is row-major `[out][in]` (the value that multiplies input
//! `i` into output `j` is at `j * in + i`), which is the GGUF tensor with ggml
//! dims `[in, out]` (`ne0 = in`, the fastest-varying index). A 4-16-2 network
//! has `4*16 + 16 + 16*2 + 2 = 114` parameters.

use std::fmt;
use std::str::FromStr;

use crate::RuntimeError;

/// Largest accepted layer width; keeps every size product far from overflow.
pub const MAX_LAYER_WIDTH: usize = 1 << 16;
/// Largest accepted number of layers (including the input layer).
pub const MAX_LAYERS: usize = 64;
/// Largest accepted total parameter count (2^28 floats, 1 GiB of f32).
pub const MAX_PARAMS: usize = 1 << 28;

/// The activation applied after every hidden layer (the output layer is
/// always the identity).
///
/// `tanh` is evod's own single-precision rational approximation
/// ([`crate::mlp::tanh`], within a few ULP of the exact value, `|tanh| ≤ 1`);
/// `sigmoid(x)` is defined as `0.5 * tanh(0.5 * x) + 0.5` with that same
/// function; `relu(x)` is `x` when `x > 0`, else `0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Activation {
    /// Hyperbolic tangent.
    Tanh,
    /// Rectified linear unit.
    Relu,
    /// Logistic sigmoid.
    Sigmoid,
    /// No activation.
    Identity,
}

impl Activation {
    /// Every activation, in documentation order.
    pub const ALL: [Activation; 4] = [
        Activation::Tanh,
        Activation::Relu,
        Activation::Sigmoid,
        Activation::Identity,
    ];

    /// The lowercase name used on the command line and in model files.
    pub fn name(self) -> &'static str {
        match self {
            Activation::Tanh => "tanh",
            Activation::Relu => "relu",
            Activation::Sigmoid => "sigmoid",
            Activation::Identity => "identity",
        }
    }
}

impl fmt::Display for Activation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Activation {
    type Err = RuntimeError;

    fn from_str(s: &str) -> Result<Activation, RuntimeError> {
        Activation::ALL
            .into_iter()
            .find(|a| a.name() == s)
            .ok_or_else(|| RuntimeError::UnknownActivation(s.to_owned()))
    }
}

/// Layer sizes (input first, output last) and the hidden activation.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Architecture {
    /// Widths of every layer, the input layer first; at least two entries.
    pub layers: Vec<usize>,
    /// Activation after each hidden layer; the output layer is the identity.
    pub activation: Activation,
}

impl Architecture {
    /// An architecture from its layer sizes and activation, validated.
    pub fn new(layers: Vec<usize>, activation: Activation) -> Result<Architecture, RuntimeError> {
        let arch = Architecture { layers, activation };
        arch.validate()?;
        Ok(arch)
    }

    /// Checks the sizes: 2 to [`MAX_LAYERS`] layers, each 1 to
    /// [`MAX_LAYER_WIDTH`] wide, at most [`MAX_PARAMS`] parameters.
    pub fn validate(&self) -> Result<(), RuntimeError> {
        let bad = |reason: String| Err(RuntimeError::InvalidArchitecture { reason });
        if self.layers.len() < 2 {
            return bad(format!(
                "needs at least an input and an output layer, got {} layer(s)",
                self.layers.len()
            ));
        }
        if self.layers.len() > MAX_LAYERS {
            return bad(format!(
                "{} layers is more than the limit of {MAX_LAYERS}",
                self.layers.len()
            ));
        }
        if let Some((i, &w)) = self
            .layers
            .iter()
            .enumerate()
            .find(|&(_, &w)| w == 0 || w > MAX_LAYER_WIDTH)
        {
            return bad(format!(
                "layer {i} has width {w}, expected 1 to {MAX_LAYER_WIDTH}"
            ));
        }
        // Widths are ≤ 2^16 and there are ≤ 64 layers, so this cannot overflow.
        let n = self.n_params();
        if n > MAX_PARAMS {
            return bad(format!(
                "{n} parameters is more than the limit of {MAX_PARAMS}"
            ));
        }
        Ok(())
    }

    /// Width of the input layer.
    pub fn inputs(&self) -> usize {
        self.layers.first().copied().unwrap_or(0)
    }

    /// Width of the output layer.
    pub fn outputs(&self) -> usize {
        self.layers.last().copied().unwrap_or(0)
    }

    /// Number of weight layers (blocks `blk.0` … `blk.{n-1}`).
    pub fn n_blocks(&self) -> usize {
        self.layers.len().saturating_sub(1)
    }

    /// Total number of parameters (weights and biases).
    pub fn n_params(&self) -> usize {
        self.layers
            .windows(2)
            .map(|w| w[0].saturating_mul(w[1]).saturating_add(w[1]))
            .fold(0usize, usize::saturating_add)
    }

    /// `(name, ggml dims)` of every tensor, in flat-vector order:
    /// `blk.N.weight` with dims `[in, out]` and `blk.N.bias` with dims `[out]`.
    pub fn tensor_specs(&self) -> Vec<(String, Vec<u64>)> {
        let mut specs = Vec::with_capacity(2 * self.n_blocks());
        for (n, w) in self.layers.windows(2).enumerate() {
            specs.push((format!("blk.{n}.weight"), vec![w[0] as u64, w[1] as u64]));
            specs.push((format!("blk.{n}.bias"), vec![w[1] as u64]));
        }
        specs
    }

    /// `(offset, len)` of every tensor of [`Architecture::tensor_specs`] in the
    /// flat parameter vector.
    pub fn tensor_ranges(&self) -> Vec<(usize, usize)> {
        let mut out = Vec::with_capacity(2 * self.n_blocks());
        let mut at = 0;
        for w in self.layers.windows(2) {
            out.push((at, w[0] * w[1]));
            at += w[0] * w[1];
            out.push((at, w[1]));
            at += w[1];
        }
        out
    }

    /// The layer sizes joined by commas, as `--layers` takes them (`4,16,2`).
    pub fn layers_string(&self) -> String {
        self.layers
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Parses `--layers` syntax: comma-separated widths such as `4,16,2`.
    pub fn parse_layers(s: &str) -> Result<Vec<usize>, RuntimeError> {
        s.split(',')
            .map(|part| {
                part.trim()
                    .parse::<usize>()
                    .map_err(|_| RuntimeError::InvalidArchitecture {
                        reason: format!(
                            "layer size {part:?} in {s:?} is not a non-negative integer"
                        ),
                    })
            })
            .collect()
    }

    /// Checks that `params` has exactly [`Architecture::n_params`] values.
    pub fn check_params(&self, params: &[f32]) -> Result<(), RuntimeError> {
        let expected = self.n_params();
        if params.len() != expected {
            return Err(RuntimeError::ParamCount {
                expected,
                found: params.len(),
            });
        }
        Ok(())
    }
}

impl fmt::Display for Architecture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sizes: Vec<String> = self.layers.iter().map(usize::to_string).collect();
        write!(f, "{} {}", sizes.join("-"), self.activation)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cartpole_policy_has_114_params() {
        let arch = Architecture::new(vec![4, 16, 2], Activation::Tanh).unwrap();
        assert_eq!(arch.n_params(), 114);
        assert_eq!(
            arch.tensor_specs(),
            vec![
                ("blk.0.weight".to_owned(), vec![4, 16]),
                ("blk.0.bias".to_owned(), vec![16]),
                ("blk.1.weight".to_owned(), vec![16, 2]),
                ("blk.1.bias".to_owned(), vec![2]),
            ]
        );
        assert_eq!(
            arch.tensor_ranges(),
            vec![(0, 64), (64, 16), (80, 32), (112, 2)]
        );
    }

    #[test]
    fn invalid_architectures_are_rejected() {
        for layers in [vec![], vec![4], vec![4, 0, 2], vec![4, MAX_LAYER_WIDTH + 1]] {
            let err = Architecture::new(layers.clone(), Activation::Relu).unwrap_err();
            assert!(
                matches!(err, RuntimeError::InvalidArchitecture { .. }),
                "{layers:?}: {err}"
            );
        }
        let huge = vec![MAX_LAYER_WIDTH; 3];
        assert!(Architecture::new(huge, Activation::Tanh).is_err());
    }

    #[test]
    fn activation_names_round_trip() {
        for a in Activation::ALL {
            assert_eq!(a.to_string().parse::<Activation>().unwrap(), a);
        }
        assert!("softmax".parse::<Activation>().is_err());
    }

    #[test]
    fn layers_parse() {
        assert_eq!(
            Architecture::parse_layers("4, 16,2").unwrap(),
            vec![4, 16, 2]
        );
        assert!(Architecture::parse_layers("4,x,2").is_err());
        assert!(Architecture::parse_layers("4,-1").is_err());
    }
}
