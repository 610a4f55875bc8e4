#!/usr/bin/env bash
# One run on a CUDA machine with torch and triton preinstalled and no package index: install the
# package there, print the versions and the GPU, then run one stage. Everything goes under $OUT.
#   OUT=/tmp/o bash scripts/gpu_session.sh tests      # the whole suite, real CUDA kernels
#   OUT=/tmp/o bash scripts/gpu_session.sh bench ARGS # python -m benchmarks.bench ARGS --out $OUT/bench
#   SKIP_INSTALL=1 ...                                # a later stage of the same command
# Small pure-Python wheels in .whl/ (e.g. Liger-Kernel for the benchmark) are installed first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to a folder for the results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
t0=$SECONDS  # the stages' times below count from here (set -u: also with SKIP_INSTALL=1)
if [ "${SKIP_INSTALL:-0}" != 1 ]; then
  {
    date -u; nvidia-smi; nvcc --version | tail -2
    $PY -c "import sys, torch, triton; p = torch.cuda.get_device_properties(0); print('python', sys.version.split()[0], '| torch', torch.__version__, '| triton', triton.__version__, '| cuda', torch.version.cuda, '|', p.name, p.multi_processor_count, 'SMs')"
  } 2>&1 | tee "$OUT/env.txt"
  # Build for the GPU in hand only (TORCH_CUDA_ARCH_LIST), with every core.
  TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=$(nproc) \
    $PY -m pip install -q --no-build-isolation --no-deps --no-index -e . > "$OUT/install.log" 2>&1 \
    || { tail -40 "$OUT/install.log"; exit 1; }
  $PY -c "from fused_imbalance.ops import cpp; print('C++ backend built:', cpp.available())" 2>&1 | tee -a "$OUT/env.txt"
  echo "install: $((SECONDS - t0)) s"
fi
stage=${1:-tests}; shift || true
case "$stage" in
  tests)
    export FUSED_IMBALANCE_REQUIRE_BACKENDS=cpp,triton
    timeout -s INT "${TESTS_LIMIT:-450}" $PY -m pytest tests -q -ra -p no:cacheprovider -n "${WORKERS:-12}" --timeout "${TEST_TIMEOUT:-300}" \
      --junitxml "$OUT/junit.xml" "$@" > "$OUT/tests.log" 2>&1
    rc=$?
    grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.log" | tail -60
    echo "tests rc=$rc after $((SECONDS - t0)) s";;
  bench)
    $PY -m benchmarks.bench --out "$OUT/bench" "$@" 2>&1 | tee "$OUT/bench.log" | grep -v "^\s*$" | tail -40
    echo "bench done after $((SECONDS - t0)) s";;
  *) "$@";;
esac
