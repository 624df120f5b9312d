//! numpy's default random stream, reproduced bit-exactly:
//! `numpy.random.Generator(PCG64(SeedSequence(seed)))` and its `uniform`.
//!
//! gymnasium seeds every environment this way (`reset(seed=s)` calls
//! `np.random.Generator(np.random.PCG64(np.random.SeedSequence(s)))`), so
//! reproducing CartPole's initial states needs exactly these three pieces:
//!
//! - [`SeedSequence`]: numpy's entropy pool (pool size 4 words, the hash
//!   mixing of `numpy/random/bit_generator.pyx`) and `generate_state`;
//! - [`Pcg64`]: the 128-bit LCG with numpy's default multiplier and the XSL-RR
//!   output function, seeded with `srandom(state, inc)` from four 64-bit
//!   words of `generate_state(4, uint64)`;
//! - [`Pcg64::uniform`]: `low + (high - low) * next_double()` where
//!   `next_double() = (next_u64() >> 11) * 2^-53`.
//!
//! Only non-negative integer seeds below 2^64 are supported (numpy accepts
//! arbitrary precision integers; evod's seeds are `u64`).

const POOL_SIZE: usize = 4;
const INIT_A: u32 = 0x43b0_d7e5;
const MULT_A: u32 = 0x931e_8875;
const INIT_B: u32 = 0x8b51_f9dd;
const MULT_B: u32 = 0x58f3_8ded;
const MIX_MULT_L: u32 = 0xca01_f9dd;
const MIX_MULT_R: u32 = 0x4973_f715;
const XSHIFT: u32 = 16;

/// numpy's `SeedSequence` for an integer entropy value and no spawn key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedSequence {
    pool: [u32; POOL_SIZE],
}

fn hashmix(value: u32, hash_const: &mut u32) -> u32 {
    let mut value = value ^ *hash_const;
    *hash_const = hash_const.wrapping_mul(MULT_A);
    value = value.wrapping_mul(*hash_const);
    value ^ (value >> XSHIFT)
}

fn mix(x: u32, y: u32) -> u32 {
    let result = MIX_MULT_L
        .wrapping_mul(x)
        .wrapping_sub(MIX_MULT_R.wrapping_mul(y));
    result ^ (result >> XSHIFT)
}

impl SeedSequence {
    /// `SeedSequence(entropy)`: the entropy is split into 32-bit words, least
    /// significant first (one word when it fits in 32 bits), then mixed into
    /// the pool.
    pub fn new(entropy: u64) -> SeedSequence {
        let lo = entropy as u32;
        let hi = (entropy >> 32) as u32;
        let words: &[u32] = if hi == 0 { &[lo] } else { &[lo, hi] };
        let mut pool = [0u32; POOL_SIZE];
        let mut hash_const = INIT_A;
        for (i, slot) in pool.iter_mut().enumerate() {
            *slot = hashmix(words.get(i).copied().unwrap_or(0), &mut hash_const);
        }
        for i_src in 0..POOL_SIZE {
            for i_dst in 0..POOL_SIZE {
                if i_src != i_dst {
                    let h = hashmix(pool[i_src], &mut hash_const);
                    pool[i_dst] = mix(pool[i_dst], h);
                }
            }
        }
        // Entropy words beyond the pool size (never more than 2 here).
        for &word in words.iter().skip(POOL_SIZE) {
            for slot in pool.iter_mut() {
                let h = hashmix(word, &mut hash_const);
                *slot = mix(*slot, h);
            }
        }
        SeedSequence { pool }
    }

    /// The mixed entropy pool (`SeedSequence.pool`).
    pub fn pool(&self) -> [u32; POOL_SIZE] {
        self.pool
    }

    /// `generate_state(n_words, dtype=np.uint32)`.
    pub fn generate_state_u32(&self, out: &mut [u32]) {
        let mut hash_const = INIT_B;
        for (i, slot) in out.iter_mut().enumerate() {
            let mut v = self.pool[i % POOL_SIZE] ^ hash_const;
            hash_const = hash_const.wrapping_mul(MULT_B);
            v = v.wrapping_mul(hash_const);
            *slot = v ^ (v >> XSHIFT);
        }
    }

    /// `generate_state(N, dtype=np.uint64)`: twice as many 32-bit words,
    /// paired little-endian (low word first).
    pub fn generate_state_u64<const N: usize>(&self) -> [u64; N] {
        let mut words = vec![0u32; 2 * N];
        self.generate_state_u32(&mut words);
        let mut out = [0u64; N];
        for (i, slot) in out.iter_mut().enumerate() {
            *slot = u64::from(words[2 * i]) | (u64::from(words[2 * i + 1]) << 32);
        }
        out
    }
}

/// numpy's default 128-bit PCG multiplier (`PCG_DEFAULT_MULTIPLIER_128`).
const PCG_MULT: u128 = (2_549_297_995_355_413_924u128 << 64) | 4_865_540_595_714_422_341u128;

/// numpy's `PCG64` bit generator (PCG XSL-RR 128/64).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pcg64 {
    state: u128,
    inc: u128,
}

impl Pcg64 {
    /// `PCG64(SeedSequence(seed))`.
    pub fn from_seed(seed: u64) -> Pcg64 {
        Pcg64::from_seed_sequence(&SeedSequence::new(seed))
    }

    /// `PCG64(seed_sequence)`: `generate_state(4, uint64)` gives the initial
    /// state (words 0, 1 = high, low) and the stream (words 2, 3).
    pub fn from_seed_sequence(seq: &SeedSequence) -> Pcg64 {
        let w: [u64; 4] = seq.generate_state_u64();
        let init_state = (u128::from(w[0]) << 64) | u128::from(w[1]);
        let init_seq = (u128::from(w[2]) << 64) | u128::from(w[3]);
        let mut rng = Pcg64 {
            state: 0,
            inc: (init_seq << 1) | 1,
        };
        rng.step();
        rng.state = rng.state.wrapping_add(init_state);
        rng.step();
        rng
    }

    #[inline]
    fn step(&mut self) {
        self.state = self.state.wrapping_mul(PCG_MULT).wrapping_add(self.inc);
    }

    /// The next 64-bit output: advance, then XSL-RR of the new state.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.step();
        let s = self.state;
        let xored = ((s >> 64) as u64) ^ (s as u64);
        xored.rotate_right((s >> 122) as u32)
    }

    /// numpy's `next_double`: 53 random bits scaled into `[0, 1)`.
    #[inline]
    pub fn next_double(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / 9_007_199_254_740_992.0)
    }

    /// `Generator.uniform(low, high, out.len())`.
    pub fn uniform(&mut self, low: f64, high: f64, out: &mut [f64]) {
        let range = high - low;
        for slot in out {
            *slot = low + range * self.next_double();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_of_seed_zero_matches_numpy() {
        // np.random.SeedSequence(0).pool
        assert_eq!(
            SeedSequence::new(0).pool(),
            [4_265_667_335, 1_328_953_910, 1_320_288_413, 3_365_567_143]
        );
    }

    #[test]
    fn raw_outputs_match_numpy() {
        // np.random.PCG64(np.random.SeedSequence(s)).random_raw(2)
        for (seed, want) in [
            (
                0u64,
                [11_749_869_230_777_074_271u64, 4_976_686_463_289_251_617],
            ),
            (42, [14_276_969_152_011_380_360, 8_095_878_257_575_067_585]),
            (
                4_294_967_301,
                [14_281_546_376_153_053_393, 8_683_300_866_460_616_067],
            ),
            (
                u64::MAX,
                [12_544_278_110_101_001_871, 15_593_249_672_699_323_225],
            ),
        ] {
            let mut rng = Pcg64::from_seed(seed);
            assert_eq!([rng.next_u64(), rng.next_u64()], want, "seed {seed}");
        }
    }

    #[test]
    fn uniform_matches_numpy_bits() {
        // Generator(PCG64(SeedSequence(1))).uniform(-0.05, 0.05, 4)
        let mut out = [0.0; 4];
        Pcg64::from_seed(1).uniform(-0.05, 0.05, &mut out);
        let want = [
            0.001_182_162_470_025_671_7,
            0.045_046_369_632_593_536,
            -0.035_584_038_728_036_63,
            0.044_864_944_713_724_39,
        ];
        for (got, want) in out.iter().zip(want) {
            assert_eq!(got.to_bits(), f64::to_bits(want));
        }
    }
}
