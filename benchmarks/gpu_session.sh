#!/usr/bin/env bash
# Everything that waits for a GPU, in one run on the lent machine (shared/GPU.md: torch 2.11 + CUDA 13 there).
#
#   bash benchmarks/gpu_session.sh [STAGE ...]     stages: build tests parity step hard_negatives data report
#                                                  (default: all but data, which needs DALI's wheel carried in)
# Results files go to $OUT (the device tool brings them back) and are named as shared/BENCHMARKS.md asks;
# copy the ones to keep into benchmarks/results/ and commit them. Logs: $OUT/<stage>.log.
set -euo pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
DAY=$(date +%Y%m%d)
DEV=$(python -c "import torch; n = torch.cuda.get_device_name(); print('h200' if 'H200' in n else 'h100' if 'H100' in n else 'gpu')")
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(build tests parity step hard_negatives report)

run() {  # run STAGE COMMAND...: log to $OUT/STAGE.log, keep going after a failure, report it at the end
    local stage=$1; shift
    echo "== $stage: $*"
    if "$@" > "$OUT/$stage.log" 2>&1; then echo "   ok"; else echo "   FAILED (see $OUT/$stage.log)"; FAILED+=("$stage"); fi
    tail -n 15 "$OUT/$stage.log"
}
FAILED=()
for stage in "${STAGES[@]}"; do
    case $stage in
        build) run build pip install -q --no-build-isolation -e ".[test,triton]" ;;
        tests) run tests env BLIP_FAST_REQUIRE_NATIVE=1 python -m pytest tests -q -ra -m gpu ;;
        parity) run parity blip-fast parity --device cuda --json "$OUT/parity-$DEV-$DAY.json" ;;
        # the original BLIP joins when blip-ci is installed (carry its wheel: pip install --no-deps blip-ci==0.0.5)
        step) ORIGINAL=$(python -c "import blip.models.blip_pretrain" 2>/dev/null && echo "--impl original" || true)
              run step blip-fast bench step $ORIGINAL --impl reference --impl fast --json "$OUT/step-$DEV-$DAY.json" ;;
        hard_negatives) run hard_negatives blip-fast bench hard_negatives --json "$OUT/kernels-$DEV-$DAY.json" ;;
        data) run data blip-fast bench data --workers 1,16 --json "$OUT/data-$DEV-$DAY.json" ;;
        report) run report blip-fast bench report --results "$OUT" ;;
        *) echo "unknown stage $stage"; exit 2 ;;
    esac
done
[ ${#FAILED[@]} -eq 0 ] || { echo "failed stages: ${FAILED[*]}"; exit 1; }
