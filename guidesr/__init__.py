"""GuideSR: one-step diffusion super-resolution with a full-resolution guidance branch."""

from .config import GuideSRConfig, preset_config
from .loading import build_model, load_default_model, load_model, model_for_preset
from .model import GuideSR, GuideSROutput, ModelDescriptor

__all__ = [
    "GuideSR", "GuideSRConfig", "GuideSROutput", "ModelDescriptor", "build_model", "load_default_model",
    "load_model", "model_for_preset", "preset_config",
]
