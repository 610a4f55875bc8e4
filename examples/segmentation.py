"""A dense training loop with rare classes: each loss module on a synthetic segmentation task.

The dataset is generated with a fixed seed: 64x64 RGB images with two large regions ("sky" above a
wavy horizon, "ground" below), a few blobs of a common class, and, in some images only, small
squares and small discs of two rare classes whose colours are close to those of common classes.
Every pixel gets Gaussian noise, so a pixel alone is ambiguous and the net must use its context.

A small fully convolutional net predicts logits at 1/4 resolution (16x16). They go to the loss
modules as they are: each module is built with ``upsample="bilinear"`` and takes the loss of the
logits upsampled bilinearly to the 64x64 labels without materialising them (the validation
``ConfusionMatrix.update`` takes the same option). ``--interpolate`` runs the usual path
instead: ``F.interpolate`` to 64x64, then the loss; both compute the same thing. Each step
passes ``confusion=`` to the loss, so the training mIoU in the progress bar comes from the loss's
own pass over the logits, not from a second read. After each epoch the validation set gives
per-class IoU (and, for CDB, the class accuracies that set its weights).

    python examples/segmentation.py                         # the committed results (a few minutes)
    python examples/segmentation.py --smoke                 # seconds: checks that it runs
    python examples/segmentation.py --memory                # memory and time: fused upsample vs interpolate

Writes ``segmentation.md`` (per-class validation IoU per loss), ``segmentation.json`` and
``segmentation.png`` (per-class validation IoU over the epochs, one panel per loss) into ``--out``
(default: examples/results/; with ``--smoke``, a new temporary folder). ``--memory`` trains nothing: for one
training batch it measures,
per loss, the peak memory and the time of the loss's forward+backward and of a whole training
step, fused upsample against interpolate + loss, and writes ``segmentation_memory.md``.
"""

import argparse
import functools
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import fused_imbalance as fi
import fused_imbalance.functional as F_fi
from tqdm import tqdm

from _common import add_run_options, describe_device, output_folder, start  # examples/_common.py

CLASSES = ["sky", "ground", "blob", "square (rare)", "disc (rare)"]
# Mean colour of each class; the rare ones sit close to a common one (square ~ blob, disc ~ ground).
COLOURS = torch.tensor(
    [[0.25, 0.45, 0.80], [0.40, 0.60, 0.25], [0.75, 0.30, 0.30], [0.90, 0.55, 0.20], [0.45, 0.85, 0.45]]
)


def synthetic_segmentation(n, size=64, noise=0.3, seed=0):
    """``n`` images (n, 3, size, size) float32 and labels (n, size, size) int64, from ``seed``."""
    g = torch.Generator().manual_seed(seed)

    def u(lo, hi):
        return lo + (hi - lo) * torch.rand((), generator=g).item()

    yy, xx = torch.meshgrid(
        torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij"
    )
    labels = torch.empty(n, size, size, dtype=torch.int64)
    for i in range(n):
        horizon = u(0.3, 0.6) * size + u(2, 6) * torch.sin(xx / u(5, 12) + u(0, 6.3))
        lab = torch.where(yy < horizon, 0, 1)
        for _ in range(int(u(1, 4))):  # common blobs (ellipses)
            cy, cx, ry, rx = u(0, size), u(0, size), u(5, 13), u(5, 13)
            lab[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1] = 2
        if u(0, 1) < 0.5:  # rare squares, in half of the images
            for _ in range(int(u(1, 3))):
                s, cy, cx = int(u(4, 9)), int(u(0, size - 8)), int(u(0, size - 8))
                lab[cy : cy + s, cx : cx + s] = 3
        if u(0, 1) < 0.3:  # a rarer disc, in 30 % of the images
            cy, cx, r = u(5, size - 5), u(5, size - 5), u(3, 5)
            lab[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 4
        labels[i] = lab
    images = COLOURS[labels].permute(0, 3, 1, 2).contiguous()
    images += noise * torch.randn(images.shape, generator=g)
    return images, labels


class FCN(nn.Module):
    """Conv net whose head predicts logits at 1/4 of the input resolution."""

    def __init__(self, num_classes, width=32):
        super().__init__()

        def block(cin, cout, stride=1, dilation=1):
            return [
                nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            ]

        self.body = nn.Sequential(
            *block(3, width // 2),
            *block(width // 2, width, stride=2),
            *block(width, width),
            *block(width, 2 * width, stride=2),
            *block(2 * width, 2 * width, dilation=2),
            *block(2 * width, 2 * width, dilation=4),
        )
        self.head = nn.Conv2d(2 * width, num_classes, 1)

    def forward(self, x):
        return self.head(self.body(x))  # (B, C, H/4, W/4)


# How the head's 1/4-resolution logits reach the label size: the one place where it is decided.
RESIZE = dict(mode="bilinear", align_corners=False)


def upsample_options(args):
    """The keywords of the loss modules and of ``ConfusionMatrix.update``: the fused bilinear
    upsampling, or none with ``--interpolate`` (the logits are then interpolated beforehand)."""
    return {} if args.interpolate else dict(upsample=RESIZE["mode"], align_corners=RESIZE["align_corners"])


def loss_input(low_res_logits, target, args):
    """What the loss and the metrics are given: the 1/4-resolution logits themselves (fused
    upsampling), or with ``--interpolate`` those logits interpolated to the label size, a
    (B, C, H, W) tensor (and its gradient in the backward)."""
    if args.interpolate:
        return F.interpolate(low_res_logits, size=target.shape[-2:], **RESIZE)
    return low_res_logits


def make_losses(pixel_counts, num_classes, args):
    """name -> a function building a fresh criterion(logits, target, confusion=None)."""
    C = num_classes
    up = upsample_options(args)
    return {
        "cross-entropy": lambda: functools.partial(F_fi.cross_entropy, **up),
        "FocalLoss (γ=2)": lambda: fi.FocalLoss(gamma=2.0, **up),
        "ClassBalancedLoss (softmax)": lambda: fi.ClassBalancedLoss(pixel_counts, beta=args.beta, **up),
        "RecallLoss": lambda: fi.RecallLoss(C, **up),
        "CDBLoss (τ dynamic)": lambda: fi.CDBLoss(C, **up),
        f"OutlyingMSELoss (α={args.alpha:g})": lambda: fi.OutlyingMSELoss(
            pixel_counts, alpha=args.alpha, **up
        ),
    }


@torch.no_grad()
def validate(model, images, labels, num_classes, args):
    model.eval()
    cm = fi.ConfusionMatrix(num_classes).to(images.device)
    for i in range(0, labels.shape[0], args.batch_size):
        x, y = images[i : i + args.batch_size], labels[i : i + args.batch_size]
        cm.update(loss_input(model(x), y, args), y, **upsample_options(args))
    return cm


def train_step(model, criterion, opt, x, y, confusion, args):
    """One step; the loss adds this batch's confusion counts into ``confusion`` in the same pass."""
    loss = criterion(loss_input(model(x), y, args), y, confusion=confusion)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss


def train_one(name, criterion, data, args, device):
    C = len(CLASSES)
    torch.manual_seed(args.seed)
    model = FCN(C, args.width).to(device)
    if isinstance(criterion, nn.Module):
        criterion = criterion.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    (xtr, ytr), (xva, yva) = data["train"], data["val"]
    steps = math.ceil(ytr.shape[0] / args.batch_size)
    train_cm = fi.ConfusionMatrix(C).to(device)
    history = {"train_miou": [], "val_iou": [], "loss": []}
    g = torch.Generator().manual_seed(args.seed)
    bar = tqdm(total=args.epochs * steps, desc=f"{name:28s}", dynamic_ncols=True, disable=args.no_progress)
    for epoch in range(args.epochs):
        model.train()
        train_cm.reset()
        perm = torch.randperm(ytr.shape[0], generator=g).to(device)
        loss_sum = 0.0
        for i in range(steps):
            b = perm[i * args.batch_size : (i + 1) * args.batch_size]
            x, y = xtr[b], ytr[b]
            loss = train_step(model, criterion, opt, x, y, train_cm.matrix, args)
            value = loss.item()  # a host sync per step, for the progress bar
            loss_sum += value
            bar.set_postfix(epoch=epoch + 1, loss=f"{value:.4f}", mIoU=f"{float(train_cm.miou()):.3f}")
            bar.update()
        val_cm = validate(model, xva, yva, C, args)
        if isinstance(criterion, fi.CDBLoss):
            criterion.update_from_confusion(val_cm)  # CDB: weights from the validation accuracy
        history["loss"].append(loss_sum / steps)
        history["train_miou"].append(float(train_cm.miou()))
        history["val_iou"].append(val_cm.iou().cpu().tolist())
    bar.close()
    history["train_pixels_last_epoch"] = int(train_cm.matrix.sum())
    history["val_miou"] = float(val_cm.miou())
    history["val_recall"] = val_cm.recall().cpu().tolist()
    return history


def path_description(args):
    if args.interpolate:
        return "upsampled bilinearly to 64x64 by F.interpolate before the loss (--interpolate)"
    return 'given to the loss as they are, with upsample="bilinear" (fused upsampling to 64x64)'


def peak_extra_bytes(fn, device):
    """Peak bytes allocated while ``fn()`` runs, beyond what was allocated before it: the CUDA
    allocator's statistics on a GPU, the profiler's allocation events (``profile_memory``) on the
    CPU, which include the allocations inside the C++ ops."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    stderr = os.dup(2)  # the profiler's C++ side prints a line at start and stop on fd 2
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                fn()
    finally:
        os.dup2(stderr, 2)
        os.close(stderr)
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")
    )
    live = peak = 0
    for _, nbytes in events:  # allocations are positive, frees negative
        live += nbytes
        peak = max(peak, live)
    return peak


def median_ms(fn, device, repeat):
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(1e3 * (time.perf_counter() - t))
    return statistics.median(times)


def measure_memory(pixel_counts, data, args, device):
    """Per loss and path (fused upsample, interpolate + loss), on the first training batch of
    ``args.batch_size`` images: the peak extra memory and the median time of the loss's
    forward+backward (from the 1/4-resolution logits to their gradient, with the training
    step's ``confusion=``), and the median time of a whole training step. Also the largest
    difference between the two paths' losses and gradients."""
    C = len(CLASSES)
    xtr, ytr = data["train"]
    x, y = xtr[: args.batch_size], ytr[: args.batch_size]
    torch.manual_seed(args.seed)
    model = FCN(C, args.width).to(device)
    with torch.no_grad():
        low_res = model(x)  # the head's logits for this batch
    paths = {
        "interpolate": argparse.Namespace(**{**vars(args), "interpolate": True}),
        "fused": argparse.Namespace(**{**vars(args), "interpolate": False}),
    }
    rows = {}
    for name in make_losses(pixel_counts, C, args):
        row = {}
        for path, pargs in paths.items():
            criterion = make_losses(pixel_counts, C, pargs)[name]()
            if isinstance(criterion, nn.Module):
                criterion = criterion.to(device)
            leaf = low_res.detach().requires_grad_(True)
            cm = torch.zeros(C, C, dtype=torch.int64, device=device)

            def loss_fwd_bwd():
                loss = criterion(loss_input(leaf, y, pargs), y, confusion=cm)
                loss.backward()
                return loss.detach()

            value = loss_fwd_bwd()
            row[path] = {"loss": value.item(), "grad": leaf.grad, "confusion": cm.clone()}
            # Measured from the low-resolution logits alone: their gradient is allocated inside.
            leaf.grad = None
            row[path]["peak_bytes"] = peak_extra_bytes(loss_fwd_bwd, device)
            row[path]["loss_ms"] = median_ms(loss_fwd_bwd, device, args.repeat)
            torch.manual_seed(args.seed)
            step_model = FCN(C, args.width).to(device)
            opt = torch.optim.Adam(step_model.parameters(), lr=args.lr)
            row[path]["step_ms"] = median_ms(
                lambda: train_step(step_model, criterion, opt, x, y, cm, pargs), device, args.repeat
            )
        fused, interp = row["fused"], row["interpolate"]
        row["max_loss_diff"] = abs(fused["loss"] - interp["loss"])
        row["max_grad_diff"] = float((fused.pop("grad") - interp.pop("grad")).abs().max())
        row["same_confusion"] = bool(torch.equal(fused.pop("confusion"), interp.pop("confusion")))
        rows[name] = row
    return rows


def memory_markdown(rows, args, command, device, device_name, shape):
    B, C, h, w = shape
    lines = [
        "# Synthetic segmentation: memory and time of the loss, fused upsample vs interpolate + loss",
        "",
        f"Command: `{command}`  ",
        f"On {device_name}; torch {torch.__version__}, backend of the loss: "
        f"{F_fi.resolve_backend(None, torch.empty(0, device=device))}.  ",
        f"One training batch: logits {B}x{C}x{h}x{w} float32 (the head's, 1/4 resolution), labels "
        f"{B}x{4 * h}x{4 * w}; FCN width {args.width}. *interpolate*: `F.interpolate(bilinear)` to "
        f"{4 * h}x{4 * w}, then the loss module; *fused*: the loss module built with "
        f'`upsample="bilinear"` on the 16x16 logits.  ',
        "*Peak extra*: the peak memory allocated during the loss's forward+backward (from the 1/4-resolution "
        "logits to their gradient, with the training step's `confusion=`) beyond what was allocated before "
        "it"
        + (
            " (CUDA allocator statistics)."
            if device.type == "cuda"
            else " (profiler allocation events, `profile_memory=True`, which include the C++ ops' "
            "own allocations)."
        )
        + "  ",
        f"*Loss ms*: median of {args.repeat} such forward+backward calls; *step ms*: median of {args.repeat} whole "
        "training steps (net forward, loss, backward, Adam step). Times are from a shared machine: noisy.  ",
        "*max diff*: the largest absolute difference between the two paths' loss values and gradients "
        "(with respect to the 1/4-resolution logits); *confusion*: whether the counts of the loss's pass agree.",
        "",
        "| loss | peak extra KiB interpolate | peak extra KiB fused | saved | loss ms interpolate | loss ms fused "
        "| step ms interpolate | step ms fused | max diff loss / grad | confusion |",
        "|---|" + "---|" * 9,
    ]
    for name, r in rows.items():
        i, f = r["interpolate"], r["fused"]
        saved = 1 - f["peak_bytes"] / i["peak_bytes"] if i["peak_bytes"] else float("nan")
        lines.append(
            f"| {name} | {i['peak_bytes'] / 1024:.1f} | {f['peak_bytes'] / 1024:.1f} | {100 * saved:.0f} % "
            f"| {i['loss_ms']:.2f} | {f['loss_ms']:.2f} | {i['step_ms']:.1f} | {f['step_ms']:.1f} "
            f"| {r['max_loss_diff']:.1e} / {r['max_grad_diff']:.1e} | {'same' if r['same_confusion'] else 'differ'} |"
        )
    return "\n".join(lines) + "\n"


def markdown(results, pixel_counts, args, wall_s, command, device_name):
    C = len(CLASSES)
    total = sum(pixel_counts)
    lines = [
        "# Synthetic segmentation: validation IoU per class and loss",
        "",
        f"Command: `{command}`  ",
        f"Wall time: {wall_s:.0f} s on {device_name}; torch {torch.__version__}.  ",
        f"{args.n_train} training and {args.n_val} validation images of 64x64, {C} classes; FCN width "
        f"{args.width}, logits at 16x16, {path_description(args)}; Adam lr {args.lr:g}, "
        f"batch {args.batch_size}, {args.epochs} epochs, seed {args.seed}; CB β = {args.beta:g}.  ",
        "Training pixels per class: "
        + ", ".join(f"{CLASSES[c]} {100 * pixel_counts[c] / total:.2f} %" for c in range(C))
        + ".",
        "",
        "IoU in % on the validation set after the last epoch; *train mIoU* is that of the last epoch, "
        "from the confusion counts of the loss's own pass.",
        "",
        "| loss | " + " | ".join(CLASSES) + " | val mIoU | train mIoU |",
        "|---|" + "---|" * (C + 2),
    ]
    for name, h in results.items():
        lines.append(
            f"| {name} | "
            + " | ".join(f"{100 * v:.1f}" for v in h["val_iou"][-1])
            + f" | {100 * h['val_miou']:.1f} | {100 * h['train_miou'][-1]:.1f} |"
        )
    return "\n".join(lines) + "\n"


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(results)
    cols = 3
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(4.2 * cols, 3.2 * rows), sharex=True, sharey=True, squeeze=False
    )
    for ax, (name, h) in zip(axes.flat, results.items()):
        iou = torch.tensor(h["val_iou"])  # (epochs, C)
        epochs = range(1, iou.shape[0] + 1)
        for c, cname in enumerate(CLASSES):
            ax.plot(epochs, 100 * iou[:, c], marker="o", markersize=2, label=cname, color=f"C{c}")
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("epoch")
    for ax in axes[:, 0]:
        ax.set_ylabel("validation IoU (%)")
    fig.legend(*axes.flat[0].get_legend_handles_labels(), loc="lower center", ncol=len(CLASSES), fontsize=8)
    fig.suptitle("Synthetic segmentation: per-class validation IoU over the epochs")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--n-train", type=int, default=192)
    p.add_argument("--n-val", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--width", type=int, default=16, help="channels of the first stride (doubled later)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument(
        "--beta",
        type=float,
        default=0.99999,
        help="class-balanced β (pixel counts are large: 0.9999 would saturate above ~10^4 pixels)",
    )
    p.add_argument("--alpha", type=float, default=1.0, help="outlying-label α")
    p.add_argument("--seed", type=int, default=0, help="data and model seed")
    add_run_options(p)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument(
        "--interpolate",
        action="store_true",
        help="F.interpolate the logits to the label size before the loss instead of the losses' "
        "fused upsample='bilinear' (for comparison: same result, more memory)",
    )
    p.add_argument(
        "--memory",
        action="store_true",
        help="train nothing: measure the memory and time of the loss on one batch, fused upsample "
        "vs interpolate + loss, and write segmentation_memory.md",
    )
    p.add_argument("--repeat", type=int, default=10, help="--memory: timed repetitions (median)")
    p.add_argument(
        "--smoke", action="store_true", help="tiny budget (2 epochs of 16 images): checks that it runs"
    )
    args = p.parse_args(argv)
    if args.smoke:
        args.epochs, args.n_train, args.n_val, args.batch_size, args.width = 2, 16, 8, 8, 8
    return args


def main(argv=None):
    args = parse_args(argv)
    device = start(args)
    device_name = describe_device(device)
    t0 = time.perf_counter()
    C = len(CLASSES)
    xtr, ytr = synthetic_segmentation(args.n_train, seed=args.seed)
    xva, yva = synthetic_segmentation(args.n_val, seed=args.seed + 1000)
    pixel_counts = torch.bincount(ytr.flatten(), minlength=C).tolist()
    data = {"train": (xtr.to(device), ytr.to(device)), "val": (xva.to(device), yva.to(device))}
    print(
        "training pixels per class: " + ", ".join(f"{n}: {k}" for n, k in zip(CLASSES, pixel_counts)),
        flush=True,
    )
    command = (
        "python examples/segmentation.py " + " ".join(argv if argv is not None else sys.argv[1:])
    ).strip()
    output_folder(args, "segmentation")

    if args.memory:
        rows = measure_memory(pixel_counts, data, args, device)
        n = min(args.batch_size, ytr.shape[0])
        md = memory_markdown(
            rows, args, command, device, device_name, (n, C, ytr.shape[1] // 4, ytr.shape[2] // 4)
        )
        with open(os.path.join(args.out, "segmentation_memory.md"), "w") as f:
            f.write(md)
        print(md)
        return rows

    results = {
        name: train_one(name, make(), data, args, device)
        for name, make in make_losses(pixel_counts, C, args).items()
    }

    wall_s = time.perf_counter() - t0
    md = markdown(results, pixel_counts, args, wall_s, command, device_name)
    with open(os.path.join(args.out, "segmentation.md"), "w") as f:
        f.write(md)
    with open(os.path.join(args.out, "segmentation.json"), "w") as f:
        json.dump(
            {
                "classes": CLASSES,
                "pixel_counts": pixel_counts,
                "results": results,
                "wall_s": wall_s,
                "command": command,
                "path": "interpolate" if args.interpolate else "fused upsample",
            },
            f,
            indent=1,
        )
    if not args.no_plot:
        plot(results, os.path.join(args.out, "segmentation.png"))
    print(md)
    return results


if __name__ == "__main__":
    main()
