#!/bin/bash
# KL at the bits of the combination's raw (unfilled) assignment, seeds 0-2
W=/work/dmx_unrot2; M=/root/.cache/dmx/smollm2-135m-instruct-f32
cd /work/main
while pgrep -f "nofill-default-4.5" >/dev/null; do sleep 10; done
for pair in "5 4.8953" "6 5.8286" "4.5 4.4381"; do set -- $pair
  for s in 0 1 2; do
    o=$W/klraw-default-$1-s$s
    dmx baseline --model $M --method kl --target-bits $2 --weighting simple --export-target any --no-tie-fused --calib /work/main/dmx/data/wikitext-2-raw/wiki.valid.raw --seqlen 128 --samples 4 --seed $s --device cpu --no-progress --force --threads 1 --sensitivities-from $W/kl-default-$1-s$s -o $o
    dmx eval $o --max-windows 40 --threads 1 --save --no-progress
    dmx eval $o --data benchmarks/data/tinystories/eval.txt --max-windows 40 --threads 1 --save --no-progress
  done
done
