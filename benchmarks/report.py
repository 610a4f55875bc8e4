"""Benchmark output: the CSV of every measurement, the Markdown table, the PNG plots."""

import csv
import os

from .cases import LOSSES, OTHER_PROVIDERS, OWN_PROVIDERS, PASSES

FIELDS = (
    "date",
    "device",
    "torch",
    "triton",
    "threads",
    "group",
    "loss",
    "family",
    "shape",
    "pixels",
    "classes",
    "dtype",
    "layout",
    "labels",
    "provider",
    "pass",
    "status",
    "ms",
    "ms_p20",
    "ms_p80",
    "reps",
    "floor_bytes",
    "gbps",
    "copy_gbps",
    "pct_copy",
    "peak_bytes",
    "grad_bytes",
    "first_call_s",
    "wall_ms",
    "busy_ms",
    "busy_pct_copy",
    "kernels",
    "kernel_top",
)
KEY = ("loss", "shape", "dtype", "layout", "labels", "provider", "pass")
NUMERIC = (
    "pixels",
    "classes",
    "ms",
    "ms_p20",
    "ms_p80",
    "reps",
    "floor_bytes",
    "gbps",
    "copy_gbps",
    "pct_copy",
    "peak_bytes",
    "grad_bytes",
    "first_call_s",
    "threads",
    "wall_ms",
    "busy_ms",
    "busy_pct_copy",
    "kernels",
)


# --------------------------------------------------------------------------- CSV


class CsvLog:
    """Rows are written as they are measured, so a run that is cut short keeps what it did."""

    def __init__(self, path, append=False):
        self.path = path
        exists = append and os.path.exists(path)
        self._file = open(path, "a" if exists else "w", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=FIELDS, extrasaction="ignore")
        if not exists:
            self._writer.writeheader()

    def write(self, rows):
        self._writer.writerows(rows)
        self._file.flush()

    def close(self):
        self._file.close()


def read_rows(path):
    """Rows of a results CSV, later rows replacing earlier ones with the same key (``--append``)."""
    latest = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            for k in NUMERIC:
                row[k] = _num(row.get(k))
            latest.pop(tuple(row[k] for k in KEY), None)
            latest[tuple(row[k] for k in KEY)] = row
    return list(latest.values())


def _num(v):
    if v in (None, ""):
        return None
    try:
        f = float(v)
    except ValueError:
        return None
    return int(f) if f.is_integer() and "." not in str(v) else f


# --------------------------------------------------------------------------- Markdown

COLUMNS = (
    "loss",
    "shape",
    "dtype",
    "layout",
    "pass",
    "ms eager / compile / fused",
    "fused vs eager",
    "fused vs compile",
    "GB/s eager / compile / fused",
    "fused % of copy",
    "peak MiB eager / compile / fused",
    "check",
)


def _short_status(status):
    if status in (None, "", "reference") or status.startswith(
        "ok"
    ):  # "ok (vs fused)": checked against another
        return None
    if status.startswith("skipped"):
        return "n/a"
    if status.startswith("FAIL"):
        return "FAIL"
    if status.startswith("OOM"):
        return "OOM"
    return "err"


def _fmt(v, digits=3):
    if v is None:
        return "—"
    if v == 0:
        return "0"
    if abs(v) < 0.01:
        return "<0.01"
    if abs(v) >= 10 ** (digits - 1):
        return f"{v:.0f}"
    return f"{v:.{digits}g}"


def _triple(rows_by_provider, field, scale=1.0):
    cells = []
    for p in OWN_PROVIDERS:  # the columns of the main table
        r = rows_by_provider.get(p)
        if r is None:
            cells.append("—")
            continue
        bad = _short_status(r["status"])
        v = r.get(field)
        cells.append(bad if (bad and v is None) else _fmt(None if v is None else v * scale))
    return " / ".join(cells)


def _ratio(num, den):
    if num is None or den is None or den.get("ms") is None or num.get("ms") is None:
        return "—"
    return f"{num['ms'] / den['ms']:.2f}×"


def _check(rows_by_provider):
    notes = []
    for p in ("compile", "fused"):
        r = rows_by_provider.get(p)
        if r is None:
            continue
        s = r["status"] or ""
        if s.startswith("skipped"):
            notes.append(f"{p} n/a")
        elif s.startswith("FAIL"):
            notes.append(f"{p} {s}")
        elif s not in ("ok", ""):
            notes.append(f"{p} {s}")
    return "; ".join(notes) if notes else "ok"


def group_rows(rows):
    """{(loss, shape, dtype, layout, labels, pass): {provider: row}} in measurement order."""
    groups = {}
    for r in rows:
        k = (r["loss"], r["shape"], r["dtype"], r["layout"], r["labels"], r["pass"])
        groups.setdefault(k, {})[r["provider"]] = r
    order = {p: i for i, p in enumerate(PASSES)}
    seen = []
    for k in groups:
        if k[:5] not in seen:
            seen.append(k[:5])
    return [
        (k, groups[k])
        for case in seen
        for k in sorted((k for k in groups if k[:5] == case), key=lambda k: order[k[5]])
    ]


def markdown_table(rows):
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for (loss, shape, dtype, layout, _labels, pass_), by in group_rows(rows):
        fused = by.get("fused")
        cells = [
            loss,
            shape,
            dtype,
            layout,
            pass_,
            _triple(by, "ms"),
            _ratio(by.get("eager"), fused) if fused else "—",
            _ratio(by.get("compile"), fused) if fused else "—",
            _triple(by, "gbps"),
            _fmt(fused.get("pct_copy")) + " %" if fused and fused.get("pct_copy") is not None else "—",
            _triple(by, "peak_bytes", 1 / 2**20),
            _check(by),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def other_table(rows):
    """Other libraries' kernels (OTHER_PROVIDERS) against fused, where the run has them."""
    lines = []
    for (loss, shape, dtype, layout, _labels, pass_), by in group_rows(rows):
        fused = by.get("fused")
        for p in OTHER_PROVIDERS:
            r = by.get(p)
            if r is None:
                continue
            lines.append(
                "| "
                + " | ".join(
                    [
                        p,
                        loss,
                        shape,
                        dtype,
                        layout,
                        pass_,
                        _fmt(r.get("ms")),
                        _fmt(fused.get("ms")) if fused else "—",
                        _ratio(r, fused) if fused else "—",
                        _fmt(r.get("pct_copy")) + " %" if r.get("pct_copy") else "—",
                        _fmt(None if r.get("peak_bytes") is None else r["peak_bytes"] / 2**20)
                        + " / "
                        + _fmt(
                            None
                            if not fused or fused.get("peak_bytes") is None
                            else fused["peak_bytes"] / 2**20
                        ),
                        _short_status(r["status"]) or "ok",
                    ]
                )
                + " |"
            )
    if not lines:
        return None
    head = (
        "| kernel | loss | shape | dtype | layout | pass | ms | ms fused | fused vs it | its % of copy "
        "| peak MiB it / fused | check |"
    )
    return "Other libraries' kernels on the same cases:\n\n" + "\n".join(
        [head, "|" + "|".join("---" for _ in range(12)) + "|"] + lines
    )


def busy_table(rows):
    """The profiled training steps (``--busy``, a plan's busy providers): wall against busy time."""
    lines = []
    for (loss, shape, dtype, layout, _labels, pass_), by in group_rows(rows):
        for p, r in by.items():
            if r.get("busy_ms") is None:
                continue
            lines.append(
                "| "
                + " | ".join(
                    [
                        p,
                        loss,
                        shape,
                        dtype,
                        layout,
                        pass_,
                        _fmt(r.get("ms")),
                        _fmt(r.get("wall_ms")),
                        _fmt(r["busy_ms"]),
                        f"{r['wall_ms'] / r['busy_ms']:.2f}×" if r.get("wall_ms") and r["busy_ms"] else "—",
                        _fmt(r.get("busy_pct_copy")) + " %" if r.get("busy_pct_copy") is not None else "—",
                        _fmt(r.get("kernels")),
                        r.get("kernel_top") or "",
                    ]
                )
                + " |"
            )
    if not lines:
        return None
    head = (
        "| provider | loss | shape | dtype | layout | pass | ms | step wall ms | busy ms | wall / busy "
        "| busy % of copy | kernels per step | busiest |"
    )
    return (
        "Wall time of steps run back to back against the device's busy time in them (the difference is "
        "host time the device waits for):\n\n"
        + "\n".join([head, "|" + "|".join("---" for _ in range(13)) + "|"] + lines)
    )


def notes(rows):
    """Each distinct reason a provider was skipped or failed, once."""
    seen = []
    for r in rows:
        s = r["status"] or ""
        if s not in ("ok", "reference", "") and (r["provider"], s) not in seen:
            seen.append((r["provider"], s))
    return [f"- {p}: {s}" for p, s in seen]


def header(env):
    lines = [f"# fused_imbalance benchmark — {env['device']}", ""]
    for k in (
        "date",
        "device",
        "torch",
        "triton",
        "threads",
        "copy_gbps",
        "load",
        "timer",
        "memory",
        "busy",
        "fused_backend",
        "compile_backend",
        "labels",
        "validate",
        "command",
        "stopped",
    ):
        if env.get(k) is not None:
            v = env[k]
            if k == "copy_gbps":
                k, v = "copy bandwidth", f"{v:.1f} GB/s (measured)"
            elif k == "load":
                k = "load average (1 min)"
            lines.append(f"- {k}: {v}")
    return "\n".join(lines)


LEGEND = """\
Columns: times are medians in milliseconds; "fused vs eager/compile" = their time / fused time
(> 1: fused is faster); GB/s = byte floor of the pass / time (fwd N·C·s + labels, bwd 2·N·C·s +
labels, fwd+bwd 3·N·C·s + labels, docs/DESIGN.md §8); "% of copy" = fused GB/s / measured copy
bandwidth; peak MiB = memory allocated beyond the inputs during the pass (the gradient itself,
N·C·s, is part of bwd and fwd+bwd); "bwd" = backward alone (the forward runs untimed before each call); a check
other than "ok" means the provider's loss or gradient differed from the eager reference (FAIL,
not timed), could not run (n/a, err), or ran out of memory (OOM)."""


def write_markdown(path, env, rows):
    other, busy = other_table(rows), busy_table(rows)
    text = "\n\n".join(
        [header(env), markdown_table(rows), LEGEND]
        + ([other] if other else [])
        + ([busy] if busy else [])
        + (["Notes:\n" + "\n".join(notes(rows))] if notes(rows) else [])
    )
    with open(path, "w") as f:
        f.write(text + "\n")
    return text


# --------------------------------------------------------------------------- plots


def _sweep(rows):
    """Rows of the size sweep: the segmentation family in its most measured (dtype, layout)."""
    seg = [r for r in rows if r["family"] == "seg" and r.get("ms") is not None]
    if not seg:
        seg = [r for r in rows if r.get("ms") is not None]
    counts = {}
    for r in seg:
        counts.setdefault((r["dtype"], r["layout"]), set()).add(r["shape"])
    if not counts:
        return [], None
    best = max(counts, key=lambda k: (len(counts[k]), k == ("float32", "contiguous")))
    return [r for r in seg if (r["dtype"], r["layout"]) == best], best


def _mb(r):
    return r["floor_bytes"] / {"fwd": 1, "bwd": 2, "fwd+bwd": 3}[r["pass"]] / 1e6


def write_plots(out_dir, env, rows):
    """speedup.png and bandwidth.png along the size sweep; returns notes on what was skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, LogFormatter
    except ImportError:
        return ["plots skipped: matplotlib is not installed"]
    sweep, group = _sweep(rows)
    if not sweep:
        return ["plots skipped: no timed results"]
    tag = (
        f"{env['device']} · {group[0]} {group[1]} · torch {env['torch']} · triton {env['triton']} · "
        f"{env['threads']} threads · {env['date']}"
    )
    colors = {loss: plt.get_cmap("tab10")(i) for i, loss in enumerate(LOSSES)}
    styles = {"fused": "-", "compile": "--", "eager": ":"}
    passes = [p for p in PASSES if any(r["pass"] == p for r in sweep)]
    out = []

    def plain_ticks(ax):
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            axis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.5)))

    def legend(fig, axes):
        handles = {}
        for ax in axes:  # a loss may appear in one pass only (confusion_matrix: fwd)
            for h, label in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(label, h)
        axes[-1].legend(
            handles.values(), handles.keys(), fontsize=6, loc="center left", bbox_to_anchor=(1.02, 0.5)
        )

    def series(provider, loss, pass_):
        pts = sorted(
            (_mb(r), r)
            for r in sweep
            if r["provider"] == provider and r["loss"] == loss and r["pass"] == pass_
        )
        return pts

    fig, axes = plt.subplots(1, len(passes), figsize=(5.5 * len(passes), 4.5), squeeze=False)
    for ax, pass_ in zip(axes[0], passes):
        for loss in LOSSES:
            for provider in OWN_PROVIDERS:
                pts = series(provider, loss, pass_)
                if pts:
                    ax.plot(
                        [p[0] for p in pts],
                        [p[1]["gbps"] for p in pts],
                        styles[provider],
                        marker="o",
                        ms=3,
                        color=colors[loss],
                        label=f"{loss} ({provider})",
                    )
        if env.get("copy_gbps"):
            ax.axhline(env["copy_gbps"], color="k", lw=0.8, label="copy bandwidth")
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="logits (MB)",
            ylabel="GB/s against the byte floor",
            title=pass_,
        )
        plain_ticks(ax)
        ax.grid(True, which="both", alpha=0.3)
    legend(fig, axes[0])
    fig.suptitle(f"Achieved bandwidth (fused —, compile --, eager ··)\n{tag}", fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "bandwidth.png"), dpi=120, bbox_inches="tight")
    plt.close(fig)

    if not any(r["provider"] == "fused" for r in sweep):
        out.append("speed-up plot skipped: no fused results")
        return out
    fig, axes = plt.subplots(1, len(passes), figsize=(5.5 * len(passes), 4.5), squeeze=False)
    for ax, pass_ in zip(axes[0], passes):
        for loss in LOSSES:
            fused = {mb: r for mb, r in series("fused", loss, pass_)}
            for base, style in (("eager", "-"), ("compile", "--")):
                pts = [(mb, r["ms"] / fused[mb]["ms"]) for mb, r in series(base, loss, pass_) if mb in fused]
                if pts:
                    ax.plot(
                        [p[0] for p in pts],
                        [p[1] for p in pts],
                        style,
                        marker="o",
                        ms=3,
                        color=colors[loss],
                        label=f"{loss} vs {base}",
                    )
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set(xscale="log", yscale="log", xlabel="logits (MB)", ylabel="speed-up of fused (×)", title=pass_)
        plain_ticks(ax)
        ax.grid(True, which="both", alpha=0.3)
    legend(fig, axes[0])
    fig.suptitle(f"Speed-up of fused over eager (—) and torch.compile (--)\n{tag}", fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "speedup.png"), dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out
