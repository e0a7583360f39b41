#!/usr/bin/env bash
# DALI for an offline GPU machine that takes at most 64 MiB of files per call (docs/gpu-machine.md).
#
#   bash benchmarks/dali_carry.sh prepare    # here, once: download DALI 2.4 and its wheels for Python 3.12,
#                                            # pack them and split the pack into .dali/1 ... .dali/N (ignored)
#   bash benchmarks/dali_carry.sh collect    # there, in N back-to-back calls, call i with carry [".dali/i"]:
#                                            # keeps the carried part in /tmp/dw (lost once the machine goes back)
#   bash benchmarks/dali_carry.sh install    # there, in the last call after its collect: joins the parts and
#                                            # installs everything in ONE pip call into /tmp/site (a second
#                                            # --target call would replace the shared nvidia/ folder and lose DALI)
#
# gpu_session.sh puts /tmp/site on PYTHONPATH when it exists, so the data stage and the DALI tests find DALI.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=.dali
PART_SIZE=56M  # + the working tree (~1.4 MB) stays under the 64 MiB a call may carry

case ${1:-} in
    prepare)
        grep -qx '/.dali/' .git/info/exclude || echo '/.dali/' >> .git/info/exclude
        rm -rf "$DIR" && mkdir -p "$DIR/wheels"
        download() { python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux2014_x86_64 \
            --platform manylinux_2_17_x86_64 --platform any -d "$DIR/wheels" "$@"; }
        download nvidia-dali-cuda130==2.4.0 astunparse==1.6.3 gast==0.6.0 optree nvtx makefun libcst==1.8.5 \
            nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-libnvcomp-cu13==5.3.0.16 'nvidia-nvjpeg==13.*'
        tar -cf "$DIR/dali.tar" -C "$DIR/wheels" .
        split -b "$PART_SIZE" -d -a 1 "$DIR/dali.tar" "$DIR/part-"
        parts=("$DIR"/part-*)
        for i in "${!parts[@]}"; do mkdir -p "$DIR/$((i + 1))" && mv "${parts[$i]}" "$DIR/$((i + 1))/"; done
        rm -rf "$DIR/wheels" "$DIR/dali.tar"
        echo "${#parts[@]} parts in $DIR/1 ... $DIR/${#parts[@]}: carry one per call, calls back to back"
        ;;
    collect)
        mkdir -p /tmp/dw && cp "$DIR"/*/part-* /tmp/dw/ && ls -la /tmp/dw
        ;;
    install)
        mkdir -p /tmp/dw/wheels && cat /tmp/dw/part-* | tar -xf - -C /tmp/dw/wheels
        python -m pip install -q --no-index --no-deps --target /tmp/site /tmp/dw/wheels/*.whl
        PYTHONPATH=/tmp/site python -c "import nvidia.dali as d; print('DALI', d.__version__, 'in /tmp/site')"
        ;;
    *) echo "usage: bash benchmarks/dali_carry.sh prepare|collect|install"; exit 2 ;;
esac
