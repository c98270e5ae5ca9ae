#!/usr/bin/env bash
# The paper's protocol on SmolLM2-135M on one GPU, resumable across device calls.
#
#   benchmarks/smollm2_protocol.sh MODEL_DIR [TARGET_BITS=5] [SEARCH_SECONDS=420]
#
# 1. dmx search, default recipe: seqlen 2048, 400 steps x 8 windows (3200 samples; the
#    embedded wiki.valid.raw holds fewer 2048-token windows, so dmx uses them all and says
#    so), checkpoint every 25 steps, stopped by SIGTERM after SEARCH_SECONDS (it then saves
#    a checkpoint and exits 130). Run the script again (same machine, or a new one with
#    runs/smollm2/dmx-T.partial/checkpoint.pt carried back) and it resumes.
# 2. Once OUT is written: perplexity on the full wiki.test.raw at seqlen 2048 (GPTQ
#    protocol) of the dMX model, the unquantized model and uniform MXFP4 / MXFP8, and the
#    KL baseline at the same target (built, then evaluated), and the search fused with that
#    baseline (`dmx combine DMX --kl KL`, what `dmx search --fuse-kl` writes).
# Results: runs/smollm2/ and, for the device tool, copies of the small files in $OUT
# (protocol.log, the manifest, eval.json, search_log.jsonl; the checkpoint if interrupted).
# Exit 0 all done, 3 interrupted (resume by running it again), else the failing step's code.
# A CPU rehearsal of the same steps (small, nothing measured): PROTOCOL_DEVICE=cpu
# PROTOCOL_SEQLEN=64 PROTOCOL_STEPS=6 PROTOCOL_MAX_WINDOWS=8 benchmarks/smollm2_protocol.sh
# dmx/data/tiny-qwen3 5 20
set -uo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:?usage: benchmarks/smollm2_protocol.sh MODEL_DIR [TARGET_BITS] [SEARCH_SECONDS]}
TARGET=${2:-5}
SECONDS_FOR_SEARCH=${3:-420}
DEVICE=${PROTOCOL_DEVICE:-cuda}
SEQLEN=${PROTOCOL_SEQLEN:-2048}
STEPS=${PROTOCOL_STEPS:-400}
LIMIT=()  # evaluation windows: all of wiki.test.raw unless PROTOCOL_MAX_WINDOWS is set
[ -n "${PROTOCOL_MAX_WINDOWS:-}" ] && LIMIT=(--max-windows "$PROTOCOL_MAX_WINDOWS")
RUNS=${PROTOCOL_RUNS:-runs/smollm2}
DMX_OUT=$RUNS/dmx-$TARGET
KL_OUT=$RUNS/kl-$TARGET
BACK=${OUT:-$RUNS/back}
mkdir -p "$RUNS" "$BACK"
LOG=$BACK/protocol.log
export PYTHONUNBUFFERED=1
say() { echo "[smollm2_protocol $(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }
run() { say "$*"; "$@" 2>&1 | tee -a "$LOG"; return "${PIPESTATUS[0]}"; }

if [ ! -f "$DMX_OUT/dmx_manifest.json" ]; then
    resume=()
    [ -f "$DMX_OUT.partial/checkpoint.pt" ] && resume=(--resume)
    say "search (${resume[*]:-fresh}), stopped after ${SECONDS_FOR_SEARCH}s if not done"
    run timeout -s TERM -k 60 "$SECONDS_FOR_SEARCH" python3 -m dmx search --model "$MODEL" \
        --target-bits "$TARGET" --recipe default --seqlen "$SEQLEN" --steps "$STEPS" --batch-size 8 \
        --device "$DEVICE" --checkpoint-every 25 --no-progress "${resume[@]}" -o "$DMX_OUT"
    rc=$?
    if [ ! -f "$DMX_OUT/dmx_manifest.json" ]; then
        if [ -f "$DMX_OUT.partial/checkpoint.pt" ]; then
            cp "$DMX_OUT.partial/checkpoint.pt" "$BACK/"
            say "interrupted (exit $rc); checkpoint copied to \$OUT; run this script again to resume"
            exit 3
        fi
        say "search failed (exit $rc)"
        exit "$rc"
    fi
fi
cp "$DMX_OUT/dmx_manifest.json" "$DMX_OUT/search_log.jsonl" "$BACK/"
EVAL=(--seqlen "$SEQLEN" --device "$DEVICE" --no-progress "${LIMIT[@]}")
run python3 -m dmx eval "$DMX_OUT" "${EVAL[@]}" --save || exit $?
cp "$DMX_OUT/eval.json" "$BACK/"
run python3 -m dmx eval --model "$MODEL" "${EVAL[@]}" || exit $?
for fmt in fp4_e2m1 fp8_e4m3; do
    run python3 -m dmx eval --model "$MODEL" --uniform "$fmt" "${EVAL[@]}" || exit $?
done
if [ ! -f "$KL_OUT/dmx_manifest.json" ]; then
    run python3 -m dmx baseline --model "$MODEL" --method kl --target-bits "$TARGET" \
        --seqlen "$SEQLEN" --device "$DEVICE" --no-progress -o "$KL_OUT" || exit $?
fi
run python3 -m dmx eval "$KL_OUT" "${EVAL[@]}" --save || exit $?
cp "$KL_OUT/eval.json" "$BACK/kl_eval.json"
# the search fused with its KL baseline (the same calibration seed, 0): `dmx search
# --fuse-kl`'s last step, seconds here, so the protocol also scores what the README advises
FUSED_OUT=$RUNS/fused-$TARGET
if [ ! -f "$FUSED_OUT/dmx_manifest.json" ]; then
    run python3 -m dmx combine "$DMX_OUT" --kl "$KL_OUT" --device "$DEVICE" -o "$FUSED_OUT" \
        || exit $?
fi
run python3 -m dmx eval "$FUSED_OUT" "${EVAL[@]}" --save || exit $?
cp "$FUSED_OUT/eval.json" "$BACK/fused_eval.json"
say "done"
