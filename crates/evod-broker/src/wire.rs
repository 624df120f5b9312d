//! Wire types: what travels through the broker, and its compact encoding.
//!
//! A task (version 2), little-endian. Kind 1, ES recipes against one base:
//!
//! ```text
//! u8 version | u8 kind = 1 | u8 flags | u8 run length | run | u64 generation | u64 base hash
//! | u64 episode seed | u32 episodes
//! | u32 first candidate | u8 count | count × (u64 seed | u32 σ bits | u8 sign | u8 scale)
//! ```
//!
//! Each recipe is [`Recipe::to_bytes`] without its base checksum (the
//! task's base hash stands for it), so a candidate costs 14 bytes plus its
//! share of a 37-byte-plus-run header. Kind 2, GA children as recipes
//! against their parents:
//!
//! ```text
//! u8 version | u8 kind = 2 | u8 flags | u8 run length | run | u64 generation
//! | u64 episode seed | u32 episodes | u32 first candidate | u8 count
//! | count × GA recipe
//! ```
//!
//! each GA recipe as [`GaRecipe::encode_into`] writes it (form, parent
//! checksum, the second parent and the crossover's seed or α, the
//! mutation's scale rule, seed and σ per tensor): 9 bytes for an elite
//! copy, 20 + 4 per tensor for a mutated child, 16 (uniform) or 12
//! (arithmetic) more for a crossed one. Parents are
//! bases published by checksum, fetched once per host. Candidates are
//! `first..first+count`; each is evaluated over `episodes` episodes
//! seeded from the episode seed (the evolver's training or gate seed), so
//! its fitness is the same on every host. A build that knows only kind 1
//! refuses a kind-2 task by name (`WireError::Kind`), never misreads it.
//!
//! `flags` says what the evaluation is for: bit 0 ([`FLAG_GATE`]) marks
//! the publish gate's task, whose candidate a task with a held-out split
//! (perplexity) scores on the held-out data the evolver never trains on;
//! clear, a training task. Other bits are refused (`WireError::Flags`), so
//! a later flag is never ignored. Version 1 (no flags byte: every task a
//! training task) is refused by this build, and a version-1 build refuses
//! these tasks (`WireError::Version`): a gate is never misread as training.
//!
//! A result (version 2, the same layout as version 1):
//!
//! ```text
//! u8 version | u8 run length | run | u64 generation | u32 candidate | f64 fitness
//! | u8 host length | host
//! ```
//!
//! Decoding treats the bytes as untrusted: every length is checked before
//! it is used, names are `[A-Za-z0-9._-]{1,64}`, recipes go through
//! [`Recipe::from_bytes`] and [`GaRecipe::decode`], a NaN fitness and
//! trailing bytes are refused.

use evod_evolve::{GaRecipe, RECIPE_BYTES, Recipe};

use crate::error::WireError;

/// The wire version this build writes and reads (2: tasks carry a flags
/// byte, [`FLAG_GATE`]).
pub const WIRE_VERSION: u8 = 2;
/// Task flag: the publish gate's evaluation (held-out data), not training.
pub const FLAG_GATE: u8 = 1;
/// Task kind: ES candidates as recipes against one base.
pub const KIND_RECIPES: u8 = 1;
/// Task kind: GA children as recipes against their parents.
pub const KIND_GA: u8 = 2;
/// Most candidates in one task.
pub const MAX_TASK_CANDIDATES: usize = 255;
/// Longest run or host name.
pub const MAX_NAME: usize = 64;
/// Most episodes per candidate a task may ask for.
pub const MAX_EPISODES: u32 = 1_000_000;
/// Bytes of one recipe in a task (a [`Recipe`] without its base).
pub const TASK_RECIPE_BYTES: usize = RECIPE_BYTES - 8;

/// Checks a run or host name: 1 to 64 characters of `[A-Za-z0-9._-]`.
pub fn check_name(what: &'static str, field: &'static str, name: &str) -> Result<(), WireError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(WireError::Name {
            what,
            field,
            name: name.chars().take(80).collect(),
        })
    }
}

/// The candidates of a task.
#[derive(Debug, Clone, PartialEq)]
pub enum Work {
    /// ES candidates (kind 1): recipes against one base.
    Recipes {
        /// [`evod_evolve::Base::checksum`] of the base every recipe
        /// applies to.
        base: u64,
        /// The candidates (each with `base` equal to the task's).
        recipes: Vec<Recipe>,
    },
    /// GA candidates (kind 2): recipes against their parents, each
    /// parent a base published under its checksum.
    Ga(Vec<GaRecipe>),
}

impl Work {
    /// Candidates.
    pub fn len(&self) -> usize {
        match self {
            Self::Recipes { recipes, .. } => recipes.len(),
            Self::Ga(r) => r.len(),
        }
    }

    /// No candidates.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The checksums of the bases the candidates need (ES: the base; GA:
    /// every parent named), each once, in first-named order.
    pub fn bases(&self) -> Vec<u64> {
        match self {
            Self::Recipes { base, .. } => vec![*base],
            Self::Ga(r) => {
                let mut out = Vec::new();
                for h in r.iter().flat_map(GaRecipe::parents) {
                    if !out.contains(&h) {
                        out.push(h);
                    }
                }
                out
            }
        }
    }

    /// `kind` byte of the encoding.
    pub fn kind(&self) -> u8 {
        match self {
            Self::Recipes { .. } => KIND_RECIPES,
            Self::Ga(_) => KIND_GA,
        }
    }
}

/// A unit of work: some candidates of one evaluation round.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    /// Run the task belongs to.
    pub run: String,
    /// Generation (the coordinator's evaluation round).
    pub generation: u64,
    /// Episode seed of the evaluation (the evolver's training or gate
    /// seed of the generation).
    pub seed: u64,
    /// Episodes per candidate (1..=[`MAX_EPISODES`]).
    pub episodes: u32,
    /// Candidate index of the first candidate; the others follow.
    pub first: u32,
    /// The publish gate's evaluation ([`FLAG_GATE`]): scored on held-out
    /// data where the task has any; `false`, a training evaluation.
    pub gate: bool,
    /// The candidates.
    pub work: Work,
}

impl Task {
    /// Candidate indices this task covers.
    pub fn candidates(&self) -> std::ops::Range<u32> {
        self.first..self.first + self.work.len() as u32
    }

    /// The encoding described in the module docs. Refuses a task this
    /// build could not read back (bad name, no or too many candidates, a
    /// recipe for another base, candidate indices past `u32`).
    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        check_name("task", "run", &self.run)?;
        let n = self.work.len();
        if n == 0 || n > MAX_TASK_CANDIDATES {
            return Err(WireError::Bound {
                what: "task",
                field: "candidate count",
                got: n as u64,
                min: 1,
                max: MAX_TASK_CANDIDATES as u64,
            });
        }
        if u64::from(self.first) + n as u64 > u64::from(u32::MAX) {
            return Err(WireError::Bound {
                what: "task",
                field: "first candidate",
                got: self.first.into(),
                min: 0,
                max: u64::from(u32::MAX) - n as u64,
            });
        }
        if self.episodes == 0 || self.episodes > MAX_EPISODES {
            return Err(WireError::Bound {
                what: "task",
                field: "episodes",
                got: self.episodes.into(),
                min: 1,
                max: MAX_EPISODES.into(),
            });
        }
        let mut out = Vec::with_capacity(37 + self.run.len() + n * TASK_RECIPE_BYTES);
        let flags = if self.gate { FLAG_GATE } else { 0 };
        out.extend_from_slice(&[WIRE_VERSION, self.work.kind(), flags, self.run.len() as u8]);
        out.extend_from_slice(self.run.as_bytes());
        out.extend_from_slice(&self.generation.to_le_bytes());
        if let Work::Recipes { base, .. } = &self.work {
            out.extend_from_slice(&base.to_le_bytes());
        }
        out.extend_from_slice(&self.seed.to_le_bytes());
        out.extend_from_slice(&self.episodes.to_le_bytes());
        out.extend_from_slice(&self.first.to_le_bytes());
        out.push(n as u8);
        match &self.work {
            Work::Recipes { base, recipes } => {
                for (index, r) in recipes.iter().enumerate() {
                    if r.base != *base {
                        return Err(WireError::Recipe {
                            index,
                            source: evod_evolve::RecipeError::WrongBase {
                                want: *base,
                                have: r.base,
                            },
                        });
                    }
                    out.extend_from_slice(&r.to_bytes()[8..]);
                }
            }
            Work::Ga(recipes) => {
                for (index, r) in recipes.iter().enumerate() {
                    r.encode_into(&mut out)
                        .map_err(|source| WireError::Recipe { index, source })?;
                }
            }
        }
        Ok(out)
    }

    /// Decodes untrusted bytes (see the module docs).
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new("task", bytes);
        r.version()?;
        let kind = r.u8("kind")?;
        if kind != KIND_RECIPES && kind != KIND_GA {
            return Err(WireError::Kind(kind));
        }
        let flags = r.u8("flags")?;
        if flags & !FLAG_GATE != 0 {
            return Err(WireError::Flags(flags));
        }
        let run = r.name("run")?;
        let generation = r.u64("generation")?;
        let base = if kind == KIND_RECIPES {
            Some(r.u64("base hash")?)
        } else {
            None
        };
        let seed = r.u64("episode seed")?;
        let episodes = r.u32("episodes")?;
        if episodes == 0 || episodes > MAX_EPISODES {
            return Err(WireError::Bound {
                what: "task",
                field: "episodes",
                got: episodes.into(),
                min: 1,
                max: MAX_EPISODES.into(),
            });
        }
        let first = r.u32("first candidate")?;
        let n = r.u8("candidate count")? as usize;
        if n == 0 || u64::from(first) + n as u64 > u64::from(u32::MAX) {
            return Err(WireError::Bound {
                what: "task",
                field: "candidate count",
                got: n as u64,
                min: 1,
                max: (u64::from(u32::MAX) - u64::from(first)).min(MAX_TASK_CANDIDATES as u64),
            });
        }
        let work = match base {
            Some(base) => {
                let body = r.take("recipes", n * TASK_RECIPE_BYTES)?;
                r.end()?;
                let mut recipes = Vec::with_capacity(n);
                let mut full = [0u8; RECIPE_BYTES];
                full[..8].copy_from_slice(&base.to_le_bytes());
                for (index, chunk) in body.chunks_exact(TASK_RECIPE_BYTES).enumerate() {
                    full[8..].copy_from_slice(chunk);
                    let recipe = Recipe::from_bytes(&full)
                        .map_err(|source| WireError::Recipe { index, source })?;
                    recipes.push(recipe);
                }
                Work::Recipes { base, recipes }
            }
            None => {
                let mut recipes = Vec::with_capacity(n);
                for index in 0..n {
                    let (recipe, used) = GaRecipe::decode(r.bytes)
                        .map_err(|source| WireError::Recipe { index, source })?;
                    r.take("GA recipe", used)?;
                    recipes.push(recipe);
                }
                r.end()?;
                Work::Ga(recipes)
            }
        };
        Ok(Self {
            run,
            generation,
            seed,
            episodes,
            first,
            gate: flags & FLAG_GATE != 0,
            work,
        })
    }
}

/// One candidate's fitness, as an evaluator reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskResult {
    /// Run.
    pub run: String,
    /// Generation.
    pub generation: u64,
    /// Candidate index within the generation.
    pub candidate: u32,
    /// Fitness (never NaN; ±∞ allowed for a diverged candidate).
    pub fitness: f64,
    /// Host (consumer name) that evaluated it.
    pub host: String,
}

impl TaskResult {
    /// The encoding described in the module docs.
    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        check_name("result", "run", &self.run)?;
        check_name("result", "host", &self.host)?;
        if self.fitness.is_nan() {
            return Err(WireError::Fitness {
                candidate: self.candidate,
            });
        }
        let mut out = Vec::with_capacity(23 + self.run.len() + self.host.len());
        out.extend_from_slice(&[WIRE_VERSION, self.run.len() as u8]);
        out.extend_from_slice(self.run.as_bytes());
        out.extend_from_slice(&self.generation.to_le_bytes());
        out.extend_from_slice(&self.candidate.to_le_bytes());
        out.extend_from_slice(&self.fitness.to_le_bytes());
        out.push(self.host.len() as u8);
        out.extend_from_slice(self.host.as_bytes());
        Ok(out)
    }

    /// Decodes untrusted bytes (see the module docs).
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new("result", bytes);
        r.version()?;
        let run = r.name("run")?;
        let generation = r.u64("generation")?;
        let candidate = r.u32("candidate")?;
        let fitness = f64::from_bits(r.u64("fitness")?);
        if fitness.is_nan() {
            return Err(WireError::Fitness { candidate });
        }
        let host = r.name("host")?;
        r.end()?;
        Ok(Self {
            run,
            generation,
            candidate,
            fitness,
            host,
        })
    }
}

/// A bounds-checked cursor over untrusted bytes.
struct Reader<'a> {
    what: &'static str,
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(what: &'static str, bytes: &'a [u8]) -> Self {
        Self { what, bytes }
    }

    fn take(&mut self, field: &'static str, need: usize) -> Result<&'a [u8], WireError> {
        if self.bytes.len() < need {
            return Err(WireError::Truncated {
                what: self.what,
                field,
                need,
                have: self.bytes.len(),
            });
        }
        let (head, tail) = self.bytes.split_at(need);
        self.bytes = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], WireError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(field, N)?);
        Ok(out)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, WireError> {
        Ok(self.array::<1>(field)?[0])
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }

    fn version(&mut self) -> Result<(), WireError> {
        let got = self.u8("version")?;
        if got == WIRE_VERSION {
            Ok(())
        } else {
            Err(WireError::Version {
                what: self.what,
                got,
                want: WIRE_VERSION,
            })
        }
    }

    fn name(&mut self, field: &'static str) -> Result<String, WireError> {
        let len = self.u8(field)? as usize;
        let raw = self.take(field, len)?;
        let name = String::from_utf8_lossy(raw).into_owned();
        check_name(self.what, field, &name)?;
        Ok(name)
    }

    fn end(&self) -> Result<(), WireError> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(WireError::Trailing {
                what: self.what,
                extra: self.bytes.len(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use evod_evolve::{Blend, Cross, Mutation, Sign, TensorScale};

    use super::*;

    fn task(n: usize) -> Task {
        Task {
            run: "run-1".into(),
            generation: 7,
            seed: 99,
            episodes: 3,
            first: 32,
            gate: false,
            work: Work::Recipes {
                base: 0xdead_beef,
                recipes: (0..n)
                    .map(|i| {
                        let sign = if i % 2 == 0 { Sign::Plus } else { Sign::Minus };
                        Recipe::new(0xdead_beef, i as u64 / 2, 0.05, sign, TensorScale::Glorot)
                    })
                    .collect(),
            },
        }
    }

    /// A GA task: an elite copy, a mutated child, a uniform and an
    /// arithmetic crossover (4 tensors).
    fn ga_task() -> Task {
        let m = |seed| {
            Some(Mutation {
                seed,
                scale: TensorScale::Glorot,
                sigma_bits: vec![0.5f32.to_bits(); 4],
            })
        };
        Task {
            run: "run-1".into(),
            generation: 8,
            seed: 5,
            episodes: 2,
            first: 0,
            gate: false,
            work: Work::Ga(vec![
                GaRecipe::copy_of(1),
                GaRecipe {
                    parent: 2,
                    cross: None,
                    mutation: m(10),
                },
                GaRecipe {
                    parent: 1,
                    cross: Some(Cross {
                        parent: 2,
                        blend: Blend::Uniform { seed: 3 },
                    }),
                    mutation: m(11),
                },
                GaRecipe {
                    parent: 3,
                    cross: Some(Cross {
                        parent: 1,
                        blend: Blend::Arithmetic {
                            alpha_bits: 0.5f32.to_bits(),
                        },
                    }),
                    mutation: m(12),
                },
            ]),
        }
    }

    #[test]
    fn ga_tasks_round_trip_name_their_parents_and_refuse_bad_bytes() {
        let t = ga_task();
        let bytes = t.encode().unwrap();
        // Header 29 + run 5; elite 9, mutated 9 + 1 + 8 + 2 + 16,
        // uniform and arithmetic crossovers 16 + 8 / 16 + 4 more.
        assert_eq!(bytes.len(), 34 + 9 + 36 + 52 + 48);
        assert_eq!(bytes[1], KIND_GA);
        assert_eq!(Task::decode(&bytes).unwrap(), t);
        assert_eq!(t.work.bases(), vec![1, 2, 3]);
        assert_eq!(t.candidates(), 0..4);
        for len in 0..bytes.len() {
            assert!(
                Task::decode(&bytes[..len]).is_err(),
                "prefix of {len} bytes"
            );
        }
        let mut long = bytes.clone();
        long.push(0);
        assert!(matches!(
            Task::decode(&long),
            Err(WireError::Trailing { extra: 1, .. })
        ));
        // σ NaN in the second candidate: refused naming it.
        let mut nan = bytes.clone();
        let at = 34 + 9 + 1 + 8 + 1 + 8 + 2;
        nan[at..at + 4].copy_from_slice(&f32::NAN.to_bits().to_le_bytes());
        let e = Task::decode(&nan).unwrap_err();
        assert!(matches!(e, WireError::Recipe { index: 1, .. }), "{e}");
        assert!(
            e.to_string().contains("candidate 1") && e.to_string().contains("σ NaN"),
            "{e}"
        );
        // Kind 3 is nobody's: refused by name.
        let mut other = bytes.clone();
        other[1] = 3;
        assert_eq!(Task::decode(&other), Err(WireError::Kind(3)));
        // Every single-byte change decodes or is refused, never panics.
        for i in 0..bytes.len() {
            for v in [0u8, 1, 2, 4, 0x7f, 0xff] {
                let mut b = bytes.clone();
                b[i] = v;
                let _ = Task::decode(&b);
            }
        }
    }

    #[test]
    fn task_round_trips_and_is_compact() {
        let t = task(16);
        let bytes = t.encode().unwrap();
        assert_eq!(bytes.len(), 37 + 5 + 16 * TASK_RECIPE_BYTES);
        assert_eq!(Task::decode(&bytes).unwrap(), t);
        assert_eq!(t.candidates(), 32..48);
    }

    #[test]
    fn the_gate_flag_round_trips_and_unknown_flags_are_refused() {
        for (mut t, at) in [(task(2), 2), (ga_task(), 2)] {
            assert_eq!(t.encode().unwrap()[at], 0);
            t.gate = true;
            let bytes = t.encode().unwrap();
            assert_eq!(bytes[at], FLAG_GATE);
            let back = Task::decode(&bytes).unwrap();
            assert!(back.gate);
            assert_eq!(back, t);
            let mut other = bytes.clone();
            other[at] = FLAG_GATE | 2;
            assert_eq!(Task::decode(&other), Err(WireError::Flags(3)));
        }
        // A version-1 task (no flags byte) is refused, never read as one
        // of this version; a version-1 build refuses ours the same way.
        let mut old = task(2).encode().unwrap();
        old.remove(2);
        old[0] = 1;
        assert!(matches!(
            Task::decode(&old),
            Err(WireError::Version {
                got: 1,
                want: 2,
                ..
            })
        ));
    }

    #[test]
    fn result_round_trips() {
        let r = TaskResult {
            run: "run-1".into(),
            generation: 3,
            candidate: 9,
            fitness: -12.5,
            host: "host-a".into(),
        };
        assert_eq!(TaskResult::decode(&r.encode().unwrap()).unwrap(), r);
    }

    #[test]
    fn every_truncation_is_refused() {
        let bytes = task(3).encode().unwrap();
        for len in 0..bytes.len() {
            assert!(
                matches!(
                    Task::decode(&bytes[..len]),
                    Err(WireError::Truncated { .. })
                ),
                "prefix of {len} bytes"
            );
        }
        let mut long = bytes.clone();
        long.push(0);
        assert!(matches!(
            Task::decode(&long),
            Err(WireError::Trailing { extra: 1, .. })
        ));
    }

    #[test]
    fn refuses_by_name() {
        let mut bytes = task(2).encode().unwrap();
        bytes[0] = 3;
        assert!(matches!(
            Task::decode(&bytes),
            Err(WireError::Version {
                got: 3,
                want: 2,
                ..
            })
        ));
        let mut bytes = task(2).encode().unwrap();
        bytes[1] = 9;
        assert_eq!(Task::decode(&bytes), Err(WireError::Kind(9)));
        let mut bytes = task(2).encode().unwrap();
        bytes[4] = b'/';
        assert!(matches!(Task::decode(&bytes), Err(WireError::Name { .. })));
        // σ NaN in the second recipe.
        let mut bytes = task(2).encode().unwrap();
        let at = 37 + 5 + TASK_RECIPE_BYTES + 8;
        bytes[at..at + 4].copy_from_slice(&f32::NAN.to_bits().to_le_bytes());
        assert!(matches!(
            Task::decode(&bytes),
            Err(WireError::Recipe { index: 1, .. })
        ));
        // Zero episodes (offset: 4 + run 5 + generation, base, seed).
        let mut bytes = task(2).encode().unwrap();
        bytes[33..37].copy_from_slice(&0u32.to_le_bytes());
        assert!(matches!(
            Task::decode(&bytes),
            Err(WireError::Bound {
                field: "episodes",
                ..
            })
        ));
        let mut t = task(2);
        t.episodes = 0;
        assert!(matches!(t.encode(), Err(WireError::Bound { .. })));
        // A recipe for another base cannot be encoded.
        let mut t = task(2);
        if let Work::Recipes { recipes, .. } = &mut t.work {
            recipes[1].base = 1;
        }
        assert!(matches!(
            t.encode(),
            Err(WireError::Recipe { index: 1, .. })
        ));
        let r = TaskResult {
            run: "r".into(),
            generation: 0,
            candidate: 1,
            fitness: f64::NAN,
            host: "h".into(),
        };
        assert_eq!(r.encode(), Err(WireError::Fitness { candidate: 1 }));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap fuzz: every single-byte change of a valid task decodes or
        // is refused, never panics.
        let bytes = task(4).encode().unwrap();
        for i in 0..bytes.len() {
            for v in [0u8, 1, 0x7f, 0xff] {
                let mut b = bytes.clone();
                b[i] = v;
                let _ = Task::decode(&b);
            }
        }
    }
}
