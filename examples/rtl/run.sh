#!/usr/bin/env bash
# Simulate the RTL MX quantizer on mxverify vectors and check its outputs bit for bit.
#
#   examples/rtl/run.sh [--variant correct|ties_away|rounded_amax] [--level 1|2] [--seed N]
#                       [--vectors SUITE] [--out DIR]
#
# 1. mxverify gen     golden quantize vectors (fp4_e2m1, profile ocp) -> DIR/vec
#                     (--vectors SUITE uses an existing `mxverify gen --op quantize
#                     --format fp4_e2m1` directory instead; --level/--seed then do nothing)
# 2. iverilog/vvp     tb/tb_mx_quantize.sv reads DIR/vec/vectors.hex with $readmemh and
#                     writes the DUT's outputs in the expected.hex layout -> DIR/dut.hex
# 3. mxverify check   recomputes every expectation with mxref, compares bits, writes
#                     DIR/report.json and DIR/report.xml (JUnit)
# Exit status: mxverify check's (0 all match, 1 mismatches), 2 bad usage or missing tools.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
variant=correct level=1 seed=1 out="" vec=""
die() { echo "run.sh: error: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
    case "$1" in --variant|--level|--seed|--out|--vectors) [ $# -ge 2 ] || die "$1 needs a value" ;; esac
    case "$1" in
        --variant) variant="${2:-}"; shift 2 ;;
        --level)   level="${2:-}"; shift 2 ;;
        --seed)    seed="${2:-}"; shift 2 ;;
        --out)     out="${2:-}"; shift 2 ;;
        --vectors) vec="${2:-}"; shift 2 ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) die "unknown argument '$1'; see --help" ;;
    esac
done
case "$variant" in
    correct)      defines=() ;;
    ties_away)    defines=(-DMX_BUG_TIES_AWAY) ;;      # rounds ties away from zero
    rounded_amax) defines=(-DMX_BUG_ROUNDED_AMAX) ;;   # scale from a bf16-rounded amax
    *) die "--variant $variant: choose correct, ties_away or rounded_amax" ;;
esac
case "$level" in 1|2) ;; *) die "--level $level: choose 1 or 2" ;; esac
command -v iverilog >/dev/null && command -v vvp >/dev/null \
    || die "iverilog not found; install Icarus Verilog (apt-get install -y iverilog)"
out="${out:-${here#"$PWD"/}/build/$variant-level$level}"   # relative when run from above
mkdir -p "$out"
mxverify=(${PYTHON:-python} -m verification)   # the mxverify CLI of this checkout

if [ -z "$vec" ]; then
    vec="$out/vec"
    "${mxverify[@]}" gen --format fp4_e2m1 --op quantize --level "$level" --seed "$seed" \
        --emit hex --out "$vec" --force
fi
# the testbench is built for one layout: quantize, fp4_e2m1, blocks of 32
"${PYTHON:-python}" - "$vec" <<'PY' || exit 2
import json, os, sys
d = sys.argv[1]
try:
    m = json.load(open(os.path.join(d, "manifest.json")))
except (OSError, ValueError):
    sys.exit(f"run.sh: error: {d}: no readable manifest.json; make it with 'mxverify gen'")
if (m.get("op"), m.get("format"), m.get("block_size")) != ("quantize", "fp4_e2m1", 32):
    sys.exit(f"run.sh: error: {d}: a {m.get('op')} {m.get('format')} suite (block size "
             f"{m.get('block_size')}); this DUT needs --op quantize --format fp4_e2m1, blocks of 32")
PY
[ -f "$vec/vectors.hex" ] || die "$vec: no vectors.hex; generate it with --emit hex"
n=$(wc -l < "$vec/vectors.hex")
iverilog -g2012 -Wall "${defines[@]}" -o "$out/sim.vvp" \
    "$here/rtl/mx_fp4_encode.sv" "$here/rtl/mx_quantize_fp4.sv" "$here/tb/tb_mx_quantize.sv"
vvp -n "$out/sim.vvp" +vectors="$vec/vectors.hex" +n="$n" +dut="$out/dut.hex"
exec "${mxverify[@]}" check --vectors "$vec" --dut "$out/dut.hex" \
    --report "$out/report.json" --report "$out/report.xml" --force
