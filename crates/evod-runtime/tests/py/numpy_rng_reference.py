"""numpy's SeedSequence / PCG64 / Generator.uniform outputs, for evod's test.

Usage: numpy_rng_reference.py SEED [SEED ...]
Prints JSON: a list of {"seed", "pool", "raw" (8 u64), "uniform_bits" (bits of
Generator(PCG64(SeedSequence(seed))).uniform(-0.05, 0.05, 4)),
"wide_bits" (bits of a fresh generator's uniform(-3.5, 1e6, 16))}.
"""

import json
import sys

import numpy as np


def gen(seed):
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed)))


out = []
for arg in sys.argv[1:]:
    s = int(arg)
    out.append({
        "seed": s,
        "pool": [int(v) for v in np.random.SeedSequence(s).pool],
        "raw": [int(v) for v in np.random.PCG64(np.random.SeedSequence(s)).random_raw(8)],
        "uniform_bits": gen(s).uniform(-0.05, 0.05, 4).view(np.uint64).tolist(),
        "wide_bits": gen(s).uniform(-3.5, 1e6, 16).view(np.uint64).tolist(),
    })
json.dump(out, sys.stdout)
