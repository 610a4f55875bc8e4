"""The tests the GPU session runs on CUDA (a pytest plugin), and a check of that selection without pytest.

    python -m pytest -p benchmarks.gpu_tests tests      # only the selected tests
    python -m benchmarks.gpu_tests                      # check that what it names exists (no torch)

Selected: every test marked ``cuda`` (CUDA-only: graph capture, reduce-overhead, more than 2^31
elements, ``torch.compile(fullgraph=True)`` on CUDA, no host sync), every test of the Triton kernels'
own file (``FILES``: their kernels compiled for the GPU instead of interpreted) and the tests in ``NODES``
(``test_lse_from_the_forward`` crashed the host of an H100 machine once, at a C++ op's argument
error; ``test_ops_check_tensor_sizes_before_touching_memory`` makes every op raise such errors). Not
the whole suite: CI runs that on CPUs, and a GPU session has a minute for this.
"""

import ast
import os
import sys

FILES = ("tests/test_internals_triton.py",)
NODES = (
    "tests/test_upsample.py::test_lse_from_the_forward",
    "tests/test_robustness.py::test_ops_check_tensor_sizes_before_touching_memory",
)
MARK = "cuda"


def selected(item):
    path = item.nodeid.split("::", 1)[0]
    return (
        item.get_closest_marker(MARK) is not None
        or path in FILES
        or any(item.nodeid == n or item.nodeid.startswith(n + "[") for n in NODES)
    )


def pytest_collection_modifyitems(config, items):
    keep = [i for i in items if selected(i)]
    dropped = [i for i in items if not selected(i)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


def check(root):
    """Problems with the selection, read from the sources (no import): a named file or test that
    does not exist, or no test marked ``cuda``. An empty list when all is well."""
    problems, marked = [], 0
    tests = os.path.join(root, "tests")
    for name in sorted(os.listdir(tests)):
        if name.startswith("test_") and name.endswith(".py"):
            with open(os.path.join(tests, name)) as f:
                tree = ast.parse(f.read())
            for node in ast.walk(tree):
                if isinstance(node, ast.FunctionDef) and any(
                    ast.unparse(d).startswith(f"pytest.mark.{MARK}") for d in node.decorator_list
                ):
                    marked += 1
    for path in FILES:
        if not os.path.exists(os.path.join(root, path)):
            problems.append(f"{path} does not exist")
    for node in NODES:
        path, name = node.split("::")
        try:
            with open(os.path.join(root, path)) as f:
                tree = ast.parse(f.read())
        except OSError:
            problems.append(f"{path} does not exist")
            continue
        if not any(isinstance(n, ast.FunctionDef) and n.name == name for n in ast.walk(tree)):
            problems.append(f"{node}: no such test")
    if not marked:
        problems.append(f"no test is marked {MARK}")
    return problems, marked


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    problems, marked = check(root)
    for p in problems:
        print(f"selection: {p}")
    print(
        f"selection: {marked} tests marked {MARK}, files {', '.join(FILES)}, tests {', '.join(NODES)}"
        + ("" if problems else ": all found")
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
