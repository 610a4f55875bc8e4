"""The GPU session's results against the project's goals, as a short Markdown page.

    python -m benchmarks.summary --bench bench.csv --upsample upsample.csv [--session session.log]
                                 [--tests tests.txt] [--out summary.md]

Reads the CSVs of ``benchmarks.bench --plan session`` and ``benchmarks.upsample --plan session``
(and the stage lines of ``scripts/gpu_session.sh``) and writes each goal with its measured value and
a mark: ✓ met, ✗ a shortfall, "—" not measured (a stage stopped by its budget, a provider that
failed or could not run). Only the standard library: it runs in a second, even where torch is
broken. Results measured on a CPU (the session's rehearsal) are marked so in the first line.
"""

import argparse
import csv
import os
import re
import sys

# The goals the GPU numbers are held against.
VS_EAGER = 5.0  # every loss at Cityscapes size: training step ≥ 5× eager
VS_COMPILE = 2.0  # ... and ≥ 2× torch.compile of the reference
WALL_OVER_BUSY = 1.15  # ... wall time within 1.15× of the kernels' busy time
KERNEL_PCT_COPY = 85.0  # every case's kernels ≥ 85 % of copy bandwidth over the byte floor
CL_OVER_NCHW = 1.15  # channels_last within 1.15× of NCHW
BF16_SPEEDUP = 1.6  # bfloat16 ≥ 1.6× faster than float32 (half the bytes)
UP_VS_COMPILE = 2.0  # upsampled losses ≥ 2× torch.compile of interpolate + loss
UP_EXTRA_PER_PIXEL = 8  # ... peak extra ≤ the low-resolution gradient + 8 bytes per full-resolution pixel

OK, SHORT, NONE = "✓", "✗", "—"


def _num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def read(path):
    if not path or not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in ("group", "loss", "shape", "dtype", "layout", "mode", "provider", "pass", "status"):
            r[k] = r.get(k) or ""  # a column a stopped or older run lacks reads as empty
        for k in (
            "ms",
            "wall_ms",
            "busy_ms",
            "busy_pct_copy",
            "pct_copy",
            "copy_gbps",
            "peak_bytes",
            "low_grad_bytes",
            "pixels",
            "first_call_s",
        ):
            r[k] = _num(r.get(k))
    return rows


def timed(r):
    return r is not None and r.get("ms") is not None and not (r.get("status") or "").startswith("FAIL")


class Tally:
    def __init__(self):
        self.ok = self.short = self.none = 0

    def mark(self, value, passed, fmt):
        """A cell: the value and its mark; counts it."""
        if value is None:
            self.none += 1
            return NONE
        if passed:
            self.ok += 1
            return f"{fmt(value)} {OK}"
        self.short += 1
        return f"{fmt(value)} {SHORT}"


def _x(v):
    return f"{v:.2f}×" if v < 10 else f"{v:.0f}×"


def _pct(v):
    return f"{v:.0f} %"


def _ms(v):
    return "—" if v is None else (f"{v:.3g}" if v < 100 else f"{v:.0f}")


def _ratio(a, b):
    return a["ms"] / b["ms"] if timed(a) and timed(b) else None


def index(rows):
    """{(loss, shape, dtype, layout, provider, pass): row}, the last row of a key winning."""
    return {
        (r.get("loss"), r.get("shape"), r.get("dtype"), r.get("layout"), r.get("provider"), r.get("pass")): r
        for r in rows
    }


def step_pass(loss_rows):
    return "fwd+bwd" if any(r["pass"] == "fwd+bwd" for r in loss_rows) else "fwd"


def city_table(rows, t):
    by = index(rows)
    city = [r for r in rows if r.get("group") == "city" and r["provider"] == "fused"]
    losses = list(dict.fromkeys(r["loss"] for r in city))
    if not losses:
        return ["No case of the first group (every loss at Cityscapes size) was measured."]
    shape = city[0]["shape"]
    out = [
        f"### Every loss at {shape} float32 NCHW, training step (forward + backward; confusion_matrix: forward)",
        "",
        f"| loss | fused ms | vs eager ≥ {VS_EAGER:g}× | vs torch.compile ≥ {VS_COMPILE:g}× "
        f"| wall / kernels' busy ≤ {WALL_OVER_BUSY:g}× | kernels % of copy ≥ {KERNEL_PCT_COPY:g} % |",
        "|---|---|---|---|---|---|",
    ]
    for loss in losses:
        p = step_pass([r for r in city if r["loss"] == loss])
        f = by.get((loss, shape, "float32", "contiguous", "fused", p))
        e = by.get((loss, shape, "float32", "contiguous", "eager", p))
        c = by.get((loss, shape, "float32", "contiguous", "compile", p))
        vs_e, vs_c = (_ratio(e, f) if f else None), (_ratio(c, f) if f else None)
        wb = f["wall_ms"] / f["busy_ms"] if f and f.get("wall_ms") and f.get("busy_ms") else None
        bw = f.get("busy_pct_copy") if f else None
        out.append(
            f"| {loss} | {_ms(f['ms']) if timed(f) else _status(f)} | "
            f"{t.mark(vs_e, vs_e is not None and vs_e >= VS_EAGER, _x)} | "
            f"{t.mark(vs_c, vs_c is not None and vs_c >= VS_COMPILE, _x)} | "
            f"{t.mark(wb, wb is not None and wb <= WALL_OVER_BUSY, _x)} | "
            f"{t.mark(bw, bw is not None and bw >= KERNEL_PCT_COPY, _pct)} |"
        )
    return out


def _status(r):
    if r is None:
        return NONE
    s = r.get("status") or ""
    return "FAIL" if s.startswith("FAIL") else ("OOM" if s.startswith("OOM") else NONE)


def cases_table(rows, t):
    """Every fused case beyond the first group: kernels' bandwidth, channels_last against NCHW,
    bfloat16 against float32; one row per (shape, loss)."""
    by = index(rows)
    fused = [
        r
        for r in rows
        if r["provider"] == "fused"
        and r.get("group") not in ("city", "rows")
        and r["pass"] in ("fwd+bwd", "fwd")
    ]
    keys = list(dict.fromkeys((r["shape"], r["loss"]) for r in fused))
    if not keys:
        return ["No bfloat16, channels_last or ADE20K-size case was measured."]
    configs = (
        ("float32", "contiguous"),
        ("bfloat16", "contiguous"),
        ("float32", "channels_last"),
        ("bfloat16", "channels_last"),
    )
    out = [
        "### Every case: kernels' bandwidth, channels_last, bfloat16 (fused, training step)",
        "",
        f"Kernels % of copy ≥ {KERNEL_PCT_COPY:g} % (float32 / bfloat16 / channels_last float32 / channels_last "
        f"bfloat16), channels_last time / NCHW time ≤ {CL_OVER_NCHW:g}× (float32 / bfloat16), bfloat16 speed-up "
        f"over float32 ≥ {BF16_SPEEDUP:g}× (NCHW / channels_last).",
        "",
        "| shape | loss | kernels % of copy | channels_last / NCHW | bfloat16 speed-up |",
        "|---|---|---|---|---|",
    ]

    def get(shape, loss, dtype, layout):
        p = "fwd" if loss == "confusion_matrix" else "fwd+bwd"
        return by.get((loss, shape, dtype, layout, "fused", p))

    for shape, loss in keys:
        f = {c: get(shape, loss, *c) for c in configs}
        pct = [f[c].get("busy_pct_copy") if f[c] else None for c in configs]
        bw = " / ".join(t.mark(v, v >= KERNEL_PCT_COPY if v is not None else False, _pct) for v in pct)
        cl = []
        for d in ("float32", "bfloat16"):
            a, b = f[(d, "channels_last")], f[(d, "contiguous")]
            v = _ratio(a, b) if a and b else None
            cl.append(t.mark(v, v is not None and v <= CL_OVER_NCHW, _x))
        sp = []
        for lay in ("contiguous", "channels_last"):
            a, b = f[("float32", lay)], f[("bfloat16", lay)]
            v = _ratio(a, b) if a and b else None
            sp.append(t.mark(v, v is not None and v >= BF16_SPEEDUP, _x))
        out.append(f"| {shape} | {loss} | {bw} | {' / '.join(cl)} | {' / '.join(sp)} |")
    return out


def rows_table(rows, t):
    by = index(rows)
    fused = [r for r in rows if r.get("group") == "rows" and r["provider"] == "fused"]
    if not fused:
        return ["The (N, C) rows were not measured."]
    out = [
        "### (N, C) rows (training step): faster than Liger-Kernel's cross-entropy; kernels % of copy",
        "",
        "| shape | loss | dtype | fused ms | Liger ms | Liger / fused > 1 | kernels % of copy ≥ 85 % |",
        "|---|---|---|---|---|---|---|",
    ]
    for f in fused:
        lg = by.get((f["loss"], f["shape"], f["dtype"], f["layout"], "liger", f["pass"]))
        v = _ratio(lg, f) if lg else None
        bw = f.get("busy_pct_copy")
        liger_cell = _ms(lg["ms"]) if timed(lg) else ((lg.get("status") or NONE)[:40] if lg else NONE)
        vs = t.mark(v, v is not None and v > 1.0, _x) if f["loss"] == "cross_entropy" else NONE
        out.append(
            f"| {f['shape']} | {f['loss']} | {f['dtype']} | {_ms(f['ms']) if timed(f) else _status(f)} | "
            f"{liger_cell} | {vs} | {t.mark(bw, bw is not None and bw >= KERNEL_PCT_COPY, _pct)} |"
        )
    return out


def upsample_table(rows, t):
    fused = [r for r in rows if r["provider"] == "fused" and r["pass"] == "fwd+bwd"]
    if not fused:
        return ["The upsampled losses were not measured."]
    by = {
        (r.get("shape"), r.get("dtype"), r.get("mode"), r.get("loss"), r.get("provider"), r.get("pass")): r
        for r in rows
    }
    out = [
        "### Upsampled losses (training step): fused against torch.compile of F.interpolate + loss; peak memory",
        "",
        f"| logits → labels | dtype | loss | fused ms | compile ms | vs compile ≥ {UP_VS_COMPILE:g}× "
        f"| eager ms | peak extra MiB ≤ low-res gradient + {UP_EXTRA_PER_PIXEL} B/pixel |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for f in fused:
        k = (f.get("shape"), f.get("dtype"), f.get("mode"), f.get("loss"))
        c, e = by.get(k + ("compile", "fwd+bwd")), by.get(k + ("eager", "fwd+bwd"))
        v = _ratio(c, f) if c else None
        peak = f.get("peak_bytes")
        bound = (
            (f["low_grad_bytes"] + UP_EXTRA_PER_PIXEL * f["pixels"])
            if f.get("low_grad_bytes") is not None and f.get("pixels") is not None
            else None
        )
        mem = t.mark(
            peak,
            peak is not None and bound is not None and peak <= bound,
            lambda b: f"{b / 2**20:.3g} (bound {bound / 2**20:.3g})" if bound else f"{b / 2**20:.3g}",
        )
        out.append(
            f"| {f['shape']} | {f['dtype']} | {f['loss']} | {_ms(f['ms']) if timed(f) else _status(f)} | "
            f"{_ms(c['ms']) if timed(c) else _status(c)} | {t.mark(v, v is not None and v >= UP_VS_COMPILE, _x)} | "
            f"{_ms(e['ms']) if timed(e) else _status(e)} | {mem} |"
        )
    return out


STAGE = re.compile(r"^STAGE (\S+) budget=(\S+) elapsed=(\S+) rc=(\S+)")


def stages(path):
    if not path or not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            m = STAGE.match(line)
            if m:
                name, budget, elapsed, rc = m.groups()
                note = "stopped by its budget" if rc == "124" else ("ok" if rc == "0" else f"exit {rc}")
                out.append(f"{name} {elapsed} s of {budget} s ({note})")
    return out


def test_results(path):
    if not path or not os.path.exists(path):
        return []
    with open(path) as f:
        return [line[len("RESULT ") :].strip() for line in f if line.startswith("RESULT ")]


def summary(bench, upsample, session=None, tests=None, dry=False):
    rows, ups = read(bench), read(upsample)
    any_row = (rows or ups or [{}])[0]
    device = any_row.get("device") or "no device (nothing measured)"
    date = (any_row.get("date") or "")[:10]
    lines = []
    if dry:
        lines.append(
            f"**DRY RUN on a CPU ({device}), {date}: tiny shapes, Triton interpreted, torch.compile without "
            "Inductor. These numbers check the script and its outputs; they say nothing about a GPU.**"
        )
    else:
        lines.append(f"# GPU session summary: {device}, {date}")
    lines.append("")
    copy = next((r["copy_gbps"] for r in rows if r.get("copy_gbps")), None)
    firsts = [
        r["first_call_s"] for r in rows if r["provider"] == "fused" and r.get("first_call_s") is not None
    ]
    meta = []
    st = stages(session)
    if st:
        meta.append("Stages: " + "; ".join(st) + ".")
    tr = test_results(tests)
    if tr:
        meta.append("Tests: " + "; ".join(tr) + ".")
    if copy:
        meta.append(f"Copy bandwidth: {copy:.0f} GB/s (bytes read + written).")
    if firsts:
        meta.append(
            f"Fused first calls (compile or cache load): median {sorted(firsts)[len(firsts) // 2]:.2f} s, "
            f"max {max(firsts):.2f} s over {len(firsts)} cases."
        )
    lines += meta + [""]
    t = Tally()
    body = []
    for part in (city_table(rows, t), cases_table(rows, t), rows_table(rows, t), upsample_table(ups, t)):
        body += part + [""]
    lines.append(
        f"Goals: {t.ok} met ✓, {t.short} short ✗, {t.none} not measured —. Marks: ✓ the goal is met, ✗ a "
        "shortfall (as measured), — not measured."
    )
    lines.append("")
    return "\n".join(lines + body).rstrip() + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.summary", description=__doc__.split("\n\n")[0])
    p.add_argument("--bench", required=True)
    p.add_argument("--upsample", required=True)
    p.add_argument("--session")
    p.add_argument("--tests")
    p.add_argument("--out")
    p.add_argument("--dry", action="store_true", help="the CSVs come from the CPU rehearsal: say so first")
    args = p.parse_args(argv)
    text = summary(args.bench, args.upsample, args.session, args.tests, args.dry)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
