#!/bin/bash
# out-of-sample budget check of the fusion: 5.5 bits, seeds 0-2 (2026-12-07)
set -e
cd /work/bg2
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 NUMBA_NUM_THREADS=1
M=/root/.cache/dmx/smollm2-135m-instruct-f32
C=/work/main/dmx/data/wikitext-2-raw/wiki.valid.raw
W=/work/dmx_fuse55
T1=/work/main/dmx/data/wikitext-2-raw/wiki.test.raw
T2=/work/main/benchmarks/data/tinystories/eval.txt
echo "[$(date +%T)] searches"
python -m dmx search --model $M --target-bits 5.5 --calib $C --seqlen 128 --samples 96 --steps 24 --batch-size 4 --no-fill-budget --checkpoint-every 0 --no-progress --seeds 0 1 2 --jobs 2 --threads 1 -o $W/comb55
for s in 0 1 2; do
  echo "[$(date +%T)] kl $s"
  python -m dmx baseline --model $M --method kl --target-bits 5.5 --calib $C --samples 4 --seqlen 128 --seed $s --sensitivities-from /work/dmx_unrot2/kl-default-5-s$s --threads 1 -o $W/kl55-s$s
done
S="$W/comb55.seeds/seed-0 $W/comb55.seeds/seed-1 $W/comb55.seeds/seed-2"
python -m dmx combine $S --fill-budget -o $W/comb55-fill --threads 1
python -m dmx combine $S --kl $W/kl55-s0 $W/kl55-s1 $W/kl55-s2 -o $W/fused55 --threads 1
for T in $T1 $T2; do
  echo "[$(date +%T)] evals on $T"
  for o in kl55-s0 kl55-s1; do python -m dmx eval $W/$o --data $T --seqlen 256 --max-windows 40 --save --no-progress --threads 1 & done; wait
  for o in kl55-s2 comb55-fill; do python -m dmx eval $W/$o --data $T --seqlen 256 --max-windows 40 --save --no-progress --threads 1 & done; wait
  python -m dmx eval $W/fused55 --data $T --seqlen 256 --max-windows 40 --save --no-progress --threads 1
done
echo "[$(date +%T)] done"
