#!/bin/bash
# one search fused with one KL baseline (same seed) vs that KL baseline at the same budget
set -u
M=/root/.cache/dmx/smollm2-135m-instruct-f32
W=/work/bg/dmx/data/wikitext-2-raw/wiki.test.raw
T=/work/bg/benchmarks/data/tinystories/eval.txt
cd /work/bg
B=$1; S=$2
python -m dmx combine /work/dmx_traj/dmx-default-$B-s$S --kl /work/traj_kl/kl-s$S --threads 1 -o /work/fuse1/fused-$B-s$S > /work/fuse1/fused-$B-s$S.log 2>&1
python -m dmx baseline --model $M --method kl --target-bits $B --weighting simple --export-target any --no-tie-fused \
  --calib dmx/data/wikitext-2-raw/wiki.valid.raw --seqlen 128 --samples 4 --seed $S \
  --sensitivities-from /work/traj_kl/kl-s$S --threads 1 --no-progress -o /work/fuse1/kl-$B-s$S > /work/fuse1/kl-$B-s$S.log 2>&1
for O in fused kl; do for D in $W $T; do
  python -m dmx eval /work/fuse1/$O-$B-s$S --data $D --seqlen 256 --device cpu --no-progress --max-windows 40 --threads 1 --save >> /work/fuse1/$O-$B-s$S.log 2>&1
done; done
echo "done $B $S $(date -u +%H:%M)"
