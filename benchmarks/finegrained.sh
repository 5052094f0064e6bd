#!/usr/bin/env bash
# The finegrained grids and their offline comparisons (docs/otcclip.md §9, docs/findings.md):
#
#   benchmarks/finegrained.sh                                   # OUT=out/finegrained
#   RECIPE=finegrained-relabel benchmarks/finegrained.sh        # OUT=out/finegrained-relabel
#   OUT=/tmp/fg NICE="nice -n 15" benchmarks/finegrained.sh
#
# 1. `otcbench run RECIPE` (21 or 18 runs, resumable: run the script again after an interruption);
# 2. `otcbench detect`: the OT own-pair score against the global own-pair score (and SafeCLIP's, k-NN, DAO) as
#    detectors of the poisoned rows, with each undefended model (OUT/detectors.md);
# 3. benchmarks/match_scores.py: with every finished run's model (clean and defended), which caption the OT
#    score (alpha 0.5 and alpha 0, top_k 5), the global cosine and a random caption pick for each image of the
#    clean world: binding overlap, exact composition and shape overlap (OUT/match_scores.csv).
# Commit OUT without runs/, data/, detect/ and match_scores/ (results/README.md).
set -euo pipefail
OTC=${OTCBENCH:-otcbench}
PY=${PYTHON:-python}
NICE=${NICE:-}
RECIPE=${RECIPE:-finegrained}
OUT=${OUT:-out/$RECIPE}
HERE=$(cd "$(dirname "$0")" && pwd)

$NICE $OTC run "$RECIPE" --out "$OUT" --resume
$NICE $OTC detect "$OUT"

worlds=("$OUT"/data/world-*)
[ "${#worlds[@]}" -eq 1 ] && [ -d "${worlds[0]}" ] || { echo "expected one world under $OUT/data" >&2; exit 1; }
ckpts=()
for run in "$OUT"/runs/*; do
  [ -f "$run/metrics.json" ] && ckpts+=(--checkpoint "$run")
done
$NICE $PY "$HERE/match_scores.py" "${worlds[0]}" "$OUT/match_scores" "${ckpts[@]}" \
    --setting 0.5,5 --setting 0,5 --csv "$OUT/match_scores.csv"
