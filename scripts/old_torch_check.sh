#!/usr/bin/env bash
# The CPU test suite under the GPU machines' torch and triton (torch 2.11, triton 3.6), in a
# venv of its own beside the project's pins (torch 2.13, triton 3.7.1):
#
#   bash scripts/old_torch_check.sh [VENV_DIR] [pytest arguments]
#
# PyPI's torch 2.11 for Linux is the CUDA build: about 2.6 GB of wheels, which import and
# run on a CPU. numpy < 2.4: Triton 3.6's interpreter calls int() on one-element arrays,
# which numpy 2.4 turned into an error (triton 3.7 does not). The compile sweep is left out:
# its record is keyed by triton's version, and `bench.py kernels-compile` under 3.6 is its
# own check. Everything else of the pinned constraints is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-/tmp/venv-torch211}
shift || true
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    grep -v -e '^torch==' -e '^triton==' -e '^numpy==' constraints.txt > "$venv/constraints.txt"
    "$venv/bin/pip" install -q torch==2.11.0 triton==3.6.0 'numpy<2.4'
    "$venv/bin/pip" install -q -c "$venv/constraints.txt" tiktoken safetensors pytest pytest-xdist \
        pytest-timeout transformers matplotlib
fi
"$venv/bin/python" -c "import torch, triton, numpy; print('torch', torch.__version__, '| triton', triton.__version__, '| numpy', numpy.__version__)"
OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} "$venv/bin/python" -m pytest -q -p no:cacheprovider \
    --deselect tests/test_triton.py::test_every_kernel_configuration_compiles_for_ampere_and_hopper "$@" tests
