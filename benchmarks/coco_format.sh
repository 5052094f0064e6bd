#!/usr/bin/env bash
# The coco-format comparison (docs/recipes.md, "coco-format"): make the data of recipes/coco-format.yaml and
# recipes/coco-format-native.yaml, then run both.
#
#   benchmarks/coco_format.sh                 # data under data/, results under results/coco-format{,-native}
#   OTCBENCH="python -m otcbench.cli" NICE="nice -n 15" OUT=/tmp/cf benchmarks/coco_format.sh
#
# Data: a synthetic world of 1,000 images (seed 0) exported as COCO files with five captions per image and
# imported back (data/coco-format), and its native twin (data/coco-format-native: the same PNGs and captions,
# no labels); CleanCLIP's clean sets the same way from a 200-image world of seed 1. Existing data is kept.
set -euo pipefail
OTC=${OTCBENCH:-otcbench}
NICE=${NICE:-}
D=${DATA:-data}
OUT=${OUT:-results}
EVAL=(--set probe_train_per_class=32 --set probe_val_per_class=16 --set test_per_class=64 --set targets_per_class=16)

make_pair() {  # make_pair NAME NATIVE N SEED: world, COCO files, COCO import NAME, native twin NATIVE
  local name=$1 native=$2 n=$3 seed=$4 world=$D/$1-world
  [ -e "$world" ] || $NICE $OTC data synth "$world" --set n_train="$n" --set seed="$seed" "${EVAL[@]}"
  [ -e "$D/$name-files" ] || $NICE $OTC data export "$world" "$D/$name-files" --format coco
  [ -e "$D/$name" ] || $NICE $OTC data import "$D/$name-files/annotations/captions_train2017.json" "$D/$name" \
      --format coco --eval-set "$world/eval"
  [ -e "$D/$native" ] || $NICE $OTC data export "$world" "$D/$native" --format pairs --set labels=false
}

make_pair coco-format coco-format-native 1000 0
make_pair coco-format-clean coco-format-native-clean 200 1

for recipe in coco-format coco-format-native; do
  $NICE $OTC run "recipes/$recipe.yaml" --out "$OUT/$recipe" --resume
done
