#!/usr/bin/env bash
# after /work/kl16/kl-s{0,1} exist: KL16 at 4.5 and 6 bits from the same sensitivities,
# evaluations of the KL16 OUTs, then the one-search fusion with KL16 (bench_trajectory_mean --kl-each)
set -u
cd /work/bg
M=~/.cache/dmx/smollm2-135m-instruct-f32
for S in 0 1; do
  while [ ! -f /work/kl16/kl-s$S/dmx_manifest.json ]; do sleep 20; done
  ln -sfn /work/kl16/kl-s$S /work/kl16/kl-5-s$S
  for B in 4.5 6; do
    [ -f /work/kl16/kl-$B-s$S/dmx_manifest.json ] || python -m dmx baseline --model $M --method kl --target-bits $B --weighting simple --export-target any --no-tie-fused --calib dmx/data/wikitext-2-raw/wiki.valid.raw --seqlen 128 --samples 16 --seed $S --threads 1 --no-progress --sensitivities-from /work/kl16/kl-s$S -o /work/kl16/kl-$B-s$S
  done
done
echo "$(date -u +%H:%M) KL16 OUTs done"
evalone() { python -m dmx eval "$1" --data "$2" --seqlen 256 --device cpu --no-progress --max-windows 40 --save --threads 1; }
export -f evalone
for S in 0 1; do for B in 4.5 5 6; do
  echo "/work/kl16/kl-$B-s$S /work/bg/dmx/data/wikitext-2-raw/wiki.test.raw"
  echo "/work/kl16/kl-$B-s$S benchmarks/data/tinystories/eval.txt"
done; done | xargs -P 2 -L 1 bash -c 'evalone "$0" "$1"'
echo "$(date -u +%H:%M) KL16 evals done"
python benchmarks/bench_trajectory_mean.py --work /work/dmx_traj --targets 4.5 5 6 --seeds 0 1 --fractions 0.5 --kl-each '/work/kl16/kl-s{seed}' --against-kl '/work/kl16/kl-{bits}-s{seed}' --threads 1 --jobs 2 --results /work/kl16_results
echo "$(date -u +%H:%M) fusion scored"
