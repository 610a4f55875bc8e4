#!/usr/bin/env bash
# The GPU session: one prepared command that measures what matters most first, in at most 5.5
# minutes, and leaves everything in at most 8 files under $OUT. The one call a session with a GPU
# makes (the device tool's `run`), from the repository root:
#
#   run(command="bash scripts/gpu_session.sh", timeout_s=360, carry=[".whl"])
#
# carry=[".whl"] only when .whl/ holds the Liger-Kernel wheel (without it Liger's column is
# "n/a"). To put it there, once, on the machine with the package index (0.9 MB, pure Python;
# .whl/ stays out of git):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl liger-kernel==0.8.5
#
# Rehearsal on a CPU, the same stages and files on tiny shapes (tests/test_gpu_session.py runs it):
#   GPU_SESSION_DRY=1 OUT=/tmp/o bash scripts/gpu_session.sh
# PYTHON (default python3) runs every Python step; GPU_SESSION_WORK keeps the work folder (caches,
# builds, logs; default a fresh temporary one); GPU_SESSION_BUDGETS="B1 B2 B2_MAX B3 B4" overrides
# the budgets (seconds).
#
# Stages, in order, each under its own time budget (timeout -s INT: a stage stopped by its budget
# keeps what it measured, the CSVs being written case by case):
#   1 env and install, 55 s: nvidia-smi and versions; the C++ extension (CPU kernels: no CUDA code)
#     built with every core, in the background; the Triton and Inductor caches filled for every case
#     of stages 2 and 3, one process per core (python -m benchmarks.warmup).
#   2 headline benchmark, 140 s plus what stage 1 left (at most 150 s):
#     python -m benchmarks.bench --plan session (benchmarks/cases.py, session_plan, says what and why)
#   3 upsampled losses, 55 s: python -m benchmarks.upsample --plan session
#   4 tests on CUDA, 55 s: the tests marked cuda, tests/test_internals_triton.py and the C++ ops' argument
#     errors on this host (tests/test_upsample.py::test_lse_from_the_forward crashed an H100 machine's
#     host once; benchmarks/gpu_tests.py); the build gets 20 s of it to end.
# Then summary.md (python -m benchmarks.summary) and logs.tar.gz. At most 315 s in all.
# $OUT: env.txt warmup.csv bench.csv upsample.csv tests.txt summary.md session.log logs.tar.gz
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the folder for the results}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
DRY=${GPU_SESSION_DRY:-0}
export PYTHONUNBUFFERED=1
start=$SECONDS
B1=55 B2=140 B2_MAX=150 B3=55 B4=55
if [ "$DRY" = 1 ]; then
  # Generous budgets: the rehearsal must finish every stage also on a loaded CI machine.
  B1=300 B2=300 B2_MAX=300 B3=300 B4=60
fi
if [ -n "${GPU_SESSION_BUDGETS:-}" ]; then  # "B1 B2 B2_MAX B3 B4" seconds (tests/test_gpu_session.py)
  read -r B1 B2 B2_MAX B3 B4 <<< "$GPU_SESSION_BUDGETS"
fi
if [ -n "${GPU_SESSION_WORK:-}" ]; then
  WORK=$GPU_SESSION_WORK
  mkdir -p "$WORK"
else
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_session.XXXXXX")
fi
LOGS=$WORK/logs
mkdir -p "$LOGS"
export TRITON_CACHE_DIR=$WORK/cache/triton TORCHINDUCTOR_CACHE_DIR=$WORK/cache/inductor
: > "$OUT/session.log"
exec 3>&1
log() { echo "$*" >&3; echo "$*" >> "$OUT/session.log"; }
stage_t=0 stage_name= stage_budget=0
stage_begin() { stage_name=$1 stage_budget=$2 stage_t=$SECONDS; log "== stage $1 (budget $2 s) at $((SECONDS - start)) s"; }
stage_end() { log "STAGE $stage_name budget=$stage_budget elapsed=$((SECONDS - stage_t)) rc=$1"; }
left() { local l=$((stage_budget - (SECONDS - stage_t))); echo $((l > 1 ? l : 1)); }
run_left() {  # a command under what is left of the stage's budget
  echo "  \$ $*" >> "$OUT/session.log"
  timeout -s INT -k 5 "$(left)" "$@"
}

finish() {
  trap - EXIT
  $PY -m benchmarks.summary --bench "$OUT/bench.csv" --upsample "$OUT/upsample.csv" --session "$OUT/session.log" \
    --tests "$OUT/tests.txt" --out "$OUT/summary.md" $([ "$DRY" = 1 ] && echo --dry) > /dev/null 2> "$LOGS/summary.err" \
    || { log "summary.md failed: $(tail -1 "$LOGS/summary.err")"; cp "$LOGS/summary.err" "$OUT/summary.md"; }
  for f in env.txt warmup.csv bench.csv upsample.csv tests.txt; do [ -e "$OUT/$f" ] || : > "$OUT/$f"; done
  # Whatever else landed in $OUT goes into the archive: at most 8 files come back from a device call.
  for f in "$OUT"/*; do
    case "${f##*/}" in env.txt|warmup.csv|bench.csv|upsample.csv|tests.txt|summary.md|session.log|logs.tar.gz) ;;
      *) mv "$f" "$LOGS/" ;; esac
  done
  log "total $((SECONDS - start)) s"
  tar -czf "$OUT/logs.tar.gz" -C "$WORK" logs
  ls -l "$OUT" >&3
  cat "$OUT/summary.md" >&3 2>/dev/null
  [ -n "${GPU_SESSION_WORK:-}" ] || [ "$DRY" != 1 ] || rm -rf "$WORK"
}
trap finish EXIT

# --------------------------------------------------------------------------- 1 env and install
stage_begin env-install $B1
if [ "$DRY" = 1 ]; then
  DEVICE=cpu PLAN=session-dry WORKERS=2
  export TRITON_INTERPRET=1  # the Triton kernels on CPU tensors
  BENCH_ARGS=(--backend triton --compile-backend aot_eager --warmup 0 --reps 1 --budget 0 --busy-reps 1)
  WARM_ARGS=(--backend triton --compile-backend aot_eager --sample)  # a job of each kind: nothing to cache here
  {
    date -u
    echo "DRY RUN on a CPU: tiny shapes, Triton interpreted, torch.compile with aot_eager; no install, no pytest"
    echo "command: GPU_SESSION_DRY=1 bash scripts/gpu_session.sh"
  } > "$OUT/env.txt"
else
  DEVICE=cuda PLAN=session WORKERS=$(nproc)
  WARM_ARGS=()
  BENCH_ARGS=(--warmup-ms 10 --rep-ms 40 --busy-reps 10)
  {
    date -u
    echo "command: bash scripts/gpu_session.sh"
    nvidia-smi
    nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total,clocks.max.sm,clocks.max.memory,power.limit \
      --format=csv
    echo "cores: $(nproc)"
    free -g | head -2
  } > "$OUT/env.txt" 2>&1
  if compgen -G ".whl/*.whl" > /dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" .whl/*.whl \
      >> "$OUT/env.txt" 2>&1 && export PYTHONPATH=$WORK/site${PYTHONPATH:+:$PYTHONPATH}
    echo "wheels: $(ls .whl)" >> "$OUT/env.txt"
  fi
  # The build runs beside the warm-up and the benchmark (stage 4 waits for it).
  ( MAX_JOBS=$(nproc) $PY setup.py build_ext --inplace > "$LOGS/build.log" 2>&1
    echo "exit $?" >> "$LOGS/build.log" ) &
  build=$!
  echo "build: MAX_JOBS=$(nproc) python setup.py build_ext --inplace" >> "$OUT/env.txt"
fi
log "env written at $((SECONDS - start)) s"
run_left nice -n 10 $PY -m benchmarks.warmup --plan "$PLAN" --upsample-plan "$PLAN" --device "$DEVICE" \
  --workers "$WORKERS" --csv "$OUT/warmup.csv" ${WARM_ARGS[@]+"${WARM_ARGS[@]}"} > "$LOGS/warmup.log" 2>&1
rc=$?
head -1 "$LOGS/warmup.log" >> "$OUT/env.txt"
tail -1 "$LOGS/warmup.log" >&3
stage_end $rc
if [ "$DRY" != 1 ]; then
  if kill -0 "$build" 2>/dev/null; then log "build still running"; else log "build: $(tail -1 "$LOGS/build.log")"; fi
fi

# --------------------------------------------------------------------------- 2 headline benchmark
b2=$((B2 + B1 - (SECONDS - stage_t)))
stage_begin headline $((b2 < B2 ? B2 : (b2 > B2_MAX ? B2_MAX : b2)))
run_left $PY -m benchmarks.bench --plan "$PLAN" --device "$DEVICE" "${BENCH_ARGS[@]}" --no-plots \
  --out "$LOGS/bench" --csv "$OUT/bench.csv" > "$LOGS/bench.md" 2> "$LOGS/bench.err"
rc=$?
tail -2 "$LOGS/bench.err" >&3
stage_end $rc

# --------------------------------------------------------------------------- 3 upsampled losses
stage_begin upsample $B3
if [ "$DRY" = 1 ]; then
  UP_ARGS=(--backend triton --compile-backend aot_eager --warmup 0 --reps 1 --budget 0)
else
  UP_ARGS=(--warmup-ms 10 --rep-ms 40)
fi
run_left $PY -m benchmarks.upsample --plan "$PLAN" --device "$DEVICE" --passes fwd+bwd "${UP_ARGS[@]}" \
  --out "$LOGS/upsample" --csv "$OUT/upsample.csv" > "$LOGS/upsample.md" 2> "$LOGS/upsample.err"
rc=$?
tail -1 "$LOGS/upsample.err" >&3
stage_end $rc

# --------------------------------------------------------------------------- 4 tests on CUDA
stage_begin tests $B4
SELECTION="-p benchmarks.gpu_tests tests"
PYTEST="python -m pytest -q -p no:cacheprovider"
echo "FUSED_IMBALANCE_REQUIRE_BACKENDS=cpp,triton $PYTEST -rfE -n 8 --dist worksteal $SELECTION" > "$OUT/tests.txt"
if [ "$DRY" = 1 ]; then
  # No pytest inside pytest: check from the sources that the selection names what exists.
  $PY -m benchmarks.gpu_tests > "$LOGS/tests_selection.log" 2>&1
  rc=$?
  echo "RESULT dry run, not run: $(tail -1 "$LOGS/tests_selection.log") (rc=$rc)" >> "$OUT/tests.txt"
else
  # the build gets at most 20 s of this stage
  while kill -0 "$build" 2>/dev/null && [ $((SECONDS - stage_t)) -lt 20 ]; do sleep 1; done
  kill -0 "$build" 2>/dev/null && log "build not finished after 20 s of stage 4"
  echo "RESULT build: $(tail -1 "$LOGS/build.log")" >> "$OUT/tests.txt"
  # Without a built extension the C++ backend would compile csrc/ on first use, in every pytest
  # process at once: after a failed build it is left out (no compiler) and only Triton is required.
  if [ "$(tail -1 "$LOGS/build.log" 2>/dev/null)" = "exit 0" ]; then need=cpp,triton cxx=${CXX:-c++}
  else need=triton cxx=no-compiler-after-a-failed-build; fi
  CXX=$cxx FUSED_IMBALANCE_REQUIRE_BACKENDS=$need \
    run_left $PY -m pytest -q -p no:cacheprovider -rfE -n 8 --dist worksteal --junitxml "$LOGS/junit.xml" $SELECTION \
    > "$LOGS/tests.log" 2>&1
  rc=$?
  echo "RESULT the selection: rc=$rc | $(tail -1 "$LOGS/tests.log")" >> "$OUT/tests.txt"
  grep -E "^(FAILED|ERROR)|Fatal Python error|Segmentation" "$LOGS/tests.log" | head -40 >> "$OUT/tests.txt"
fi
grep "^RESULT" "$OUT/tests.txt" >&3
stage_end $rc
