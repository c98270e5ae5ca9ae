#!/bin/bash
set -e
cd /work/bg2
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 NUMBA_NUM_THREADS=1
M=/root/.cache/dmx/smollm2-135m-instruct-f32
W=/work/dmx_fuse55
T1=/work/main/dmx/data/wikitext-2-raw/wiki.test.raw
T2=/work/main/benchmarks/data/tinystories/eval.txt
for s in 1 2; do
  echo "[$(date +%T)] kl $s"
  CAL=$(python -c "import json; print(json.load(open('/work/dmx_unrot2/kl-default-5-s$s/dmx_manifest.json'))['baseline']['calib'][0])")
  python -m dmx baseline --model $M --method kl --target-bits 5.5 --calib $CAL --samples 4 --seqlen 128 --seed $s --sensitivities-from /work/dmx_unrot2/kl-default-5-s$s --threads 1 -o $W/kl55-s$s
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
