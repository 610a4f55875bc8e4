"""What the benchmark runs: losses, shapes, inputs, providers and the byte floor.

Shared by the command-line harness (``bench.py``) and the pytest-benchmark suite
(``test_bench.py``), so both time exactly the same calls.
"""

import collections
import dataclasses
import functools
import itertools
import warnings

import torch

LOSSES = (
    "cross_entropy",
    "focal_loss",
    "sigmoid_focal_loss",
    "class_balanced_loss",
    "recall_loss",
    "cdb_loss",
    "mse_outlying_loss",
    "ohem_cross_entropy",
    "confusion_matrix",
    "dice_loss",
    "dice_ce_loss",
)
DICE = ("dice_loss", "dice_ce_loss")
PROVIDERS = ("eager", "compile", "fused", "liger", "monai", "monai_compile")
# Other libraries' kernels for a few losses, timed beside the package's where they are installed:
# Liger-Kernel's cross-entropy; MONAI's DiceLoss / DiceCELoss(softmax=True, to_onehot_y=True), eager
# and under torch.compile (what a MONAI user runs today).
OTHER_PROVIDERS = {"liger": ("cross_entropy",), "monai": DICE, "monai_compile": DICE}
OWN_PROVIDERS = tuple(p for p in PROVIDERS if p not in OTHER_PROVIDERS)  # the package's: every loss
PASSES = ("fwd", "bwd", "fwd+bwd")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LABEL_DTYPES = {"int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "uint8": torch.uint8}
CONTIGUOUS, CHANNELS_LAST = "contiguous", "channels_last"

IGNORE_INDEX = -100
IGNORED_FRACTION = 0.05  # a few ignored pixels, as in real label maps (void / boundary)
IMBALANCE = 100.0  # head/tail count ratio of the synthetic long-tailed class counts


def has_backward(loss):
    return loss != "confusion_matrix"


# --------------------------------------------------------------------------- shapes


@dataclasses.dataclass(frozen=True)
class Shape:
    """One logits shape of a preset, with the dtypes, layouts, passes and losses it is run with.

    ``family`` groups shapes that differ only in size (the plots are drawn along a family).
    """

    family: str
    dims: tuple
    dtypes: tuple = ("float32", "bfloat16")
    layouts: tuple = (CONTIGUOUS, CHANNELS_LAST)
    passes: tuple = PASSES
    losses: tuple = LOSSES

    @property
    def name(self):
        return "x".join(str(d) for d in self.dims)

    @property
    def num_classes(self):
        return self.dims[1]

    @property
    def pixels(self):
        n = self.dims[0]
        for d in self.dims[2:]:
            n *= d
        return n

    @property
    def numel(self):
        return self.pixels * self.num_classes


BOTH = ("float32", "bfloat16")
F32 = ("float32",)
CONT = (CONTIGUOUS,)
CL = (CHANNELS_LAST,)
ALL = (CONTIGUOUS, CHANNELS_LAST)
FWD_BWD = ("fwd+bwd",)
# The default grids run the other families with these three: the drop-in, the loss with the
# most work per logit, and a loss with dynamic (per-batch) weights.
SOME = ("cross_entropy", "sigmoid_focal_loss", "recall_loss")

# Segmentation B×19×H×W (Cityscapes), ADE20K-like C=150, a 3-D volume B×C×D×H×W and
# long-tailed classification N×8142 (iNaturalist 2018). The "seg" family is the size sweep.
PRESETS = {
    ("cuda", "quick"): (Shape("seg", (4, 19, 512, 1024), F32, CONT),),
    # Every loss at Cityscapes size (8 crops of 512×1024) and ADE20K size (16 crops of 512×512),
    # float32 and bfloat16, NCHW and channels_last; the other families for three losses. Every
    # case compiles anew: most of the time is there (split a run with --loss and --append).
    ("cuda", "default"): (
        Shape("seg", (8, 19, 512, 1024), BOTH, ALL),
        Shape("ade", (16, 150, 512, 512), BOTH, ALL),
        Shape("volume", (2, 14, 128, 128, 128), F32, CONT, losses=SOME + DICE),
        Shape("cls", (8192, 8142), BOTH, CONT, losses=SOME),
    ),
    ("cuda", "full"): (
        Shape("seg", (1, 19, 512, 1024), BOTH, CONT),
        Shape("seg", (4, 19, 512, 1024), BOTH, ALL),
        Shape("seg", (8, 19, 1024, 1024), BOTH, CONT),
        Shape("seg", (16, 19, 1024, 2048), BOTH, CONT),
        Shape("ade", (8, 150, 512, 512), BOTH, ALL),
        Shape("volume", (2, 14, 128, 128, 128), BOTH, ALL),
        Shape("cls", (8192, 8142), BOTH, CONT),
    ),
    ("cpu", "quick"): (
        Shape("seg", (1, 19, 64, 128), F32, CONT),
        Shape("seg", (2, 19, 128, 256), F32, CONT),
    ),
    # A few minutes on 2 cores (torch.compile of every case is most of it); the 4×19×256×512
    # float32 case is the CPU target of the fused kernels, timed for the training step.
    ("cpu", "default"): (
        Shape("seg", (2, 19, 128, 256), BOTH, CONT),
        Shape("seg", (2, 19, 128, 256), F32, CL),
        Shape("seg", (4, 19, 256, 512), F32, CONT, FWD_BWD),
        Shape("ade", (1, 150, 64, 128), F32, CONT, losses=SOME),
        Shape("volume", (1, 8, 32, 64, 64), F32, CONT, losses=SOME),
        Shape("volume", (2, 14, 48, 64, 64), F32, CONT, FWD_BWD, losses=DICE),  # the Dice family's volume
        Shape("cls", (128, 8142), F32, CONT, losses=SOME),
    ),
    ("cpu", "full"): (
        Shape("seg", (1, 19, 64, 128), F32, CONT),
        Shape("seg", (2, 19, 128, 256), BOTH, ALL),
        Shape("seg", (4, 19, 256, 512), BOTH, ALL, FWD_BWD),
        Shape("ade", (1, 150, 64, 128), BOTH, ALL),
        Shape("volume", (1, 8, 32, 64, 64), BOTH, ALL),
        Shape("cls", (128, 8142), BOTH, CONT),
    ),
}


# --------------------------------------------------------------------------- plans


@dataclasses.dataclass(frozen=True)
class Group:
    """One step of a plan (``--plan``): its cases, in order, and what runs on them.

    ``providers`` are timed; the eager reference also runs once, untimed, when it is not among
    them, for the check (its rows are not written). ``busy``: the providers whose training step
    is also profiled for its kernels' busy time (``measure.kernel_profile``). ``by_loss``: the
    cases loss by loss (each loss on every shape) instead of shape by shape; ``limit``: the first
    cases only. ``as_time_allows``: a group that runs until its stage's time budget stops it
    (the warm-up, benchmarks/warmup.py, compiles its kernels after those of the next stage).
    """

    name: str
    shapes: tuple
    providers: tuple
    busy: tuple = ("fused",)
    by_loss: bool = False
    limit: int | None = None
    as_time_allows: bool = False

    def cases(self, losses=LOSSES):
        cases = grid(self.shapes, losses)
        if self.by_loss:
            cases.sort(key=lambda c: LOSSES.index(c.loss))  # stable: the shapes keep their order
        return cases[: self.limit]


STEP = ("fwd", "fwd+bwd")
NCHW_CONFIGS = (
    ("float32", CONTIGUOUS),
    ("bfloat16", CONTIGUOUS),
    ("float32", CHANNELS_LAST),
    ("bfloat16", CHANNELS_LAST),
)


def session_plan(
    city,
    ade,
    rows,
    losses=LOSSES,
    first_losses=LOSSES,
    few=SOME,
    city_configs=NCHW_CONFIGS[1:],
    ade_configs=NCHW_CONFIGS,
    rows_dtypes=BOTH,
    compile_limit=None,
):
    """The GPU session's benchmark (scripts/gpu_session.sh), most important first, so that what a
    time budget cuts is what matters least: ``first_losses`` at Cityscapes size ``city`` (float32
    NCHW) against eager and torch.compile, forward and training step; the other ``city_configs``
    (dtype, layout) against eager; ADE20K size ``ade`` in ``ade_configs``; the (N, C) ``rows``
    (``few`` losses, ``rows_dtypes``) beside Liger-Kernel; then torch.compile of all these, loss by
    loss, while time remains. A loss added to LOSSES (with its arguments in ``loss_kwargs``) joins
    every group but the rows."""

    def shapes(family, dims, configs, which):
        return tuple(Shape(family, dims, (d,), (lay,), FWD_BWD, which) for d, lay in configs)

    city_more = shapes("seg", city, city_configs, losses)
    ade_shapes = shapes("ade", ade, ade_configs, losses)
    rows_shapes = (Shape("cls", rows, rows_dtypes, CONT, FWD_BWD, few),)
    return (
        Group(
            "city",
            (Shape("seg", city, F32, CONT, STEP, first_losses),),
            ("eager", "fused", "compile"),
            busy=("fused", "compile"),
        ),
        Group("city-bf16-cl", city_more, ("eager", "fused")),
        Group("ade", ade_shapes, ("eager", "fused")),
        Group("rows", rows_shapes, ("eager", "fused", "liger")),
        Group(
            "compile",
            city_more + ade_shapes + rows_shapes,
            ("compile",),
            busy=("compile",),
            by_loss=True,
            limit=compile_limit,
            as_time_allows=True,
        ),
    )


# ``session``: the GPU run. ``session-dry``: its rehearsal on a CPU (GPU_SESSION_DRY=1): the same
# groups on tiny shapes with the Triton kernels interpreted, a case or two per group (a forward-only
# loss, a 16-bit channels_last case, 150 classes, rows of 1000). It checks the script, its
# arguments and its outputs, not the numbers.
PLANS = {
    "session": session_plan((8, 19, 512, 1024), (16, 150, 512, 512), (8192, 8142)),
    "session-dry": session_plan(
        (1, 19, 8, 16),
        (1, 150, 4, 8),
        (4, 1000),
        losses=("cross_entropy",),
        first_losses=("cross_entropy", "confusion_matrix"),
        few=("cross_entropy",),
        city_configs=NCHW_CONFIGS[3:],
        ade_configs=NCHW_CONFIGS[:1],
        rows_dtypes=F32,
        compile_limit=1,
    ),
}


def parse_shape(text, dtypes=BOTH):
    """A ``--shape`` value given as dims, e.g. "4x19x256x512" (family inferred from C and rank)."""
    dims = tuple(int(d) for d in text.lower().replace(",", "x").split("x") if d)
    if len(dims) < 2 or any(d < 0 for d in dims):
        raise ValueError(f"a shape is (N, C) or (B, C, d1, ..., dk), got {text!r}")
    if len(dims) == 2:
        family = "cls"
    elif len(dims) == 5:
        family = "volume"
    else:
        family = "seg" if dims[1] < 100 else "ade"
    return Shape(family, dims, tuple(dtypes), ALL)


@dataclasses.dataclass(frozen=True)
class Case:
    loss: str
    shape: Shape
    dtype: str
    layout: str

    @property
    def passes(self):
        if not has_backward(self.loss):
            return ("fwd",)
        return self.shape.passes

    @property
    def key(self):
        return (self.loss, self.shape.name, self.dtype, self.layout)


def layouts_of(shape):
    """(N, C) rows have one layout; channels_last exists for 4-D and 5-D logits only."""
    if len(shape.dims) in (4, 5):
        return shape.layouts
    return (CONTIGUOUS,)


def grid(shapes, losses=LOSSES, dtypes=None, layouts=None):
    """Every (loss, shape, dtype, layout) of ``shapes`` that passes the filters."""
    cases = []
    for shape, loss in itertools.product(shapes, losses):
        if loss not in shape.losses:
            continue
        for dtype in shape.dtypes:
            if dtypes is not None and dtype not in dtypes:
                continue
            for layout in layouts_of(shape):
                if layouts is not None and layout not in layouts:
                    continue
                cases.append(Case(loss, shape, dtype, layout))
    # Run shape by shape, smallest first, so a run cut short still has a full small table.
    order = {s: i for i, s in enumerate(shapes)}
    return sorted(
        cases,
        key=lambda c: (
            order.get(c.shape, 0),
            c.dtype != "float32",
            c.layout != CONTIGUOUS,
            LOSSES.index(c.loss),
        ),
    )


# --------------------------------------------------------------------------- inputs


def long_tailed_counts(num_classes):
    """Synthetic per-class sample counts falling geometrically from 10^5 by a factor IMBALANCE."""
    r = torch.arange(num_classes, dtype=torch.float64) / max(num_classes - 1, 1)
    return (1e5 * IMBALANCE**-r).round()


def loss_kwargs(loss, num_classes, device):
    """The loss's own arguments (the same for every provider) at their paper defaults.

    Counts and accuracies are host-side data (as a user holds them); the outlying labels are a
    per-class tensor on the logits' device, as the functional API requires.
    """
    from fused_imbalance import weights

    counts = long_tailed_counts(num_classes)
    if loss in ("focal_loss", "sigmoid_focal_loss"):
        return dict(gamma=2.0)
    if loss == "class_balanced_loss":
        return dict(samples_per_class=counts, beta=0.9999, loss_type="softmax")
    if loss == "cdb_loss":
        # Head classes accurate, tail classes not: accuracies 0.95 → 0.30 along the count order.
        return dict(
            class_accuracy=torch.linspace(0.95, 0.30, num_classes, dtype=torch.float64), tau="dynamic"
        )
    if loss == "mse_outlying_loss":
        return dict(outlying=weights.outlying_labels(counts, alpha=1.0).to(device))
    if loss == "ohem_cross_entropy":
        return dict(thresh=0.7, min_kept=100000)  # HRNet's OhemCrossEntropy defaults
    return {}


def hrnet_ohem_cross_entropy(
    score,
    target,
    thresh=0.7,
    min_kept=100000,
    ignore_index=-100,
    weight=None,
    upsample="bilinear",
    align_corners=False,
):
    """The eager OHEM cross-entropy users have: HRNet-Semantic-Segmentation's ``OhemCrossEntropy``
    (``lib/core/criterion.py``, ``_ohem_forward``, as transcribed in tests/test_ohem_reference.py):
    interpolate the logits to the labels' size when they differ, softmax, gather the label's
    probability, sort the valid ones, keep those below max(the min_kept-th, thresh), mean of their
    cross-entropy. 16-bit logits are computed in float32, as under autocast (its softmax and
    cross-entropy run in float32); (N, C) rows and volumes take the same formula. The eager and
    compile providers of ``ohem_cross_entropy`` (``make_provider``)."""
    import torch.nn.functional as F

    if score.dtype in (torch.float16, torch.bfloat16):
        score = score.float()
    min_kept = max(1, min_kept)
    if score.dim() == 4 and tuple(score.shape[2:]) != tuple(target.shape[1:]):
        score = F.interpolate(
            input=score,
            size=tuple(target.shape[1:]),
            mode=upsample,
            align_corners=None if upsample == "nearest" else align_corners,
        )
    pred = F.softmax(score, dim=1)
    pixel_losses = (
        F.cross_entropy(score, target, weight=weight, ignore_index=ignore_index, reduction="none")
        .contiguous()
        .view(-1)
    )
    mask = target.contiguous().view(-1) != ignore_index

    tmp_target = target.clone()
    tmp_target[tmp_target == ignore_index] = 0
    pred = pred.gather(1, tmp_target.unsqueeze(1))
    pred, ind = (
        pred.contiguous()
        .view(
            -1,
        )[mask]
        .contiguous()
        .sort()
    )
    min_value = pred[min(min_kept, pred.numel() - 1)]
    threshold = max(min_value, thresh)

    pixel_losses = pixel_losses[mask][ind]
    pixel_losses = pixel_losses[pred < threshold]
    return pixel_losses.mean()


def make_inputs(case, device, label_dtype="int64", seed=0):
    """(logits, target): logits N(0, 2²) in the case's dtype and layout, uniform labels with a
    fraction IGNORED_FRACTION set to ``ignore_index`` (255 for uint8 labels, else -100); none for the
    Dice family, which MONAI's DiceCELoss (no ``ignore_index``) runs on too.

    The logits are a fresh tensor on every call (callers set ``requires_grad`` on them, and Liger
    writes into its input); the labels are shared between calls for the same shape (no provider
    writes into them)."""
    x, t = _base_inputs(case.shape.dims, device, label_dtype, seed, case.loss not in DICE)
    x = x.to(DTYPES[case.dtype], copy=True)  # float32 -> 16 bits rounds to nearest even on every device
    if case.layout == CHANNELS_LAST:
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x, t


_BASE = collections.OrderedDict()
_BASE_SHAPES = 3  # a session plan's three shapes (its last group revisits them loss by loss)


def _base_inputs(dims, device, label_dtype, seed, ignore=True):
    """float32 logits and labels drawn on the CPU (the same values on every device), kept for the
    last few shapes: a run measures every loss, dtype and layout of a shape in a row, and drawing
    16×150×512×512 normals takes seconds of one core, moving them to a GPU another second.
    ``ignore``: a fraction IGNORED_FRACTION of the labels is ``ignore_index``."""
    key = (tuple(dims), str(device), label_dtype, seed, ignore)
    if key in _BASE:
        _BASE.move_to_end(key)
        return _BASE[key]
    while len(_BASE) >= _BASE_SHAPES:
        _BASE.popitem(last=False)  # free the oldest first (2.5 GB at ADE20K size)
    g = torch.Generator().manual_seed(seed)
    C = dims[1]
    x = 2.0 * torch.randn(dims, generator=g)
    tdims = (dims[0],) + tuple(dims[2:])
    t = torch.randint(0, C, tdims, generator=g)
    ignored = torch.rand(tdims, generator=g) < (IGNORED_FRACTION if ignore else 0.0)
    t = torch.where(ignored, torch.full_like(t, ignore_index_for(label_dtype)), t)
    _BASE[key] = (x.to(device), t.to(device=device, dtype=LABEL_DTYPES[label_dtype]))
    return _BASE[key]


def ignore_index_for(label_dtype):
    return 255 if label_dtype == "uint8" else IGNORE_INDEX


# --------------------------------------------------------------------------- byte floor


def floor_bytes(case, pass_, label_dtype="int64"):
    """docs/DESIGN.md §8: the logits read once per pass, the gradient written once, plus the labels.

    fwd: N·C·s + labels; bwd: 2·N·C·s + labels (read logits, write gradient);
    fwd+bwd: 3·N·C·s + labels. s = bytes per logit, labels = N · bytes per label.
    """
    s = torch.empty((), dtype=DTYPES[case.dtype]).element_size()
    labels = case.shape.pixels * torch.empty((), dtype=LABEL_DTYPES[label_dtype]).element_size()
    reads = {"fwd": 1, "bwd": 2, "fwd+bwd": 3}[pass_]
    return reads * case.shape.numel * s + labels


# --------------------------------------------------------------------------- providers


class Unavailable(Exception):
    """A provider that cannot run on this machine (the reason is shown in the table)."""


def fused_backend_name(device):
    return "triton" if torch.device(device).type == "cuda" else "cpp"


def applies(provider, case):
    """Whether ``provider`` computes ``case.loss`` at all (other libraries: one loss each)."""
    return case.loss in OTHER_PROVIDERS.get(provider, (case.loss,))


def _liger(case, device, ignore_index):
    """Liger-Kernel's cross-entropy, as a user would call it on dense logits: (N, C) rows, so B×C×H×W
    logits are moved to B·H·W rows first (a copy for NCHW, part of the timed call). Its forward
    writes the gradient into those rows in place (it needs no buffer for it): on (N, C) logits
    that is the caller's tensor, whose values the later timed calls then read."""
    if torch.device(device).type != "cuda":
        raise Unavailable("Liger-Kernel runs on CUDA only")
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss
    except ImportError as e:
        raise Unavailable(f"Liger-Kernel is not installed ({e})") from None
    ce = LigerCrossEntropyLoss(ignore_index=ignore_index)
    C = case.shape.num_classes

    def run(x, target):
        if x.dim() > 2:
            x, target = x.movedim(1, -1).reshape(-1, C), target.reshape(-1)
        return ce(x, target.long()).float()  # its loss has the logits' dtype; the others' is float32

    return run


def _monai(case, compiled, compile_backend):
    """MONAI's DiceLoss / DiceCELoss with softmax=True, to_onehot_y=True (a one-hot target and the
    softmax as large as the logits), as a MONAI user calls them: labels (B, 1, ...); ``compiled``: under
    torch.compile. Its loss has the logits' dtype (the others' is float32 for 16-bit logits)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MONAI's import-time deprecation notices
            from monai.losses import DiceCELoss, DiceLoss
    except ImportError as e:
        raise Unavailable(f"MONAI is not installed ({e}): pip install --no-deps monai==1.6.1") from None
    loss = (DiceCELoss if case.loss == "dice_ce_loss" else DiceLoss)(softmax=True, to_onehot_y=True)
    fn = torch.compile(loss, dynamic=False, backend=compile_backend) if compiled else loss

    def run(x, target):
        return fn(x, target.unsqueeze(1)).float()

    return run


def make_provider(
    provider,
    case,
    device,
    validate=False,
    label_dtype="int64",
    fused_backend=None,
    compile_backend="inductor",
):
    """A callable ``f(logits, target)`` computing ``case.loss`` with ``provider``.

    eager    ``fused_imbalance.functional.<loss>(..., backend="reference")`` (the eager spec); for
             ``ohem_cross_entropy`` HRNet's eager code (``hrnet_ohem_cross_entropy``), as users run it;
    compile  ``torch.compile(fused_imbalance.reference.<loss>, dynamic=False)`` (for
             ``ohem_cross_entropy`` of ``hrnet_ohem_cross_entropy``, without ``validate``), called with
             ``validate=False``: the label check is a host sync and a graph break, and the
             baseline should be the best a compiler makes of the reference;
    fused    ``functional.<loss>(..., backend="triton")`` on CUDA, ``backend="cpp"`` on CPU, or
             ``fused_backend`` when given ("triton" on CPU tensors: the kernels under
             ``TRITON_INTERPRET=1``, as the GPU session's rehearsal runs them);
             ``compile_backend``: torch.compile's backend (the rehearsal's "aot_eager" traces the
             graphs as Inductor would be given them, without its code generation, which takes
             10-30 s a graph on a CPU);
    liger    Liger-Kernel's ``LigerCrossEntropyLoss`` (cross_entropy only, CUDA; see ``_liger``);
    monai    MONAI's ``DiceLoss`` / ``DiceCELoss`` (the Dice family; see ``_monai``), and
             ``monai_compile`` the same under ``torch.compile``.

    ``validate`` (eager and fused; default False): with True, the label-range check runs inside
    the timed call. On a GPU it is a device-to-host sync after the forward kernel: the host waits
    for the kernel to finish before it can queue the backward, so the GPU idles for a launch
    latency per step, and the timing measures that sync rather than the kernels.
    """
    C = case.shape.num_classes
    kwargs = loss_kwargs(case.loss, C, device)
    kwargs["ignore_index"] = ignore_index_for(label_dtype)
    if not applies(provider, case):
        raise Unavailable(f"{provider} has no {case.loss}")
    if provider == "liger":
        return _liger(case, device, kwargs["ignore_index"])
    if case.loss == "ohem_cross_entropy" and provider in ("eager", "compile"):
        # HRNet's eager code, and torch.compile of it: what users run (its sort and boolean indexing
        # are graph breaks, as in their training scripts)
        if provider == "eager":
            return functools.partial(hrnet_ohem_cross_entropy, **kwargs)
        return functools.partial(
            torch.compile(hrnet_ohem_cross_entropy, dynamic=False, backend=compile_backend), **kwargs
        )
    if provider in ("monai", "monai_compile"):
        return _monai(case, provider == "monai_compile", compile_backend)
    if provider == "compile":
        from fused_imbalance import reference

        compiled = torch.compile(getattr(reference, case.loss), dynamic=False, backend=compile_backend)
        return functools.partial(compiled, validate=False, **kwargs)
    functional = _functional()
    if provider == "eager":
        if functional is None:  # the functional API is optional: fall back to the spec itself
            from fused_imbalance import reference

            return functools.partial(getattr(reference, case.loss), validate=validate, **kwargs)
        return functools.partial(
            getattr(functional, case.loss), backend="reference", validate=validate, **kwargs
        )
    if provider == "fused":
        if functional is None:
            raise Unavailable("fused_imbalance.functional is missing")
        backend = fused_backend or fused_backend_name(device)
        probe = torch.empty(
            (1, C) + (1,) * (len(case.shape.dims) - 2), dtype=DTYPES[case.dtype], device=device
        )
        try:
            functional.resolve_backend(backend, probe)
        except (RuntimeError, ImportError) as e:
            raise Unavailable(f"{backend} backend: {e}") from None
        return functools.partial(getattr(functional, case.loss), backend=backend, validate=validate, **kwargs)
    raise ValueError(f"unknown provider {provider!r}")


def _functional():
    try:
        from fused_imbalance import functional
    except ImportError:
        return None
    return functional
