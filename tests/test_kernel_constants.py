"""The named constants the Triton kernels compare their flags with (``MODE_*``, ``RED_*``, ``WEIGHTING_*``,
the Dice kernels' ``KIND_*`` and ``W_TYPE_*``) are the ops' enums, member for member, and the C++ enums of
``csrc/`` mirror the same enums."""

import pathlib
import re

import pytest

from fused_imbalance.ops import Mode, Reduction, Weighting
from fused_imbalance.ops.dice import DiceKind, WType

ROOT = pathlib.Path(__file__).resolve().parents[1]

# (Python enum, C++ file, C++ enum, C++ member names that differ from the Python ones)
CPP_ENUMS = [
    (Mode, "csrc/cpu/loss_kernels.h", "Mode", {}),
    (Reduction, "csrc/cpu/op_common.h", "Reduction", {}),
    (Weighting, "csrc/cpu/op_common.h", "Weighting", {"NO_WEIGHT": "NONE"}),
    (DiceKind, "csrc/cpu/dice_cpu.cpp", "DiceKind", {}),
    (WType, "csrc/cpu/dice_cpu.cpp", "WType", {}),
]


def _cpp_enum(path, name):
    """{MEMBER_NAME: value} of ``enum name : int64_t { kCamelCase = value, ... };`` in a C++ source."""
    body = re.search(r"enum " + name + r" : int64_t \{(.*?)\};", (ROOT / path).read_text(), re.S).group(1)
    return {
        re.sub(r"(?<!^)([A-Z])", r"_\1", k).upper(): int(v)
        for k, v in re.findall(r"k(\w+)\s*=\s*(\d+)", body)
    }


@pytest.mark.parametrize("enum, path, name, renamed", CPP_ENUMS, ids=[e[2] for e in CPP_ENUMS])
def test_cpp_enums_mirror_the_python_enums(enum, path, name, renamed):
    cpp = {renamed.get(k, k): v for k, v in _cpp_enum(path, name).items()}
    assert cpp == {m.name: int(m) for m in enum}


def test_kernel_constants_are_the_enums():
    pytest.importorskip("triton", reason="triton is not installed")
    import triton.language as tl

    from fused_imbalance.ops import triton_common, triton_dice

    for prefix, enum, mod in [
        ("MODE_", Mode, triton_common),
        ("RED_", Reduction, triton_common),
        ("WEIGHTING_", Weighting, triton_common),
        ("KIND_", DiceKind, triton_dice),
        ("W_TYPE_", WType, triton_dice),
    ]:
        consts = {n[len(prefix) :]: v for n, v in vars(mod).items() if n.startswith(prefix)}
        assert set(consts) == {m.name for m in enum}, prefix
        for m in enum:
            # a jitted function reads a global only when it is a tl.constexpr object
            assert isinstance(consts[m.name], tl.constexpr) and consts[m.name].value == int(m), (
                prefix + m.name
            )
