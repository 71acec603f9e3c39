"""Every exported graph, declared in one place: input/output names, dynamic axes, min/opt/max shapes.

GuideSR is exported as ONE end-to-end graph (image -> R1); docs/parts/export.md says why. It comes
in two variants of the same trace:

    static   one tile shape, batch fixed: min = opt = max = (batch, 3, H, W)
    dynamic  batch, height and width vary; H and W stay multiples of the model's size_multiple
             min = (1, 3, m, m), opt = (1, 3, H, W) (the tile), max = (max_batch, 3, 2H, 2W)

The ONNX exporter takes its input/output names and dynamic axes from here, the TensorRT builder
its optimisation profile, and the ONNX file and engine metadata carry the spec as JSON, so a
runtime reads the shapes an engine accepts from the file instead of guessing.

`trt_plugins` (off by default) asks for the TensorRT plugin form of the graph: each FCA block's
channel attention becomes plugin nodes running the fused Triton kernels (export/plugin_nodes.py)
instead of the standard ONNX ops, so the graph needs TensorRT with those plugins registered.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

INPUT_NAME = "image"  # LR image resized to the output size, [B, 3, H, W] float32 in [-1, 1]
OUTPUT_NAME = "r1"  # the model's result, [B, 3, H, W] float32 in [-1, 1]
AXES = ("batch", "channels", "height", "width")
VARIANTS = ("static", "dynamic")
GRAPH_NAME = "guidesr"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name of the graph's input/output (float32 in both precisions)
    axes: tuple[str, ...]
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    @property
    def dynamic_axes(self) -> dict[int, str]:
        """{axis index: name} for every axis whose size varies between min and max."""
        return {i: name for i, name in enumerate(self.axes) if self.min[i] != self.max[i]}

    @property
    def dims(self) -> tuple[int | str, ...]:
        """The ONNX shape: an int for a fixed axis, the axis name for a dynamic one."""
        return tuple(self.axes[i] if i in self.dynamic_axes else self.min[i] for i in range(len(self.axes)))


@dataclass(frozen=True)
class GraphSpec:
    name: str
    variant: str  # "static" | "dynamic"
    size_multiple: int  # H and W must be multiples of it (the model skips its padding in the graph)
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    trt_plugins: bool = False  # FCA channel attention as TensorRT plugin nodes (see the module docstring)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    @property
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """torch.onnx.export's `dynamic_axes` for the dynamic variant."""
        return {t.name: t.dynamic_axes for t in (*self.inputs, *self.outputs) if t.dynamic_axes}

    @property
    def profile(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """One TensorRT optimisation profile: input name -> (min, opt, max)."""
        return {t.name: (t.min, t.opt, t.max) for t in self.inputs}

    @property
    def tile(self) -> tuple[int, int]:
        """The (H, W) the graph is optimised for."""
        return self.inputs[0].opt[2], self.inputs[0].opt[3]

    def check_input_shape(self, shape: tuple[int, ...]) -> None:
        """Raise ValueError unless `shape` is one the graph accepts."""
        spec = self.inputs[0]
        shape = tuple(int(s) for s in shape)
        inside = len(shape) == len(spec.min) and all(lo <= s <= hi for lo, s, hi in zip(spec.min, shape, spec.max))
        if not inside or shape[2] % self.size_multiple or shape[3] % self.size_multiple:
            raise ValueError(
                f"the {self.variant} graph accepts {spec.name} shapes from {spec.min} to {spec.max} with H and W "
                f"multiples of {self.size_multiple}; got {shape}"
            )

    def to_json(self) -> str:
        """The spec as JSON; `trt_plugins` only when set, so plain graphs carry the same JSON as before it existed."""
        data = asdict(self)
        if not self.trt_plugins:
            del data["trt_plugins"]
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "GraphSpec":
        data = json.loads(text)
        return cls(name=data["name"], variant=data["variant"], size_multiple=data["size_multiple"],
                   inputs=tuple(_tensor_spec(t) for t in data["inputs"]),
                   outputs=tuple(_tensor_spec(t) for t in data["outputs"]),
                   trt_plugins=data.get("trt_plugins", False))


def _tensor_spec(data: dict) -> TensorSpec:
    return TensorSpec(data["name"], data["dtype"], *(tuple(data[k]) for k in ("axes", "min", "opt", "max")))


def guidesr_graph(size_multiple: int, tile: tuple[int, int], variant: str, batch: int = 1,
                  max_batch: int = 4, trt_plugins: bool = False) -> GraphSpec:
    """The image -> R1 graph for tiles of `tile` = (H, W); both must be multiples of `size_multiple`."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, not {variant!r}")
    height, width = tile
    if height <= 0 or width <= 0 or height % size_multiple or width % size_multiple:
        raise ValueError(
            f"tile {height}x{width} must be positive multiples of the model's size multiple {size_multiple}"
        )
    if variant == "static":
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        shape = (batch, 3, height, width)
        lo, opt, hi = shape, shape, shape
    else:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        lo, opt, hi = (1, 3, size_multiple, size_multiple), (1, 3, height, width), (max_batch, 3, 2 * height, 2 * width)
    image, r1 = (TensorSpec(name, "float32", AXES, lo, opt, hi) for name in (INPUT_NAME, OUTPUT_NAME))
    return GraphSpec(GRAPH_NAME, variant, size_multiple, (image,), (r1,), trt_plugins)


def parse_tile(text: str, what: str = "tile") -> tuple[int, int]:
    """'512' -> (512, 512); '384x512' -> (384, 512) (height x width); `what` names the value in errors."""
    parts = text.lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2):
        raise ValueError(f"{what} must look like 512 or 384x512 (height x width), not {text!r}")
    if min(values) < 1:
        raise ValueError(f"{what} {text!r} must have a positive height and width")
    return (values[0], values[-1])


def size_argument(what: str):
    """`parse_tile` as an argparse type: its ValueError becomes argparse's error line naming `what`."""
    def parse(text: str) -> tuple[int, int]:
        try:
            return parse_tile(text, what)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return parse
