# The script the variant-*.log headers call /work/exp/run.sh (kept here as run; paths of the
# machine it ran on: M = benchmarks/build_smollm2.py's output, W = dmx/data/wikitext-2-raw).
#!/bin/bash
# usage: run.sh NAME TARGET SEED THREADS extra flags...
name=$1; t=$2; seed=$3; th=$4; shift 4
export OMP_NUM_THREADS=$th MKL_NUM_THREADS=$th NUMBA_NUM_THREADS=$th
cd ${REPO:-/work/main}
M=/root/.cache/dmx/smollm2-135m-instruct-f32; W=/work/main/dmx/data/wikitext-2-raw
( time python -m dmx search --model $M --target-bits $t --calib $W/wiki.valid.raw --seqlen 128 --steps 24 --batch-size 4 --seed $seed --device cpu --no-fill-budget --checkpoint-every 0 --no-progress --force -o /work/exp/$name "$@" ) > /work/exp/$name.log 2>&1
( time python -m dmx eval /work/exp/$name --data $W/wiki.test.raw --seqlen 256 --device cpu --no-progress --max-windows 40 --save ) >> /work/exp/$name.log 2>&1
python -c "import json;d=json.load(open('/work/exp/$name/eval.json'));print(d)" >> /work/exp/$name.log 2>&1
echo DONE >> /work/exp/$name.log
