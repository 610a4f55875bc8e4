#!/usr/bin/env bash
# The C++ backend's tests under AddressSanitizer and UndefinedBehaviorSanitizer: out-of-bounds
# reads and writes, use after free, signed overflow, misaligned or null accesses in csrc/ are an
# error here, not an occasional crash on another machine.
#   bash scripts/sanitize.sh                         # after scripts/setup_and_test.sh: its .venv; installs nothing
#   bash scripts/sanitize.sh -k "cpp and upsample"   # arguments go to pytest (a -k replaces the selection)
#
# The extension is built with FUSED_IMBALANCE_SANITIZE=address,undefined (csrc/build_config.py) into
# build/sanitize/, never over the in-place fused_imbalance/_C. The tests run from a copy of the package
# and tests/ there (build/sanitize/tree) that holds the sanitized _C, with the sanitizer runtime
# preloaded into Python (libstdc++ too: the runtime's __cxa_throw interceptor needs it loaded first)
# and leak detection off (Python itself does not free everything at exit). A report aborts the process
# that makes it (-fno-sanitize-recover=all), which fails its test and the script; pytest captures
# sys.stdout/stderr only (--capture=sys), so that the report, written to file descriptor 2, reaches the
# log even from a worker that it ends.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
VENV=${VENV:-.venv}
. "$VENV/bin/activate"
out=build/sanitize
rm -rf "$out/tree"
mkdir -p "$out"

FUSED_IMBALANCE_SANITIZE=address,undefined MAX_JOBS=${MAX_JOBS:-2} \
  python setup.py -q build_ext --build-lib "$out/lib" --build-temp "$out/temp" > "$out/build.log" 2>&1 \
  || { tail -40 "$out/build.log"; exit 1; }
echo "sanitize: extension built after $((SECONDS - start)) s"

mkdir -p "$out/tree"
cp -r fused_imbalance tests csrc pyproject.toml "$out/tree/"
rm -f "$out"/tree/fused_imbalance/_C*.so
find "$out/tree" -name __pycache__ -prune -exec rm -rf {} +
cp "$out"/lib/fused_imbalance/_C*.so "$out/tree/fused_imbalance/"

cxx=${CXX:-c++}
export LD_PRELOAD="$($cxx -print-file-name=libasan.so) $($cxx -print-file-name=libstdc++.so)"
export ASAN_OPTIONS=detect_leaks=0
export UBSAN_OPTIONS=print_stacktrace=1
export FUSED_IMBALANCE_REQUIRE_BACKENDS=cpp
cd "$out/tree"
# The tests run must be the sanitized build's, never a JIT build of csrc/ beside it.
python -c "
import os, fused_imbalance._C as c
from fused_imbalance.ops import cpp
assert os.path.dirname(c.__file__) == os.path.abspath('fused_imbalance') and cpp.available(), c.__file__
"
# The C++ backend's tests (parametrised by backend: -k cpp), except: the > 2**31-pixel runs (slow: tens
# of GB under the sanitizer's shadow memory); torch.compile's, opcheck's and gradcheck's (they call the
# same kernels as the others, many times, or spend their time in torch and the compiler); and the build
# and import-order checks that start a Python of their own for what is not a kernel. The C++ kernels'
# determinism checks live in test_determinism.py under names without "cpp": named here.
skip="compile_ or opcheck or gradcheck or import_order or failed_build or no_compiler or unknown_cpu_isa"
det="test_determinism.py and (bit_identical_across_runs or instruction_sets)"
rc=0
python -m pytest tests -q -n "${TEST_WORKERS:-auto}" --capture=sys -m "not slow and not cuda" -p no:cacheprovider \
  --ignore tests/test_sm90_compile.py -k "(cpp or ($det)) and not ($skip)" "$@" || rc=$?
echo "sanitize: done after $((SECONDS - start)) s (rc $rc)"
exit "$rc"
