#!/usr/bin/env bash
# Set up from nothing (a machine with only Python) and run the whole test suite.
#   bash scripts/setup_and_test.sh            # CPU machine: CPU torch, Triton under TRITON_INTERPRET=1
#   TORCH_SPEC=torch bash scripts/...         # take whatever torch build pip resolves (e.g. CUDA)
#   MIN_VERSIONS=1 bash scripts/...           # the oldest versions pyproject.toml declares, in .venv-min:
#                                             # torch 2.11 (the registry's CUDA build, which runs on CPU
#                                             # too), triton 3.6, numpy < 2.4, a setuptools older than 77
#   SETUP_ONLY=1 bash scripts/...             # set up, run no test (scripts/setup_and_bench.sh)
#   SM90_COMPILE=0 bash scripts/...           # leave out tests/test_sm90_compile.py (the compile-only sm_90
#                                             # checks of benchmarks/sm90_compile.py and sm90_dice.py: 5-8
#                                             # and 1-2 minutes of one core on an empty Triton cache)
#   TEST_WORKERS=1 bash scripts/...           # pytest workers (default: auto, one per core)
#   LINT=1 bash scripts/...                   # ruff (check and format --check, pyproject.toml) before the tests
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ "${MIN_VERSIONS:-0}" = 1 ]; then
  VENV=${VENV:-.venv-min}
  TORCH_SPEC=${TORCH_SPEC:-torch==2.11.*}
  TRITON_SPEC=${TRITON_SPEC:-triton==3.6.*}
  SETUPTOOLS_SPEC=${SETUPTOOLS_SPEC:-setuptools<77}  # the install must not need a recent setuptools
fi
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
. "$VENV/bin/activate"
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
python -m pip install --quiet "${TRITON_SPEC:-triton}" "${SETUPTOOLS_SPEC:-setuptools}" wheel ninja pybind11 pytest pytest-xdist pytest-benchmark hypothesis numpy
# triton < 3.8's interpreter (TRITON_INTERPRET=1) calls int() on one-element arrays, which numpy >= 2.4 rejects.
if python -c "import sys, triton; sys.exit(tuple(map(int, triton.__version__.split('.')[:2])) >= (3, 8))"; then
  python -m pip install --quiet "numpy<2.4"
fi
# For tests/test_examples.py, which runs the examples on a tiny budget (the `examples` extra).
python -m pip install --quiet scikit-learn tqdm matplotlib
# For tests/test_dice_reference.py and tests/test_dice.py, which compare the Dice losses with MONAI's. MONAI needs only torch
# and numpy, both installed above: --no-deps keeps pip from resolving another torch.
python -m pip install --quiet --no-deps monai==1.6.1
# Builds the C++ extension (csrc/) against the torch installed above.
python -m pip install --quiet --no-build-isolation -e .
python -c "import torch, triton, numpy, setuptools; print('torch', torch.__version__, '| triton', triton.__version__, '| numpy', numpy.__version__, '| setuptools', setuptools.__version__, '| cuda', torch.cuda.is_available())"
python -c "from fused_imbalance.ops import cpp; print('C++ backend built:', cpp.available())"
if [ "${SETUP_ONLY:-0}" = 1 ]; then
  exit 0
fi
if [ "${LINT:-0}" = 1 ]; then
  python -m pip install --quiet ruff==0.8.0
  ruff check .
  ruff format --check .
fi
if ! python -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export TRITON_INTERPRET=1
fi
export FUSED_IMBALANCE_REQUIRE_BACKENDS=${FUSED_IMBALANCE_REQUIRE_BACKENDS:-cpp,triton}
# One pytest worker per core (pytest-xdist): the interpreted Triton kernels keep a process on one core;
# worksteal: an idle worker takes the tests queued behind a long one (the sm_90 compile run).
workers=${TEST_WORKERS:-auto}
# tests/test_sm90_compile.py compiles 81 kernels for sm_90 with ptxas (benchmarks/sm90_compile.py, then
# the Dice family's with benchmarks/sm90_dice.py): 5-8 minutes of one core on an
# empty Triton cache. With one worker, fill the cache beside the suite, so that the test finds it warm
# (with more, one worker compiles while the others go on).
warm=
extra=()
if [ "${SM90_COMPILE:-1}" != 1 ]; then
  extra=(--ignore tests/test_sm90_compile.py)
elif [ "$workers" = 1 ] || [ "$workers" = 0 ]; then  # one process (0: pytest-xdist off)
  (env -u TRITON_INTERPRET python benchmarks/sm90_compile.py > /dev/null 2>&1 || true) &
  warm=$!
fi
rc=0
python -m pytest tests -q -ra -n "$workers" --dist worksteal ${extra[@]+"${extra[@]}"} "$@" || rc=$?
[ -z "$warm" ] || wait "$warm" || true
exit "$rc"
