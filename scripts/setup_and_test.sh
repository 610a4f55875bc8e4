#!/usr/bin/env bash
# Set up from nothing (a machine with only Python) and run the whole test suite.
#   bash scripts/setup_and_test.sh            # CPU machine: CPU torch, Triton under TRITON_INTERPRET=1
#   TORCH_SPEC=torch bash scripts/...         # take whatever torch build pip resolves (e.g. CUDA)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
. "$VENV/bin/activate"
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
python -m pip install --quiet triton setuptools wheel ninja pybind11 pytest pytest-benchmark hypothesis numpy
# For tests/test_examples.py, which runs the examples on a tiny budget (the `examples` extra).
python -m pip install --quiet scikit-learn tqdm matplotlib
# Builds the C++ extension (csrc/) against the torch installed above.
python -m pip install --quiet --no-build-isolation -e .
python -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, '| cuda', torch.cuda.is_available())"
python -c "from fused_imbalance.ops import cpp; print('C++ backend built:', cpp.available())"
if ! python -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export TRITON_INTERPRET=1
fi
export FUSED_IMBALANCE_REQUIRE_BACKENDS=${FUSED_IMBALANCE_REQUIRE_BACKENDS:-cpp,triton}
python -m pytest tests -q -ra "$@"
