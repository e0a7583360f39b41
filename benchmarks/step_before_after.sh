#!/usr/bin/env bash
# The pretraining step of two versions of blip_fast, timed in one run on one machine: does a change that should not
# touch speed leave the step as fast as it was? Each version is timed by its own benchmarks/bench_step.py (what
# "bench step" meant at that commit), in turns (before, after, before, after, ...), so that the spread between runs
# of one version shows the noise the difference must exceed.
#
#   bash benchmarks/step_before_after.sh prepare [REV]        here, with git (default REV: 722fd3b, the last commit
#                                                            before the model/engine restructure): REV's files into
#                                                            .before/ (ignored by git), to carry to the GPU machine
#   bash benchmarks/step_before_after.sh run [BENCH_ARGS...]  there (gpu_session.sh stage before_after): installs
#                                                            .before/ and the working tree apart, times both
#
# `run` installs each version with pip --target into its own folder (no dependencies, the extension compiled against
# the installed torch: docs/gpu-machine.md), so neither replaces the other and both are built the same way. BENCH_ARGS
# go to both bench_step.py runs (default: the fast impl at the BLIP shapes); PAIRS (default 2) sets the turns. Results
# files: $OUT/step-DEV-DAY-before-N.json and -after-N.json, and the comparison printed at the end.
set -euo pipefail
BEFORE_DIR=.before
SOURCES=(blip_fast kernels csrc benchmarks setup.py pyproject.toml CMakeLists.txt)  # what the build and the bench read
case ${1:-} in
    prepare)
        rev=${2:-722fd3b}
        rm -rf "$BEFORE_DIR" && mkdir -p "$BEFORE_DIR"
        # the sources only: the results files are not needed there and count towards what one call may carry
        git archive "$rev" -- "${SOURCES[@]}" | tar -x -C "$BEFORE_DIR" --exclude=benchmarks/results
        git rev-parse "$rev" > "$BEFORE_DIR/REVISION"
        echo "$BEFORE_DIR/ holds $(cat "$BEFORE_DIR/REVISION"); carry it (run's carry: [\"$BEFORE_DIR\"])" ;;
    run)
        shift
        [ -f "$BEFORE_DIR/REVISION" ] || { echo "no $BEFORE_DIR/: run 'bash $0 prepare' where git is, and carry it"
                                           exit 2; }
        OUT=${OUT:-benchmarks/results}
        PAIRS=${PAIRS:-2}
        mkdir -p "$OUT"
        DAY=$(date +%Y%m%d)
        DEV=$(python -c "import torch
n = torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'
print('h200' if 'H200' in n else 'h100' if 'H100' in n else 'cpu' if n == 'cpu' else 'gpu')")
        [ $# -eq 0 ] && set -- --impl fast
        SITES=$(mktemp -d)
        trap 'rm -rf "$SITES"' EXIT
        for version in before after; do
            source_dir=.; [ $version = before ] && source_dir=$BEFORE_DIR
            # a copy of the sources, so that the build leaves no build/ or egg-info in the tree they came from
            mkdir "$SITES/src-$version"
            (cd "$source_dir" && tar -c --exclude=benchmarks/results --exclude=__pycache__ --exclude='*.so' \
                "${SOURCES[@]}") | tar -x -C "$SITES/src-$version"
            env BLIP_FAST_CUDA_ARCHS="${BLIP_FAST_CUDA_ARCHS:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" python -m pip install -q \
                --no-deps --no-build-isolation --no-compile --target "$SITES/$version" "$SITES/src-$version"
        done
        for pair in $(seq 1 "$PAIRS"); do
            for version in before after; do
                echo "-- $version, turn $pair"
                # the script of its own version, its install first on the import path; checked, since an editable
                # install of the working tree must not answer for "before" (-P: no current folder, as for a script)
                site=$SITES/$version
                PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" python -P -c "import sys, blip_fast, blip_fast.kernels
assert all(m.__file__.startswith(sys.argv[1]) for m in (blip_fast, blip_fast.kernels)), 'not the installed version'" "$site"
                PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" python "$SITES/src-$version/benchmarks/bench_step.py" \
                    "$@" --json "$OUT/step-$DEV-$DAY-$version-$pair.json"
            done
        done
        python - "$OUT" "$DEV-$DAY" "$(cat "$BEFORE_DIR/REVISION")" <<'EOF'
import glob, json, statistics, sys
out, stem, before_revision = sys.argv[1:]
speeds = {}  # (version, impl) -> samples/s of each turn
for version in ("before", "after"):
    for path in sorted(glob.glob(f"{out}/step-{stem}-{version}-*.json")):
        for record in json.load(open(path))["records"]:
            if record["metric"] == "samples_per_s":
                speeds.setdefault((version, record["impl"]), []).append(record["value"])
print(f"samples/s, before = {before_revision[:7]}, after = this tree; each turn's median step")
for impl in sorted({impl for _, impl in speeds}):
    before, after = speeds.get(("before", impl), []), speeds.get(("after", impl), [])
    if not before or not after:
        print(f"{impl}: missing in {'before' if not before else 'after'}")
        continue
    spread = max(max(runs) / min(runs) - 1 for runs in (before, after))
    change = statistics.median(after) / statistics.median(before) - 1
    print(f"{impl}: before {', '.join(f'{v:.1f}' for v in before)}; after {', '.join(f'{v:.1f}' for v in after)}; "
          f"after/before {change:+.1%}, spread within a version {spread:.1%}")
EOF
        ;;
    *) echo "usage: bash $0 prepare [REV] | run [BENCH_ARGS...]"; exit 2 ;;
esac
