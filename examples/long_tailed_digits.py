"""Long-tailed handwritten digits: what each imbalance loss does to the rare classes.

scikit-learn's digits (1797 8x8 images, 10 classes, shipped with scikit-learn: no download) are
split, with a fixed seed, into a balanced test set, a balanced validation set and a long-tailed
training set built as the class-balanced paper builds long-tailed CIFAR: class c keeps
n_c = n_max * ratio^(-c / (C - 1)) images, so class 0 has n_max and class 9 has n_max / ratio.
A small MLP is trained with each loss, over a few seeds (model initialisation and batch order;
the split stays the same), and evaluated on the balanced test set: per-class recall, overall
accuracy and the mean accuracy of the rarest third of the classes, as mean ± std over seeds.

    python examples/long_tailed_digits.py                 # the committed results (a few minutes)
    python examples/long_tailed_digits.py --smoke           # seconds: checks that it runs

Writes ``long_tailed_digits.md`` (Markdown tables), ``long_tailed_digits.json`` (the numbers) and
``long_tailed_digits.png`` (test recall of each class against its training count, one line per
loss) into ``--out`` (default: examples/results/; with ``--smoke``, a new temporary folder).
"""

import argparse
import json
import math
import os
import sys
import time

import torch
from torch import nn

import fused_imbalance as fi
import fused_imbalance.functional as F_fi
from _common import add_run_options, describe_device, output_folder, start  # examples/_common.py


def long_tailed_split(X, y, num_classes, n_max, ratio, n_test, n_val, seed):
    """Balanced test and validation sets, and an exponentially long-tailed training set.

    Per class, the images are shuffled with ``seed``; the first ``n_test`` go to the test set, the
    next ``n_val`` to the validation set and the first n_c of the rest to the training set.
    """
    g = torch.Generator().manual_seed(seed)
    counts = [int(n_max * ratio ** (-c / (num_classes - 1))) for c in range(num_classes)]
    parts = {"train": [], "val": [], "test": []}
    for c in range(num_classes):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        if idx.numel() < n_test + n_val + counts[c]:
            raise ValueError(f"class {c} has {idx.numel()} images: too few for this split")
        parts["test"].append(idx[:n_test])
        parts["val"].append(idx[n_test : n_test + n_val])
        parts["train"].append(idx[n_test + n_val : n_test + n_val + counts[c]])
    return {k: (X[torch.cat(v)], y[torch.cat(v)]) for k, v in parts.items()}, counts


class MLP(nn.Sequential):
    def __init__(self, num_classes, hidden=128):
        super().__init__(
            nn.Flatten(),
            nn.Linear(64, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )


def make_losses(counts, num_classes, args):
    """name -> (a function that builds a fresh criterion(logits, target), sigmoid-based?)."""
    C = num_classes
    return {
        "cross-entropy": (lambda: F_fi.cross_entropy, False),
        "focal (γ=2)": (lambda: fi.FocalLoss(gamma=2.0), False),
        "CB softmax": (lambda: fi.ClassBalancedLoss(counts, beta=args.beta, loss_type="softmax"), False),
        "CB sigmoid": (lambda: fi.ClassBalancedLoss(counts, beta=args.beta, loss_type="sigmoid"), True),
        "CB focal (γ=2)": (
            lambda: fi.ClassBalancedLoss(counts, beta=args.beta, loss_type="focal", gamma=2.0),
            True,
        ),
        "recall": (lambda: fi.RecallLoss(C), False),
        "CDB (τ dynamic)": (lambda: fi.CDBLoss(C, tau="dynamic"), False),
        f"MSE outlying (α={args.alpha:g})": (lambda: fi.OutlyingMSELoss(counts, alpha=args.alpha), False),
    }


def evaluate(model, X, y, num_classes):
    cm = fi.ConfusionMatrix(num_classes).to(X.device)
    with torch.no_grad():
        cm.update(model(X), y)
    return cm


def train_one(criterion, sigmoid, data, counts, args, seed, device):
    C = len(counts)
    torch.manual_seed(seed)
    model = MLP(C).to(device)
    if sigmoid:
        # The class-balanced paper starts sigmoid-based losses from a prior π = 1/C on every class
        # (bias b = −log((1 − π)/π)), so the first steps are not dominated by C − 1 negatives.
        nn.init.constant_(model[-1].bias, -math.log(C - 1))
    if isinstance(criterion, nn.Module):
        criterion = criterion.to(device)
    # AdamW: decoupled weight decay. With Adam's L2 term instead, a class whose loss weight reaches 0
    # (recall loss on a memorised batch, CDB on a class the validation set finds perfect) is left with
    # the decay gradient alone, which Adam rescales into full-size steps that shrink the model.
    optimizer = torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.Adam
    opt = optimizer(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    Xtr, ytr = data["train"]
    g = torch.Generator().manual_seed(seed)
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(ytr.numel(), generator=g).to(device)
        for i in range(0, ytr.numel(), args.batch_size):
            b = perm[i : i + args.batch_size]
            loss = criterion(model(Xtr[b]), ytr[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if isinstance(criterion, fi.CDBLoss):
            # CDB: class difficulty = 1 − accuracy on the validation set, measured after each epoch.
            model.eval()
            criterion.update_from_confusion(evaluate(model, *data["val"], C))
    model.eval()
    cm = evaluate(model, *data["test"], C)
    return {"recall": cm.recall().cpu().tolist(), "accuracy": float(cm.accuracy())}


def mean_std(values):
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std(unbiased=True)) if t.numel() > 1 else 0.0


def summarise(runs, counts):
    """runs: name -> list of per-seed results. Adds mean ± std of accuracy, rare-third accuracy and
    per-class recall."""
    C = len(counts)
    rare = sorted(range(C), key=lambda c: counts[c])[: max(1, round(C / 3))]
    out = {}
    for name, rs in runs.items():
        rare_acc = [sum(r["recall"][c] for c in rare) / len(rare) for r in rs]
        out[name] = {
            "accuracy": mean_std([r["accuracy"] for r in rs]),
            "rare_third": mean_std(rare_acc),
            "recall": [mean_std([r["recall"][c] for r in rs]) for c in range(C)],
        }
    return out, rare


def pm(ms, scale=100.0, digits=1):
    return f"{ms[0] * scale:.{digits}f} ± {ms[1] * scale:.{digits}f}"


def markdown(summary, counts, rare, args, seeds, wall_s, command, device):
    C = len(counts)
    lines = [
        "# Long-tailed digits: test accuracy per loss",
        "",
        f"Command: `{command}`  ",
        f"Wall time: {wall_s:.0f} s on {describe_device(device)}; torch {torch.__version__}.  ",
        f"Training counts per class (digit 0 … {C - 1}): {counts} (imbalance 1:{args.imbalance:g}); "
        f"balanced test set: {args.n_test} per class; validation (CDB only): {args.n_val} per class.  ",
        f"MLP 64-128-128-{C}, {'AdamW' if args.optimizer == 'adamw' else 'Adam'} lr {args.lr:g}, "
        f"weight decay {args.weight_decay:g}, batch {args.batch_size}, "
        f"{args.epochs} epochs; CB β = {args.beta:g}; seeds {seeds}. Mean ± std over seeds, in %.",
        "",
        f"| loss | accuracy | rarest third (digits {', '.join(map(str, sorted(rare)))}) |",
        "|---|---|---|",
    ]
    for name, s in summary.items():
        lines.append(f"| {name} | {pm(s['accuracy'])} | {pm(s['rare_third'])} |")
    lines += [
        "",
        "Per-class test recall (%), mean ± std over seeds:",
        "",
        "| loss | " + " | ".join(f"{c} (n={counts[c]})" for c in range(C)) + " |",
        "|---|" + "---|" * C,
    ]
    for name, s in summary.items():
        lines.append(f"| {name} | " + " | ".join(pm(r, digits=0) for r in s["recall"]) + " |")
    return "\n".join(lines) + "\n"


def plot(summary, counts, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = sorted(range(len(counts)), key=lambda c: counts[c])
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for i, (name, s) in enumerate(summary.items()):
        style = "-" if i < 7 else "--"
        ax.plot(
            [counts[c] for c in order],
            [100 * s["recall"][c][0] for c in order],
            style,
            marker="o",
            markersize=3,
            label=name,
            color=f"C{i}",
        )
    ax.set_xscale("log")
    ax.set_xlabel("training images of the class (log scale)")
    ax.set_ylabel("test recall of the class (%), mean over seeds")
    ax.set_title("Long-tailed digits: recall per class against its training count")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=5, help="number of seeds (model init and batch order)")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--optimizer", choices=["adamw", "adam"], default="adamw")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--imbalance", type=float, default=50.0, help="largest / smallest training class")
    p.add_argument("--n-max", type=int, default=100, help="training images of the largest class")
    p.add_argument("--n-test", type=int, default=50, help="test images per class (balanced)")
    p.add_argument("--n-val", type=int, default=20, help="validation images per class (CDB's accuracy)")
    p.add_argument("--beta", type=float, default=0.9999, help="class-balanced β")
    p.add_argument("--alpha", type=float, default=1.0, help="outlying-label α")
    p.add_argument("--split-seed", type=int, default=0)
    add_run_options(p)
    p.add_argument(
        "--smoke", action="store_true", help="tiny budget (2 seeds, 2 epochs): checks that it runs"
    )
    args = p.parse_args(argv)
    if args.smoke:
        args.seeds, args.epochs = 2, 2
    return args


def main(argv=None):
    args = parse_args(argv)
    device = start(args)
    from sklearn.datasets import load_digits

    t0 = time.perf_counter()
    digits = load_digits()
    X = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    C = 10
    data, counts = long_tailed_split(
        X, y, C, args.n_max, args.imbalance, args.n_test, args.n_val, args.split_seed
    )
    data = {k: (a.to(device), b.to(device)) for k, (a, b) in data.items()}
    print(f"training counts per class: {counts}; device {device}", flush=True)

    seeds = list(range(args.seeds))
    runs = {}
    for name, (make, sigmoid) in make_losses(counts, C, args).items():
        runs[name] = [train_one(make(), sigmoid, data, counts, args, seed, device) for seed in seeds]
        accs = [r["accuracy"] for r in runs[name]]
        print(f"{name:24s} test accuracy {100 * sum(accs) / len(accs):5.1f} %", flush=True)

    summary, rare = summarise(runs, counts)
    wall_s = time.perf_counter() - t0
    command = "python examples/long_tailed_digits.py " + " ".join(argv if argv is not None else sys.argv[1:])
    output_folder(args, "long_tailed_digits")
    md = markdown(summary, counts, rare, args, seeds, wall_s, command.strip(), device)
    with open(os.path.join(args.out, "long_tailed_digits.md"), "w") as f:
        f.write(md)
    with open(os.path.join(args.out, "long_tailed_digits.json"), "w") as f:
        json.dump(
            {
                "counts": counts,
                "rarest_third": rare,
                "seeds": seeds,
                "summary": summary,
                "runs": runs,
                "wall_s": wall_s,
                "command": command.strip(),
            },
            f,
            indent=1,
        )
    if not args.no_plot:
        plot(summary, counts, os.path.join(args.out, "long_tailed_digits.png"))
    print(md)
    return summary


if __name__ == "__main__":
    main()
