"""The GPU session's script (scripts/gpu_session.sh) works before it meets a GPU.

- The rehearsal (``GPU_SESSION_DRY=1``) runs every stage on this CPU, tiny shapes, the Triton
  kernels interpreted, and must write the session's files with their columns, every stage ending
  on its own (not cut by its budget). Not marked slow: CI's run on the oldest versions, those of
  the GPU machines (torch 2.11, triton 3.6), is the one that matters most.
- The GPU branch of the script runs with stand-ins for nvidia-smi, nvcc and Python (each call
  recorded), so its shell code, arguments, budgets and outputs are exercised too.
- The summary marks each goal as measured: hand-made results with known ratios.
"""

import csv
import json
import os
import re
import subprocess
import sys
import tarfile
import textwrap


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_session.sh")
FILES = {
    "env.txt",
    "warmup.csv",
    "bench.csv",
    "upsample.csv",
    "tests.txt",
    "summary.md",
    "session.log",
    "logs.tar.gz",
}
STAGES = ("env-install", "headline", "upsample", "tests")
sys.path.insert(0, ROOT)


def stage_lines(out):
    """{stage: (budget, elapsed, rc)} from session.log."""
    from benchmarks.summary import STAGE

    res = {}
    with open(os.path.join(out, "session.log")) as f:
        for line in f:
            m = STAGE.match(line)
            if m:
                res[m.group(1)] = tuple(int(v) for v in m.groups()[1:])
    return res


def read_csv(path):
    with open(path, newline="") as f:
        r = csv.DictReader(f)
        return r.fieldnames, list(r)


def test_dry_run(tmp_path):
    from benchmarks import report, upsample, warmup
    from benchmarks.cases import PLANS

    out = tmp_path / "out"
    # the work folder (caches, logs) in tmp_path: nothing shared with another test process
    env = dict(
        os.environ,
        GPU_SESSION_DRY="1",
        OUT=str(out),
        PYTHON=sys.executable,
        GPU_SESSION_WORK=str(tmp_path / "work"),
    )
    env.pop("GPU_SESSION_BUDGETS", None)
    run = subprocess.run(["bash", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert set(os.listdir(out)) == FILES
    stages = stage_lines(out)
    assert tuple(stages) == STAGES
    assert all(rc == 0 for _, _, rc in stages.values()), stages  # none cut by its budget, none failed

    fields, rows = read_csv(out / "bench.csv")
    assert tuple(fields) == report.FIELDS
    # every group of the GPU plan ran in its rehearsal, in the same order
    assert list(dict.fromkeys(r["group"] for r in rows)) == [g.name for g in PLANS["session"]]
    assert {r["status"] for r in rows} <= {"reference", "ok", "skipped: Liger-Kernel runs on CUDA only"}
    assert {r["provider"] for r in rows} == {"eager", "fused", "compile", "liger"}
    busy = [r for r in rows if r["busy_ms"]]
    assert {(r["group"], r["provider"]) for r in busy} == {
        ("city", "fused"),
        ("city", "compile"),
        ("city-bf16-cl", "fused"),
        ("ade", "fused"),
        ("rows", "fused"),
        ("compile", "compile"),
    }
    for r in busy:
        assert float(r["wall_ms"]) > 0 and float(r["busy_ms"]) > 0 and float(r["kernels"]) >= 1
        assert float(r["busy_pct_copy"]) > 0 and r["kernel_top"]
    assert all(
        float(r["ms"]) > 0 and r["peak_bytes"] != "" for r in rows if r["status"] in ("ok", "reference")
    )

    fields, ups = read_csv(out / "upsample.csv")
    assert tuple(fields) == upsample.FIELDS
    assert [(r["case"], r["provider"]) for r in ups] == [
        (c.name, p) for c in upsample.PLANS["session-dry"] for p in upsample.PROVIDERS
    ]
    assert {r["status"] for r in ups} == {"reference", "ok"} and all(float(r["ms"]) > 0 for r in ups)

    fields, warm = read_csv(out / "warmup.csv")
    assert tuple(fields) == warmup.FIELDS
    assert len(warm) == len(warmup.sample(warmup.jobs("session-dry", "session-dry"))) == 5
    assert all(r["status"] == "ok" or r["status"].startswith("skipped") for r in warm)

    assert "all found (rc=0)" in (out / "tests.txt").read_text()
    assert "torch" in (out / "env.txt").read_text().splitlines()[-1]  # the versions line of the warm-up
    summary = (out / "summary.md").read_text()
    assert summary.startswith("**DRY RUN on a CPU")
    assert "Stages: env-install" in summary and "### Upsampled losses" in summary
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"logs/bench/results.md", "logs/upsample/results.md", "logs/warmup.log", "logs/bench.err"} <= names


# --- the GPU branch, with stand-ins ---------------------------------------------------------------

STUB = '''
import json, os, runpy, sys, time
argv = sys.argv[1:]
with open(os.environ["STUB_LOG"], "a") as f:
    f.write(json.dumps(dict(argv=argv, cwd=os.getcwd(), env={k: os.environ.get(k) for k in (
        "MAX_JOBS", "FUSED_IMBALANCE_REQUIRE_BACKENDS", "CXX")})) + "\\n")
def opt(name):
    return argv[argv.index(name) + 1]
if argv[:2] in (["-m", "benchmarks.summary"], ["-m", "benchmarks.gpu_tests"]):
    sys.argv = argv[1:]
    sys.path.insert(0, os.getcwd())
    runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
elif argv[:1] == ["setup.py"]:
    sys.exit("stand-in build failure" if os.environ.get("STUB_BUILD_FAIL") else 0)
elif argv[:2] == ["-m", "pytest"]:
    print("3 passed in 0.01s")
elif argv[:2] == ["-m", "benchmarks.warmup"]:
    print("python 3.12 | torch 2.11.0 | stand-in")
    with open(opt("--csv"), "w") as f:
        f.write("job,stage,status\\n0,bench,ok\\n")
    print("warm-up: 1 jobs (0 failed) in 0.0 s")
elif argv[:2] == ["-m", "benchmarks.bench"]:
    with open(opt("--csv"), "w") as f:
        f.write("group,loss,shape,dtype,layout,provider,pass,status,ms,device,date\\n"
                "city,cross_entropy,8x19x512x1024,float32,contiguous,fused,fwd+bwd,ok,1.0,Stand-in GPU,2026-01-01\\n")
        f.flush()
        time.sleep(float(os.environ.get("STUB_SLEEP", "0")))  # a stage that outlasts its budget
elif argv[:2] == ["-m", "benchmarks.upsample"]:
    with open(opt("--csv"), "w") as f:
        f.write("case,shape,dtype,mode,loss,provider,pass,status,ms\\n"
                "ade,16x150x128x128→512x512,float32,bilinear,cross_entropy,fused,fwd+bwd,ok,1.0\\n")
        f.flush()
        time.sleep(float(os.environ.get("STUB_SLEEP", "0")))  # a stage that outlasts its budget
elif argv[:2] == ["-m", "pip"]:
    pass
else:
    sys.exit(f"stand-in python: unexpected {argv}")
'''


def run_with_stand_ins(tmp_path, **extra):
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "nvidia-smi").write_text(
        textwrap.dedent('''\
        #!/bin/sh
        case "$*" in *compute_cap*--format=csv,noheader*) echo 9.0;; *) echo "stand-in nvidia-smi $*";; esac
        ''')
    )
    (bin_ / "nvcc").write_text(
        "#!/bin/sh\necho 'Cuda compilation tools, release 13.0'\necho 'Build stand-in'\n"
    )
    for f in bin_.iterdir():
        f.chmod(0o755)
    stub = tmp_path / "stub.py"
    stub.write_text(STUB)
    out, log = tmp_path / "out", tmp_path / "calls.jsonl"
    env = dict(
        os.environ,
        OUT=str(out),
        PYTHON=f"{sys.executable} {stub}",
        STUB_LOG=str(log),
        PATH=f"{bin_}{os.pathsep}{os.environ['PATH']}",
        GPU_SESSION_WORK=str(tmp_path / "work"),
        **extra,
    )
    env.pop("GPU_SESSION_DRY", None)
    run = subprocess.run(["bash", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    return run, out, calls


def test_gpu_branch_with_stand_ins(tmp_path):
    run, out, calls = run_with_stand_ins(tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert set(os.listdir(out)) == FILES
    stages = stage_lines(out)
    assert tuple(stages) == STAGES and all(rc == 0 for _, _, rc in stages.values()), stages
    budgets = {k: b for k, (b, _, _) in stages.items()}
    assert budgets["env-install"] == 55 and 140 <= budgets["headline"] <= 150
    assert budgets["upsample"] == budgets["tests"] == 55
    assert sum(budgets.values()) <= 330 - 15  # 5.5 minutes with a margin for the summary and the archive

    def call(*prefix):
        found = [c for c in calls if c["argv"][: len(prefix)] == list(prefix)]
        assert found, f"no call {prefix}: {[c['argv'][:3] for c in calls]}"
        return found

    nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    (w,) = call("-m", "benchmarks.warmup")
    assert w["argv"][2:] == [
        "--plan",
        "session",
        "--upsample-plan",
        "session",
        "--device",
        "cuda",
        "--workers",
        nproc,
        "--csv",
        str(out / "warmup.csv"),
    ]
    (b,) = call("-m", "benchmarks.bench")
    assert b["argv"][2:6] == ["--plan", "session", "--device", "cuda"]
    assert {"--warmup-ms", "--rep-ms", "--busy-reps", "--no-plots"} <= set(b["argv"])
    assert b["argv"][b["argv"].index("--csv") + 1] == str(out / "bench.csv")
    (u,) = call("-m", "benchmarks.upsample")
    assert u["argv"][2:8] == ["--plan", "session", "--device", "cuda", "--passes", "fwd+bwd"]
    (build,) = call("setup.py", "build_ext", "--inplace")  # the C++ extension: CPU code only, one build
    assert build["cwd"] == ROOT and build["env"]["MAX_JOBS"]
    (tests,) = call("-m", "pytest")
    assert tests["cwd"] == ROOT and {"-p", "benchmarks.gpu_tests", "tests"} <= set(tests["argv"])
    assert tests["env"]["FUSED_IMBALANCE_REQUIRE_BACKENDS"] == "cpp,triton"
    assert tests["env"]["CXX"] != "no-compiler-after-a-failed-build"
    results = [line for line in (out / "tests.txt").read_text().splitlines() if line.startswith("RESULT")]
    assert len(results) == 2 and all("rc=0" in r or "exit 0" in r for r in results), results
    assert (out / "summary.md").read_text().startswith("# GPU session summary: Stand-in GPU")
    assert "nvidia-smi" in (out / "env.txt").read_text()


def test_a_stage_stopped_by_its_budget_keeps_what_it_measured(tmp_path):
    """Also: after a failed build the tests require Triton only, and the C++ backend finds no compiler
    (it would compile csrc/ in every pytest process)."""
    run, out, calls = run_with_stand_ins(
        tmp_path, GPU_SESSION_BUDGETS="20 2 2 2 30", STUB_SLEEP="120", STUB_BUILD_FAIL="1"
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    tests = [c for c in calls if c["argv"][:2] == ["-m", "pytest"]]
    assert len(tests) == 1
    assert all(c["env"]["FUSED_IMBALANCE_REQUIRE_BACKENDS"] == "triton" for c in tests)
    assert all(c["env"]["CXX"] == "no-compiler-after-a-failed-build" for c in tests)
    stages = stage_lines(out)
    assert (
        stages["headline"][0] == 2 and stages["headline"][2] == 124
    )  # timeout's code: stopped by its budget
    assert stages["upsample"][2] == 124 and stages["tests"][2] == 0
    for name in ("bench.csv", "upsample.csv"):
        assert read_csv(out / name)[1][0]["ms"] == "1.0"  # the row written before the budget ran out
    assert re.search(r"headline \d s of 2 s \(stopped by its budget\)", (out / "summary.md").read_text())


# --- the summary's marks ----------------------------------------------------------------------


def test_summary_marks_each_goal(tmp_path):
    from benchmarks import summary

    bench = tmp_path / "bench.csv"
    cols = [
        "group",
        "loss",
        "shape",
        "dtype",
        "layout",
        "provider",
        "pass",
        "status",
        "ms",
        "wall_ms",
        "busy_ms",
        "busy_pct_copy",
        "copy_gbps",
        "device",
        "date",
    ]
    city, ade = "8x19x512x1024", "16x150x512x512"
    data = [  # fused 1 ms: eager 6 ms (6× ✓), compile 1.5 ms (1.5× ✗); wall 1.3 / busy 1.0 (1.3× ✗), 90 % ✓
        ["city", "cross_entropy", city, "float32", "contiguous", "eager", "fwd+bwd", "reference", "6.0"],
        ["city", "cross_entropy", city, "float32", "contiguous", "compile", "fwd+bwd", "ok", "1.5"],
        [
            "city",
            "cross_entropy",
            city,
            "float32",
            "contiguous",
            "fused",
            "fwd+bwd",
            "ok",
            "1.0",
            "1.3",
            "1.0",
            "90",
        ],
        # ADE: channels_last 2.0 / NCHW 1.0 ms (2× ✗); bf16 0.5 ms: 2× faster than float32 (✓); 84 % ✗
        ["ade", "cross_entropy", ade, "float32", "contiguous", "fused", "fwd+bwd", "ok", "1.0", "", "", "84"],
        [
            "ade",
            "cross_entropy",
            ade,
            "bfloat16",
            "contiguous",
            "fused",
            "fwd+bwd",
            "ok",
            "0.5",
            "",
            "",
            "86",
        ],
        ["ade", "cross_entropy", ade, "float32", "channels_last", "fused", "fwd+bwd", "ok", "2.0"],
        # rows: Liger 0.7 ms against fused 1.0 ms: Liger / fused = 0.70× ✗
        ["rows", "cross_entropy", "8192x8142", "float32", "contiguous", "fused", "fwd+bwd", "ok", "1.0"],
        ["rows", "cross_entropy", "8192x8142", "float32", "contiguous", "liger", "fwd+bwd", "ok", "0.7"],
    ]
    with open(bench, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for row in data:
            w.writerow(row + [""] * (12 - len(row)) + ["3000", "Stand-in GPU", "2026-01-01"])
    ups = tmp_path / "upsample.csv"
    # compile 3 ms / fused 1 ms: 3× ✓; peak 1 MiB + 8 B × 65536 pixels = 1.5 MiB bound, 1.6 MiB used ✗
    ups.write_text(
        "shape,dtype,mode,loss,provider,pass,status,ms,peak_bytes,low_grad_bytes,pixels\n"
        "a,float32,bilinear,cross_entropy,compile,fwd+bwd,ok,3.0,,,\n"
        f"a,float32,bilinear,cross_entropy,fused,fwd+bwd,ok,1.0,{int(1.6 * 2**20)},{2**20},65536\n"
    )
    text = summary.summary(str(bench), str(ups))
    lines = {
        line.split("|")[1].strip() + "|" + line.split("|")[2].strip(): line
        for line in text.splitlines()
        if line.startswith("| ") and not line.startswith("| loss") and not line.startswith("| shape")
    }
    city_line = lines["cross_entropy|1"]
    assert (
        "6.00× ✓" in city_line and "1.50× ✗" in city_line and "1.30× ✗" in city_line and "90 % ✓" in city_line
    )
    ade_line = lines[f"{ade}|cross_entropy"]
    assert "84 % ✗ / 86 % ✓ / — / —" in ade_line and "2.00× ✗ / —" in ade_line and "2.00× ✓ / —" in ade_line
    assert "0.70× ✗" in lines["8192x8142|cross_entropy"]
    up_line = lines["a|float32"]
    assert "3.00× ✓" in up_line and "1.6 (bound 1.5) ✗" in up_line
    assert text.startswith("# GPU session summary: Stand-in GPU, 2026-01-01")
    assert summary.summary(str(bench), str(ups), dry=True).startswith("**DRY RUN on a CPU")


def test_gpu_test_selection():
    from benchmarks import gpu_tests

    class Item:
        def __init__(self, nodeid, marks=()):
            self.nodeid, self.marks = nodeid, marks

        def get_closest_marker(self, name):
            return name if name in self.marks else None

    assert gpu_tests.selected(Item("tests/test_robustness.py::test_x", marks=("cuda",)))
    assert gpu_tests.selected(Item("tests/test_internals_triton.py::test_paths[a]"))
    assert gpu_tests.selected(Item("tests/test_upsample.py::test_lse_from_the_forward[cpp]"))
    assert not gpu_tests.selected(Item("tests/test_upsample.py::test_lse_from_the_forward_more"))
    assert not gpu_tests.selected(Item("tests/test_losses.py::test_losses[x]", marks=("slow",)))
    assert gpu_tests.check(ROOT)[0] == []
