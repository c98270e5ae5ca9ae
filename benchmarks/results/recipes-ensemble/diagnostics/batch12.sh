#!/usr/bin/env bash
# One search with 3x the batch (12 windows per step, 24 steps: the tokens and compute of three
# seeds of batch 4) against three seeds of batch 4 combined (issue 11): is what combining
# gains the gradient noise of one path, which a larger batch also averages?
# Usage: batch12.sh TARGET SEED [TARGET SEED ...]   (one search + two evals per pair)
set -euo pipefail
M=/root/.cache/dmx/smollm2-135m-instruct-f32
W=/work/dmx_b12
D=dmx/data/wikitext-2-raw
while [ $# -ge 2 ]; do
  t=$1; s=$2; shift 2
  o=$W/dmx-default-$t-s$s-b12
  echo "[$(date -u +%H:%M:%S)] search $o"
  dmx search --model $M --recipe default --target-bits $t --calib $D/wiki.valid.raw --seqlen 128 \
    --steps 24 --batch-size 12 --seed $s --no-fill-budget --checkpoint-every 0 --no-progress \
    --threads 1 --force -o $o
  for data in $D/wiki.test.raw benchmarks/data/tinystories/eval.txt; do
    dmx eval $o --data $data --seqlen 256 --max-windows 40 --threads 1 --no-progress --save
  done
done
