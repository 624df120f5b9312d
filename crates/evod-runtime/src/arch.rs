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
    /// Widths of every layer, the input layer first; at least two entries
    /// (empty for a [`Family::ControlVector`]).
    pub layers: Vec<usize>,
    /// Activation after each hidden layer; the output layer is the identity.
    pub activation: Activation,
    /// What the parameters are: evod's MLP, or a llama.cpp control vector.
    pub family: Family,
}

/// Value of `general.architecture` for a llama.cpp control vector.
pub const CONTROL_VECTOR_NAME: &str = "controlvector";

/// Widest control vector accepted (`n_embd`).
pub const MAX_EMBD: usize = 1 << 16;
/// Most direction tensors accepted in a control vector.
pub const MAX_DIRECTIONS: usize = 1024;

/// The kind of parameter set an [`Architecture`] describes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub enum Family {
    /// evod's fully connected network (`layers`, `activation`), tensors
    /// `blk.N.weight` / `blk.N.bias`.
    #[default]
    Mlp,
    /// A llama.cpp control vector (the layout `cvector-generator` writes
    /// and `llama_set_adapter_cvec` takes): F32 tensors `direction.1` …
    /// `direction.{directions}`, `n_embd` values each, one per layer of
    /// the base model after the first. It has no forward pass of its own:
    /// it steers the base model named by `model_hint`.
    ControlVector {
        /// Width of each direction (the base model's `n_embd`).
        n_embd: usize,
        /// Direction tensors (the base model's `n_layer - 1`).
        directions: usize,
        /// The base model's `general.architecture` (`llama`, …).
        model_hint: String,
        /// The directions evolve as one (`evod.controlvector.tied`): every
        /// mutation adds the same noise to each of them, so a vector whose
        /// directions start equal keeps them equal — one steering direction
        /// of `n_embd` values, applied at every layer, searched in `n_embd`
        /// dimensions instead of `n_embd × directions`. The file is still
        /// an ordinary control vector (every direction written out).
        tied: bool,
    },
}

impl Architecture {
    /// An architecture from its layer sizes and activation, validated.
    pub fn new(layers: Vec<usize>, activation: Activation) -> Result<Architecture, RuntimeError> {
        let arch = Architecture {
            layers,
            activation,
            family: Family::Mlp,
        };
        arch.validate()?;
        Ok(arch)
    }

    /// A control vector of `directions` tensors of `n_embd` values for a
    /// base model of architecture `model_hint`, validated.
    pub fn control_vector(
        n_embd: usize,
        directions: usize,
        model_hint: &str,
    ) -> Result<Architecture, RuntimeError> {
        let arch = Architecture {
            layers: Vec::new(),
            activation: Activation::Identity,
            family: Family::ControlVector {
                n_embd,
                directions,
                model_hint: model_hint.to_owned(),
                tied: false,
            },
        };
        arch.validate()?;
        Ok(arch)
    }

    /// This control vector with its directions tied (`true`: they evolve
    /// as one, see [`Family::ControlVector`]) or not; an MLP is returned
    /// unchanged.
    pub fn with_tied_directions(mut self, tie: bool) -> Architecture {
        if let Family::ControlVector { tied, .. } = &mut self.family {
            *tied = tie;
        }
        self
    }

    /// Whether this is a control vector whose directions evolve as one.
    pub fn tied_directions(&self) -> bool {
        matches!(self.family, Family::ControlVector { tied: true, .. })
    }

    /// [`Architecture::validate`], and an MLP: the check of every forward
    /// pass (a control vector has none).
    pub fn validate_mlp(&self) -> Result<(), RuntimeError> {
        self.validate()?;
        if !self.is_mlp() {
            return Err(RuntimeError::NoForwardPass {
                what: self.to_string(),
            });
        }
        Ok(())
    }

    /// Whether this is evod's MLP (it has a forward pass).
    pub fn is_mlp(&self) -> bool {
        self.family == Family::Mlp
    }

    /// `(n_embd, directions)` of a control vector.
    pub fn control_vector_shape(&self) -> Option<(usize, usize)> {
        match &self.family {
            Family::ControlVector {
                n_embd, directions, ..
            } => Some((*n_embd, *directions)),
            Family::Mlp => None,
        }
    }

    /// Whether a tensor named `name` is one this family's files own
    /// (`blk.N.weight|bias`, or `direction.N`), whatever the sizes.
    pub fn owns_tensor_name(&self, name: &str) -> bool {
        match self.family {
            Family::Mlp => crate::model::is_block_tensor(name),
            Family::ControlVector { .. } => name
                .strip_prefix("direction.")
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())),
        }
    }

    /// Checks the sizes: 2 to [`MAX_LAYERS`] layers, each 1 to
    /// [`MAX_LAYER_WIDTH`] wide, at most [`MAX_PARAMS`] parameters.
    pub fn validate(&self) -> Result<(), RuntimeError> {
        let bad = |reason: String| Err(RuntimeError::InvalidArchitecture { reason });
        if let Family::ControlVector {
            n_embd, directions, ..
        } = self.family
        {
            if n_embd == 0 || n_embd > MAX_EMBD {
                return bad(format!(
                    "control vector width {n_embd}, expected 1 to {MAX_EMBD}"
                ));
            }
            if directions == 0 || directions > MAX_DIRECTIONS {
                return bad(format!(
                    "{directions} control vector directions, expected 1 to {MAX_DIRECTIONS}"
                ));
            }
            if !self.layers.is_empty() {
                return bad("a control vector has no layer widths".into());
            }
            return Ok(());
        }
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
        if let Some((_, d)) = self.control_vector_shape() {
            return d;
        }
        self.layers.len().saturating_sub(1)
    }

    /// Total number of parameters (weights and biases).
    pub fn n_params(&self) -> usize {
        if let Some((w, d)) = self.control_vector_shape() {
            return w.saturating_mul(d);
        }
        self.layers
            .windows(2)
            .map(|w| w[0].saturating_mul(w[1]).saturating_add(w[1]))
            .fold(0usize, usize::saturating_add)
    }

    /// `(name, ggml dims)` of every tensor, in flat-vector order:
    /// `blk.N.weight` with dims `[in, out]` and `blk.N.bias` with dims `[out]`.
    pub fn tensor_specs(&self) -> Vec<(String, Vec<u64>)> {
        if let Some((w, d)) = self.control_vector_shape() {
            return (1..=d)
                .map(|k| (format!("direction.{k}"), vec![w as u64]))
                .collect();
        }
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
        if let Some((w, d)) = self.control_vector_shape() {
            return (0..d).map(|k| (k * w, w)).collect();
        }
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
        if let Some((w, d)) = self.control_vector_shape() {
            return format!("{d}x{w} (control vector)");
        }
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
        if let Family::ControlVector {
            n_embd,
            directions,
            model_hint,
            tied,
        } = &self.family
        {
            let tied = if *tied { ", tied" } else { "" };
            return write!(
                f,
                "control vector for {model_hint}: {directions} directions of {n_embd}{tied}"
            );
        }
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
    fn a_control_vector_is_direction_1_to_n() {
        let a = Architecture::control_vector(4, 3, "llama").unwrap();
        assert_eq!(a.n_params(), 12);
        assert_eq!(
            a.tensor_specs(),
            vec![
                ("direction.1".to_owned(), vec![4]),
                ("direction.2".to_owned(), vec![4]),
                ("direction.3".to_owned(), vec![4]),
            ]
        );
        assert_eq!(a.tensor_ranges(), vec![(0, 4), (4, 4), (8, 4)]);
        assert!(!a.is_mlp());
        assert_eq!((a.inputs(), a.outputs()), (0, 0));
        assert!(a.owns_tensor_name("direction.12"));
        assert!(!a.owns_tensor_name("direction.x"));
        assert!(!a.owns_tensor_name("blk.0.weight"));
        for (w, d) in [(0, 3), (4, 0), (MAX_EMBD + 1, 1), (4, MAX_DIRECTIONS + 1)] {
            assert!(
                Architecture::control_vector(w, d, "llama").is_err(),
                "{w} {d}"
            );
        }
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
