#!/usr/bin/env bash
# Wheels of what the stages need beyond the GPU machine's torch 2.11, numpy, scipy, pandas and safetensors, for its
# Python (CPython 3.12, manylinux x86_64), downloaded here into DIR, a folder git ignores (it travels as `carry`):
#
#   echo /.wheels/ >> .git/info/exclude      # once
#   benchmarks/gpu_wheels.sh .wheels         # about 8 MB; PYTHON=... picks the interpreter whose pip downloads
#
# There, from the wheels alone (no registry is reachable), into a folder on PYTHONPATH:
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .wheels/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD
#
# The versions are this project's tested ones. The GPU machine already has PyYAML, tqdm, pillow, typing-extensions,
# torchvision 0.26 (made for its torch 2.11), huggingface-hub, requests and regex; diffusers is for
# benchmarks/gpu.py's side-by-side rows. See benchmarks/gpu_stages.py for the whole device command.
set -euo pipefail

dir=${1:?usage: benchmarks/gpu_wheels.sh DIR (a git-ignored folder, e.g. .wheels)}
top=$(git rev-parse --show-toplevel 2>/dev/null || true)
case "$(realpath -m "$dir")/" in
"$top"/*) # inside the repository: only into a folder git ignores
    if [ -n "$top" ] && ! git check-ignore -q "$dir/x.whl"; then
        echo "gpu_wheels.sh: error: git does not ignore $dir: add /$dir/ to .git/info/exclude first" >&2
        exit 1
    fi ;;
esac
python=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}

platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014; do
    platforms+=(--platform "${tag}_x86_64")
done

"$python" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$dir" \
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 pytorch-fid==0.3.0 \
    diffusers==0.42.1 importlib-metadata==9.1.0
