"""Shared by the tests: real tiny GuideSR models with non-zero trainable parts, a tiny CLIP vision model, and the kernel
tests' tools."""

from pathlib import Path
from typing import Callable

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import CLIPVisionConfig, CLIPVisionModel

from guidesr import build_model, preset_config
from guidesr.checkpoint import save_checkpoint
from guidesr.config import tiny_config
from guidesr.loading import WEIGHTS_DIR
from guidesr.model import GuideSR


def tiny_clip_vision_config() -> CLIPVisionConfig:
    return CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                            image_size=32, patch_size=8)


def save_tiny_clip(folder: Path) -> Path:
    """A random tiny CLIP vision model written with `save_pretrained` (what `--clip-path` names), seed 0."""
    torch.manual_seed(0)
    CLIPVisionModel(tiny_clip_vision_config()).save_pretrained(folder)
    return folder


def randomize_trainable(model: GuideSR, seed: int, only_lora: bool = False) -> GuideSR:
    """Give trainable tensors (LoRA B, zero-convs, injections, ...) random values (x 0.02): at their
    zero init they would hide the branches that rewrites, exports and kernels must get right."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.trainable_parameters():
            if not only_lora or "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    return model


def randomized_tiny(seed: int) -> GuideSR:
    """The tiny preset with random base weights and random trainable parts, in eval mode."""
    torch.manual_seed(seed)
    return randomize_trainable(GuideSR(tiny_config()).eval(), seed + 1)


def save_randomized_tiny(folder: Path, seed: int = 1) -> Path:
    """The tiny preset on the embedded base, trainable parts random, saved as a checkpoint."""
    base = (WEIGHTS_DIR / "tiny-base").resolve()
    model = randomize_trainable(build_model(preset_config("tiny"), base), seed)
    return save_checkpoint(model, folder / "tiny", base_model=str(base))


class OpRecorder(TorchDispatchMode):
    """Records the names of the operators that reach the dispatcher."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def refuse_report_model_loading(monkeypatch, before: str) -> None:
    """Make `runtime.report.load_model_from_args` (the measuring commands' model loader) fail the test: the command
    was to stop `before` it loads the model."""
    def refuse(args):
        raise AssertionError(f"the model was loaded before {before}")

    monkeypatch.setattr("runtime.report.load_model_from_args", refuse)


def require_interpreted_kernel(kernel, module_name: str) -> None:
    """Without CUDA, a kernel module's kernels must be Triton's interpreter versions (tests/conftest.py)."""
    from triton.runtime.interpreter import InterpretedFunction

    if not torch.cuda.is_available() and not isinstance(kernel, InterpretedFunction):
        raise RuntimeError(
            f"{module_name} was imported before tests/conftest.py set TRITON_INTERPRET=1, so its kernels "
            "cannot run on the CPU; set TRITON_INTERPRET=1 in the environment or tests/conftest.py"
        )


def status_after_ctrl_c(main: Callable[[list[str]], int], argv: list[str]) -> int:
    """`main(argv)`'s exit status where the test makes Ctrl-C happen inside it: a KeyboardInterrupt that escapes main
    (a traceback for the user) fails the test, instead of stopping this pytest run."""
    try:
        return main(argv)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped main() as a traceback")
