"""GuideSR: one-step diffusion super-resolution with a full-resolution guidance branch."""

from .config import GuideSRConfig, preset_config
from .loading import build_model, load_default_model, load_model, model_for_preset

__all__ = [
    "GuideSR", "GuideSRConfig", "GuideSROutput", "ModelDescriptor", "build_model", "load_default_model",
    "load_model", "model_for_preset", "preset_config",
]


def __getattr__(name: str):
    # guidesr.model imports diffusers and peft (seconds), so importing any guidesr module (and the command lines'
    # `--help`) would wait for them: it is imported when one of its names is first asked for.
    if name in ("GuideSR", "GuideSROutput", "ModelDescriptor"):
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
