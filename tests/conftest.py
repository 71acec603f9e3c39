import importlib.util
import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton picks interpreter or compiler when a kernel is decorated (first import of kernels/), so
# without CUDA the interpreter must be chosen before any test module imports the model.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    problem = _triton_interpreter_problem()
    if problem is not None:
        raise pytest.UsageError(problem)


def _triton_interpreter_problem() -> str | None:
    """Why Triton's interpreter cannot run the kernels' tests here (None: it can, or it is not in use).

    Triton 3.6's interpreter turns a kernel's integer argument into a 1-element array and a loop
    bound into `int(array)`, which NumPy 2.4 refuses; every kernel here loops to a runtime bound.
    """
    if os.environ.get("TRITON_INTERPRET") != "1":
        return None
    try:
        import numpy
        import triton
    except ImportError:
        return None
    from interpreter_probe import count_to

    out = torch.zeros(1, dtype=torch.int32)
    try:
        count_to[(1,)](out, 3)
    except Exception as err:  # noqa: BLE001 (reported below, with the way out)
        return (f"Triton {triton.__version__}'s interpreter (TRITON_INTERPRET=1, used without CUDA) cannot run a loop "
                f"bounded by a kernel argument under NumPy {numpy.__version__} ({type(err).__name__}: {err}); "
                f"install numpy<2.4 or triton>=3.9")
    return None if out.item() == 3 else f"Triton {triton.__version__}'s interpreter counted to {out.item()}, not 3"


def pytest_collection_modifyitems(config, items):
    """Skip `gpu` tests without CUDA and `tensorrt` tests without TensorRT, with the reason in the report, before
    their fixtures (exported graphs, compiled models) are built."""
    skips = {}
    if not torch.cuda.is_available():
        skips["gpu"] = pytest.mark.skip(reason="needs a CUDA device; this machine has none")
    if importlib.util.find_spec("tensorrt") is None:
        skips["tensorrt"] = pytest.mark.skip(reason="TensorRT is not installed (pip install tensorrt-cu12)")
    for item in items:
        for marker, skip in skips.items():
            if marker in item.keywords:
                item.add_marker(skip)
                break
