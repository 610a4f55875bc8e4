"""The examples run end to end on a tiny budget (``--smoke``), so they cannot rot.

Each test runs an example's ``main`` in this process (seconds) into a temporary directory and
checks what it wrote: a row and finite numbers for every loss, a plot that is a PNG. They need
the `examples` extra (scikit-learn, tqdm, matplotlib), which the `test` extra includes.
"""

import hashlib
import importlib.util
import json
import math
import os
import tempfile

import pytest
import torch
from tolerances import LOSS_TOL, TOL

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def load(name, monkeypatch):
    monkeypatch.syspath_prepend(EXAMPLES)  # as `python examples/NAME.py` does, for examples/_common.py
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(EXAMPLES, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def assert_png(path):
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n", path
    assert os.path.getsize(path) > 10_000  # a drawn figure, not an empty canvas


def smoke_output(tmp_path, monkeypatch):
    """Where a --smoke run without --out writes: tempfile's folder, here tmp_path. Returns a check
    that it made one new folder there and left the committed results alone, which gives that folder."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    committed = os.path.join(EXAMPLES, "results")

    def digest():
        return {
            f: hashlib.sha256(open(os.path.join(committed, f), "rb").read()).hexdigest()
            for f in sorted(os.listdir(committed))
        }

    before = digest()

    def check():
        assert digest() == before, "a --smoke run wrote into examples/results/"
        made = list(tmp_path.iterdir())
        assert len(made) == 1 and made[0].is_dir(), made
        return made[0]

    return check


def table_rows(md):
    return {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ")}


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_long_tailed_split_is_exponential_balanced_and_disjoint(monkeypatch):
    lt = load("long_tailed_digits", monkeypatch)
    X = torch.arange(1000, dtype=torch.float32)[:, None]  # the row is its own index
    y = torch.arange(1000) % 10
    data, counts = lt.long_tailed_split(X, y, 10, n_max=60, ratio=50.0, n_test=20, n_val=5, seed=3)
    # n_c = int(60 * 50^(-c/9)): the class-balanced paper's exponential profile, 1:50 end to end.
    assert counts == [int(60 * 50 ** (-c / 9)) for c in range(10)]
    assert counts[0] == 60 and counts[-1] == 1
    assert torch.bincount(data["train"][1], minlength=10).tolist() == counts
    assert torch.bincount(data["test"][1], minlength=10).tolist() == [20] * 10
    assert torch.bincount(data["val"][1], minlength=10).tolist() == [5] * 10
    rows = [set(data[k][0].flatten().long().tolist()) for k in ("train", "val", "test")]
    assert not (rows[0] & rows[1]) and not (rows[0] & rows[2]) and not (rows[1] & rows[2])
    for k in data:  # each image keeps its label
        assert torch.equal(data[k][0].flatten().long() % 10, data[k][1])
    again, _ = lt.long_tailed_split(X, y, 10, n_max=60, ratio=50.0, n_test=20, n_val=5, seed=3)
    assert all(torch.equal(again[k][0], data[k][0]) for k in data)


def test_long_tailed_digits_smoke(tmp_path, monkeypatch):
    """--smoke without --out: into a new temporary folder, never over examples/results/."""
    lt = load("long_tailed_digits", monkeypatch)
    assert lt.parse_args([]).out is None and lt.parse_args(["--smoke", "--out", "x"]).out == "x"
    assert lt.output_folder(lt.parse_args([]), "long_tailed_digits") == os.path.join(EXAMPLES, "results")
    written = smoke_output(tmp_path, monkeypatch)
    summary = lt.main(["--smoke", "--threads", "1", "--device", "cpu"])
    tmp_path = written()
    with open(tmp_path / "long_tailed_digits.json") as f:
        res = json.load(f)
    names = list(lt.make_losses(res["counts"], 10, lt.parse_args([])).keys())
    assert len(names) == 8 and list(summary) == names and list(res["summary"]) == names
    assert res["counts"][0] == 100 and res["counts"][-1] == 2  # the default split, 1:50
    assert res["rarest_third"] == [9, 8, 7]
    for name in names:
        runs = res["runs"][name]
        assert len(runs) == 2  # --smoke: 2 seeds
        for r in runs:
            assert len(r["recall"]) == 10
            assert all(0.0 <= v <= 1.0 for v in r["recall"] + [r["accuracy"]])
            # balanced test set: accuracy is the mean recall
            assert r["accuracy"] == pytest.approx(sum(r["recall"]) / 10, abs=1e-12)
        s = res["summary"][name]
        rare = [sum(r["recall"][c] for c in (7, 8, 9)) / 3 for r in runs]
        assert s["rare_third"][0] == pytest.approx(sum(rare) / 2, abs=1e-12)
        assert all(math.isfinite(v) for pair in [s["accuracy"], s["rare_third"], *s["recall"]] for v in pair)
    md = (tmp_path / "long_tailed_digits.md").read_text()
    rows = table_rows(md)
    for name in names:
        assert name in rows and "nan" not in rows[name].lower()
    assert_png(tmp_path / "long_tailed_digits.png")


def test_synthetic_segmentation_is_seeded_and_has_rare_classes(monkeypatch):
    seg = load("segmentation", monkeypatch)
    x, y = seg.synthetic_segmentation(32, seed=5)
    x2, y2 = seg.synthetic_segmentation(32, seed=5)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert x.shape == (32, 3, 64, 64) and y.shape == (32, 64, 64) and y.dtype == torch.int64
    share = torch.bincount(y.flatten(), minlength=5).double() / y.numel()
    assert (share > 0).all()
    assert (share[3:] < 0.02).all() and (share[:2] > 0.2).all()


def test_segmentation_smoke(tmp_path, monkeypatch):
    """--smoke without --out: into a new temporary folder, never over examples/results/."""
    seg = load("segmentation", monkeypatch)
    written = smoke_output(tmp_path, monkeypatch)
    results = seg.main(["--smoke", "--threads", "1", "--device", "cpu", "--no-progress"])
    tmp_path = written()
    args = seg.parse_args(["--smoke"])
    names = list(seg.make_losses([1] * 5, 5, args).keys())
    assert list(results) == names and len(names) == 6
    for name, h in results.items():
        assert len(h["val_iou"]) == args.epochs and len(h["train_miou"]) == args.epochs
        # The training confusion comes from the loss's own pass: every pixel once per epoch.
        assert h["train_pixels_last_epoch"] == args.n_train * 64 * 64
        values = [v for epoch in h["val_iou"] for v in epoch] + h["train_miou"] + [h["val_miou"]]
        assert all(0.0 <= v <= 1.0 for v in values)
        assert all(math.isfinite(v) and v >= 0 for v in h["loss"])
    with open(tmp_path / "segmentation.json") as f:
        res = json.load(f)
    assert list(res["results"]) == names
    assert res["path"] == "fused upsample"  # the default: 1/4-resolution logits, upsample="bilinear"
    assert seg.upsample_options(args)["upsample"] == "bilinear"
    rows = table_rows((tmp_path / "segmentation.md").read_text())
    for name in names:
        assert name in rows and "nan" not in rows[name].lower()
    assert_png(tmp_path / "segmentation.png")


def test_segmentation_fused_upsample_equals_interpolate_then_loss(monkeypatch):
    """The example's default path (the losses built with upsample="bilinear" on the 1/4-resolution
    logits) gives the loss, the gradient of every parameter of the net and the confusion counts of
    its --interpolate path (F.interpolate, then the loss), on one batch of its own data and net."""
    seg = load("segmentation", monkeypatch)
    torch.set_num_threads(1)
    x, y = seg.synthetic_segmentation(4, seed=3)
    counts = torch.bincount(y.flatten(), minlength=5).tolist()
    fused, interp = seg.parse_args(["--smoke"]), seg.parse_args(["--smoke", "--interpolate"])
    assert seg.upsample_options(fused) == {"upsample": "bilinear", "align_corners": False}
    assert seg.upsample_options(interp) == {}
    for name in seg.make_losses(counts, 5, fused):
        out = {}
        for key, args in (("fused", fused), ("interpolate", interp)):
            torch.manual_seed(0)
            model = seg.FCN(5, args.width)
            low_res = model(x)
            assert low_res.shape == (4, 5, 16, 16)
            logits = seg.loss_input(low_res, y, args)
            assert logits.shape == ((4, 5, 64, 64) if key == "interpolate" else (4, 5, 16, 16))
            cm = torch.zeros(5, 5, dtype=torch.int64)
            loss = seg.make_losses(counts, 5, args)[name]()(logits, y, confusion=cm)
            loss.backward()
            out[key] = (loss.detach(), [p.grad for p in model.parameters()], cm)
        (lf, gf, cf), (li, gi, ci) = out["fused"], out["interpolate"]
        assert lf.item() > 0, name
        torch.testing.assert_close(lf, li, **LOSS_TOL[torch.float32], msg=name)
        assert any(g.abs().max() > 0 for g in gi), name
        for a, b in zip(gf, gi):
            torch.testing.assert_close(a, b, **TOL[torch.float32], msg=name)
        assert torch.equal(cf, ci), name
        assert int(cf.sum()) == 4 * 64 * 64


def test_segmentation_memory_mode(tmp_path, monkeypatch):
    """--memory measures both paths on one batch: the fused upsample allocates less than the
    interpolated logits and their gradient alone, and both paths compute the same loss."""
    seg = load("segmentation", monkeypatch)
    rows = seg.main(
        [
            "--smoke",
            "--memory",
            "--repeat",
            "1",
            "--threads",
            "1",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "given"),
        ]
    )  # --smoke with --out: there
    tmp_path = tmp_path / "given"
    args = seg.parse_args(["--smoke"])
    assert list(rows) == list(seg.make_losses([1] * 5, 5, args))
    interpolated_bytes = 2 * args.batch_size * 5 * 64 * 64 * 4  # the (B, C, 64, 64) logits and their gradient
    for name, r in rows.items():
        assert r["interpolate"]["peak_bytes"] >= interpolated_bytes, name
        assert 0 < r["fused"]["peak_bytes"] < interpolated_bytes / 4, name
        assert r["max_loss_diff"] <= 1e-5 * (1 + abs(r["interpolate"]["loss"])), name
        assert r["same_confusion"], name
    rows_md = table_rows((tmp_path / "segmentation_memory.md").read_text())
    assert all(name in rows_md and "nan" not in rows_md[name].lower() for name in rows)
