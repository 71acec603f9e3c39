"""python -m export onnx|engine|verify: ONNX graphs, TensorRT engines and their Polygraphy check.

    python -m export onnx    [model] [--tile 512] [--precision fp32 fp16] [--variant static dynamic]
    python -m export engine  [model] [--tile 512] [--precision fp16] [--variant static] [--optimization-level 3]
    python -m export verify  [model] [--tile 512] [--sizes 512x512 256x512] [--onnx FILE ...] [--engine FILE]

[model] is the embedded demo checkpoint by default, or --checkpoint NAME.json [--base-model DIR],
or --random-weights --preset tiny|sd-turbo (an untrained model: random base weights unless
--base-model is given). Files go to --out-dir (artifacts/export). `engine` writes its ONNX graph
first, then needs TensorRT: without it, it exits with status 3, the install command and the command to rerun.
`verify` needs Polygraphy and ONNX Runtime (without them: status 3 and the install command, before the
model loads). It also checks every engine found next to a graph (NAME.engine for NAME.onnx) when TensorRT
is installed, and exits with status 1 if a comparison fails. A graph is refused when it holds another checkpoint or
weights than the model, and an engine named with --engine when its metadata (NAME.engine.json: no TensorRT needed)
names another preset, checkpoint or weights (the same checkpoint on another --base-model) or another graph than
NAME.onnx (its sha256, with its external data): each one refused is named, the other graphs are compared, and the
status is 2. A named engine that passes those checks needs TensorRT: without it, status 3. --tile is bounded: a
graph whose largest tensor at its largest input (the UNet's attention scores beyond small tiles) holds 2^31 values
or more (TensorRT's limit per tensor) is refused before the export (status 2), naming that tensor: by `engine`, and
by `onnx` for the static graph (a dynamic graph past it only at its largest shapes is written for ONNX Runtime, with
a note). Ctrl-C stops any command with status 130 and one line saying what was done; a graph or engine is published
whole or not at all.
"""

from __future__ import annotations

import argparse
import importlib
import math
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from google.protobuf.message import DecodeError

from guidesr.checkpoint import CheckpointError, weights_sha256
from guidesr.config import PRESETS, GuideSRConfig, preset_config
from guidesr.loading import DEFAULT_CHECKPOINT, BaseModelError, build_model, load_model
from runtime.cli import EXIT_INTERRUPTED, bounded_float, bounded_int, output_folder_problem, plural

from . import engine_metadata
from .engine_metadata import EngineMetadata, EngineMetadataError, EngineMismatchError
from .graphs import VARIANTS, GraphSpec, guidesr_graph, size_argument
from .onnx_export import PRECISIONS, ExportedGraph, export_graphs, graph_filename, read_metadata
from .tensorrt_build import EngineBuildError, TensorRTUnavailableError, build_engine, import_tensorrt

if TYPE_CHECKING:
    from guidesr.model import GuideSR

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_MISSING_PACKAGE = 3
TENSORRT_MAX_VALUES = 1 << 31  # TensorRT's ITensor: "The volume of the tensor must be less than 2^31 elements"


class GraphsRefused(ValueError):
    """Graphs verify cannot compare, each with its reason in `problems`."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass
class Progress:
    """What a command has finished, for the line Ctrl-C prints."""
    written: list[Path] = field(default_factory=list)  # graphs in place (onnx, engine)
    compared: list[Path] = field(default_factory=list)  # graphs whose comparisons are printed (verify)
    to_compare: int = 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    progress = Progress()
    try:
        if args.command == "verify":
            try:
                importlib.import_module(".verify", __package__)
            except ImportError as err:
                print(f"error: verify needs Polygraphy and ONNX Runtime ({err}); pip install polygraphy onnxruntime",
                      file=sys.stderr)
                return EXIT_MISSING_PACKAGE
            args.graph_metadata, args.engine_metadata = check_verify_inputs(args)
        else:
            check_out_dir(args.out_dir)
        if args.command == "engine" and args.timing_cache is not None:
            check_timing_cache(args.timing_cache)
        model, weights = load_from_args(args)
        return args.run(args, model, weights, progress)
    except KeyboardInterrupt:
        print(f"interrupted: {interrupted_summary(args.command, progress)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except GraphsRefused as err:
        for problem in err.problems:
            print(f"error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    except (CheckpointError, BaseModelError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except (EngineBuildError, EngineMetadataError, EngineMismatchError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILED


def interrupted_summary(command: str, progress: Progress) -> str:
    """What the interrupted `command` finished and what it did not; each graph and engine is published whole (renamed
    into place with its data or metadata) or not at all, so the line says so."""
    written = ", ".join(path.name for path in progress.written)
    if command == "verify":
        compared = (f"{len(progress.compared)} of {plural(progress.to_compare, 'graph')} compared (results above)"
                    if progress.to_compare else "before any graph was compared")
        return f"{compared}; verify writes no files"
    if command == "engine":
        if not progress.written:
            return ("before the graph was written: nothing was published (a graph there is a whole one from before); "
                    "the same command again does it all")
        return (f"{written} is written, its engine is not: nothing half-written was published (an engine is used only "
                f"with its NAME.engine.json, written last); the same command again builds it")
    return (f"{f'wrote {written}' if written else 'no graph written'}; the graph being exported was not published, so "
            f"each graph there is a whole one, new or from before; the same command again exports them all")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    onnx = _command(commands, "onnx", _run_onnx, "export the ONNX graphs")
    onnx.add_argument("--precision", nargs="+", choices=PRECISIONS, default=list(PRECISIONS),
                      help=f"precisions to export, one graph each (default: {' '.join(PRECISIONS)})")
    onnx.add_argument("--variant", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                      help=f"static (one tile shape) and/or dynamic (batch, height and width vary) graphs "
                           f"(default: {' '.join(VARIANTS)})")
    _shape_options(onnx)

    engine = _command(commands, "engine", _run_engine, "export one ONNX graph and build its TensorRT engine")
    engine.add_argument("--precision", choices=PRECISIONS, default="fp16",
                        help="precision of the graph and engine (default fp16)")
    engine.add_argument("--variant", choices=VARIANTS, default="static",
                        help="static (one tile shape) or dynamic (batch, height and width vary) (default static)")
    _shape_options(engine)
    engine.add_argument("--optimization-level", type=int, default=3, choices=range(6),
                        help="TensorRT builder optimisation level 0-5 (default 3)")
    engine.add_argument("--workspace-gib", type=bounded_float(0, exclusive_minimum=True),
                        help="TensorRT workspace limit in GiB (default: TensorRT's)")
    engine.add_argument("--timing-cache", type=Path,
                        help="timing cache file, loaded and saved (default OUT_DIR/tensorrt-timing.cache)")
    engine.add_argument("--verbose", action="store_true", help="TensorRT's verbose log (default: warnings only)")

    verify = _command(commands, "verify", _run_verify, "compare graphs (and an engine) with PyTorch via Polygraphy")
    verify.add_argument("--onnx", type=Path, nargs="+",
                        help="graphs to check (default: every graph of this preset and tile in --out-dir)")
    verify.add_argument("--engine", type=Path,
                        help="engine to check as well, against PyTorch and its ONNX graph NAME.onnx next to it "
                             "(default: only the NAME.engine files found next to the graphs)")
    verify.add_argument("--sizes", nargs="+", type=size_argument("size"),
                        help="HxW sizes for dynamic graphs (default: each graph's opt size and half its height)")
    verify.add_argument("--batch", type=bounded_int(1), default=1,
                        help="batch size of the static graphs to find in --out-dir (default 1)")
    return parser


def _command(commands, name: str, run, help_text: str) -> argparse.ArgumentParser:
    command = commands.add_parser(name, help=help_text)
    command.set_defaults(run=run)
    model = command.add_argument_group("model")
    model.add_argument("--checkpoint", type=Path,
                       help=f"checkpoint JSON (default: the embedded {DEFAULT_CHECKPOINT.name})")
    model.add_argument("--preset", choices=sorted(PRESETS),
                       help="must match the checkpoint's; required with --random-weights (default: the checkpoint's)")
    model.add_argument("--base-model", type=Path,
                       help="diffusers folder with unet/ and vae/ (default: the checkpoint's; "
                            "random base weights with --random-weights)")
    model.add_argument("--random-weights", action="store_true",
                       help="use an untrained model of --preset (default: off)")
    model.add_argument("--seed", type=int, default=0, help="seed of the untrained model's weights (default 0)")
    command.add_argument("--tile", type=size_argument("tile"), default="512",
                         help="tile the graphs are built for: 512 or HxW (default 512)")
    command.add_argument("--out-dir", type=Path, default=Path("artifacts/export"),
                         help="folder of the graphs and engines, written by onnx and engine, read by verify "
                              "(default artifacts/export)")
    return command


def _shape_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--batch", type=bounded_int(1), default=1, help="batch size of static graphs (default 1)")
    command.add_argument("--max-batch", type=bounded_int(1), default=4,
                         help="largest batch of dynamic graphs (default 4)")
    command.add_argument("--trt-plugins", action="store_true",
                         help="FCA channel attention as TensorRT plugin nodes (fused Triton kernels; TensorRT only) "
                              "(default: off)")


def check_verify_inputs(args) -> tuple[dict[Path, dict[str, str]], EngineMetadata | None]:
    """Raise ValueError unless every file named on verify's command line exists and its metadata (engine, graph) reads;
    returns the metadata of each graph named (with --onnx, or NAME.onnx next to --engine) and that of the engine
    named with --engine (None without one)."""
    missing = [path for path in args.onnx or [] if not path.is_file()]
    if args.engine is not None:
        missing += [path for path in (args.engine, args.engine.with_suffix(".onnx"),
                                      engine_metadata.metadata_path(args.engine)) if not path.is_file()]
    if missing:
        raise ValueError(f"no such file: {', '.join(str(path) for path in missing)} (given with --onnx or --engine; "
                         f"an engine needs its graph NAME.onnx and its metadata NAME.engine.json next to it)")
    named_engine = engine_metadata.read(args.engine) if args.engine is not None else None
    graphs = list(args.onnx or []) + ([args.engine.with_suffix(".onnx")] if args.engine is not None else [])
    metadata, problems = read_graphs_metadata(graphs)
    if problems:
        raise GraphsRefused(problems)
    return metadata, named_engine


def read_graphs_metadata(graphs: list[Path]) -> tuple[dict[Path, dict[str, str]], list[str]]:
    """`read_graph_metadata` of every graph that reads, and why each other one does not."""
    metadata, problems = {}, []
    for path in graphs:
        try:
            metadata[path] = read_graph_metadata(path)
        except ValueError as err:
            problems.append(str(err))
    return metadata, problems


def check_out_dir(path: Path) -> None:
    """Raise ValueError unless `path` is a writable folder or one that can be made there."""
    problem = output_folder_problem(path)
    if problem is not None:
        raise ValueError(f"--out-dir {path}: {problem}")


def check_timing_cache(path: Path) -> None:
    """Raise ValueError unless `path` can be saved as the timing cache file: not a folder, its folder writable or one
    that can be made there."""
    if path.is_dir():
        raise ValueError(f"--timing-cache {path} is a folder; name the cache file, e.g. "
                         f"{path / 'tensorrt-timing.cache'}")
    problem = output_folder_problem(path.parent)
    if problem is not None:
        raise ValueError(f"--timing-cache {path}: {problem}")


def read_graph_metadata(path: Path) -> dict[str, str]:
    """`read_metadata`, raising ValueError for a file that is not a readable ONNX file as well."""
    try:
        return read_metadata(path)
    except DecodeError as err:
        raise ValueError(f"{path} is not a readable ONNX file: {err}") from err


def load_from_args(args) -> tuple[GuideSR, str]:
    """The model asked for, and a description of its weights for the graphs' metadata."""
    if args.random_weights:
        if args.checkpoint is not None:
            raise ValueError("--random-weights and --checkpoint exclude each other")
        if args.preset is None:
            raise ValueError("--random-weights needs --preset")
        base = f", base {args.base_model}" if args.base_model else ", random base"
        model = build_model(preset_config(args.preset), args.base_model, seed=args.seed).eval()
        return model, f"untrained (preset {args.preset}, seed {args.seed}{base})"
    if args.checkpoint is None and not DEFAULT_CHECKPOINT.exists():
        raise CheckpointError(f"the embedded demo checkpoint {DEFAULT_CHECKPOINT} is not there; pass --checkpoint "
                              f"NAME.json, or --random-weights --preset tiny for an untrained model")
    checkpoint = args.checkpoint or DEFAULT_CHECKPOINT
    model = load_model(checkpoint, preset=args.preset, base_model=args.base_model)
    return model, f"checkpoint {checkpoint.name}"


def _specs(args, model: GuideSR, variants: list[str], *, for_tensorrt: bool) -> list[GraphSpec]:
    """The graphs to export. A graph with a tensor past TensorRT's limit is refused when it is for TensorRT
    (`engine`) and when it is the static graph (its one tile shape is what every backend runs); a dynamic graph for
    ONNX Runtime (`onnx`) is written with a note, since only its largest shapes are past the limit."""
    multiple = model.config.size_multiple
    specs = [guidesr_graph(multiple, args.tile, v, batch=args.batch, max_batch=args.max_batch,
                           trt_plugins=args.trt_plugins) for v in variants]
    for spec in specs:
        problem = tensor_limit_problem(spec, model.config)
        if problem is None:
            continue
        if for_tensorrt or spec.variant == "static":
            raise ValueError(problem)
        print(f"note: {problem}; ONNX Runtime can run it, `export engine --variant dynamic` refuses it",
              file=sys.stderr)
    return specs


@dataclass(frozen=True)
class GraphTensor:
    """A tensor of the exported graph: what it is, and its shape."""
    what: str
    shape: tuple[int, ...]

    @property
    def values(self) -> int:
        return math.prod(self.shape)


def largest_tensor(config: GuideSRConfig, input_shape: tuple[int, ...]) -> GraphTensor:
    """The largest tensor of the graph of a model of `config` run on `input_shape` (B, 3, H, W), found among:

    - full-resolution features [B, c, H, W]: the guidance features F_r (c = 2C), the VAE decoder's last blocks (its
      upsampler into full resolution has c1 channels, then c0; c = the VAE's block_out_channels) and the VAE
      encoder's first downsampler input, padded to [B, c0, H+1, W+1];
    - attention scores [B, heads, N, N] (self-attention) and [B, heads, N, prompt_length] (cross-attention): the
      TorchScript exporter writes attention as MatMul -> Softmax -> MatMul, so the graph holds them (no fused
      Attention op). The VAE's mid-block attends with one head over N = H/f x W/f tokens (f: the VAE factor), the
      UNet's attention blocks of level i with heads_i over N / 4^i (diffusers reads `attention_head_dim` as the
      number of heads when `num_attention_heads` is unset: tiny 8 at every level, sd-turbo 5, 10, 20, 20).

    The features are the largest at small tiles, the scores, growing with (H x W)^2, from about 144x144 (tiny) or
    512x512 (sd-turbo) on: there the largest are the UNet's level-0 self-attention scores (tiny [B, 8, N, N],
    sd-turbo [B, 5, N, N]), which reach 2^31 at 1024x1024 (tiny) or 1152x1152 (sd-turbo) with batch 1.
    """
    batch, _, height, width = input_shape
    vae_channels = config.vae["block_out_channels"]
    candidates = [
        GraphTensor("the full-resolution guidance features F_r", (batch, 2 * config.guidance.channels, height, width)),
        GraphTensor("the VAE decoder's full-resolution features", (batch, max(vae_channels[:2]), height, width)),
    ]
    if len(vae_channels) > 1:
        candidates.append(GraphTensor("the VAE encoder's padded full-resolution features",
                                      (batch, vae_channels[0], height + 1, width + 1)))
    factor = config.vae_factor
    tokens = (height // factor) * (width // factor)
    candidates.append(GraphTensor("the self-attention scores of the VAE's mid-block", (batch, 1, tokens, tokens)))
    unet = config.unet
    levels = len(unet["block_out_channels"])
    heads = unet.get("num_attention_heads") or unet["attention_head_dim"]
    heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * levels
    attention_levels = {i for i, block in enumerate(unet["down_block_types"]) if block.startswith("CrossAttn")}
    attention_levels |= {levels - 1 - i for i, block in enumerate(unet["up_block_types"])
                         if block.startswith("CrossAttn")}
    if unet.get("mid_block_type", "UNetMidBlock2DCrossAttn") == "UNetMidBlock2DCrossAttn":
        attention_levels.add(levels - 1)
    for level in sorted(attention_levels):
        scale = factor * 2**level
        level_tokens = (height // scale) * (width // scale)
        for kind, keys in (("self", level_tokens), ("cross", config.prompt_length)):
            candidates.append(GraphTensor(f"the {kind}-attention scores of the UNet's level-{level} blocks",
                                          (batch, heads[level], level_tokens, keys)))
    return max(candidates, key=lambda tensor: tensor.values)


def tensor_limit_problem(spec: GraphSpec, config: GuideSRConfig) -> str | None:
    """What is wrong when the graph's largest tensor (`largest_tensor`) at its largest input (for the dynamic graph:
    max batch, twice the tile) holds 2^31 values or more: TensorRT cannot build such a graph (NvInfer.h, ITensor, "A
    tensor in a network definition": "The volume of the tensor must be less than 2^31 elements"; the attention
    scores hit it, e.g. NVIDIA/TensorRT#3324: "[Matrix Multiply]_output: tensor volume exceeds (2^31)-1, dimensions
    are [2,5,16384,16384]"); None when it is within the limit. Checked before the export, which would succeed."""
    largest = largest_tensor(config, spec.inputs[0].max)
    if largest.values >= TENSORRT_MAX_VALUES:
        tile_height, tile_width = spec.tile
        smaller = "a smaller tile or --max-batch" if spec.variant == "dynamic" else "a smaller tile or --batch"
        return (
            f"--tile {tile_height}x{tile_width}: the {spec.variant} graph takes inputs up to "
            f"{'x'.join(str(s) for s in spec.inputs[0].max)}, where {largest.what} are one tensor of "
            f"{'x'.join(str(s) for s in largest.shape)} = {largest.values:,} values; TensorRT takes fewer than "
            f"2^31 ({TENSORRT_MAX_VALUES:,}) per tensor, so no engine could be built from it: choose {smaller}")
    return None


def _run_onnx(args, model: GuideSR, weights: str, progress: Progress) -> int:
    def report(graph: ExportedGraph) -> None:
        progress.written.append(graph.path)
        print(f"wrote {graph.path}")

    specs = _specs(args, model, args.variant, for_tensorrt=False)
    export_graphs(model, args.out_dir, specs, args.precision, weights, on_published=report)
    return 0


def _run_engine(args, model: GuideSR, weights: str, progress: Progress) -> int:
    (graph,) = export_graphs(model, args.out_dir, _specs(args, model, [args.variant], for_tensorrt=True),
                             [args.precision], weights)
    progress.written.append(graph.path)
    print(f"wrote {graph.path}")
    try:
        import_tensorrt()
    except TensorRTUnavailableError as err:
        print(f"error: cannot build the engine: {err}\n{graph.path} is written; once TensorRT is installed, rerun "
              f"this command, which exports the graph again and builds the engine:\n"
              f"    python -m export {shlex.join(args.argv)}", file=sys.stderr)
        return EXIT_MISSING_PACKAGE
    engine_path = graph.path.with_suffix(".engine")
    metadata = build_engine(graph.path, engine_path, optimization_level=args.optimization_level,
                            workspace_gib=args.workspace_gib,
                            timing_cache=args.timing_cache or args.out_dir / "tensorrt-timing.cache",
                            verbose=args.verbose)
    print(f"wrote {engine_path} (TensorRT {metadata.tensorrt_version}, {metadata.gpu_name}) and its metadata")
    return 0


def _run_verify(args, model: GuideSR, weights: str, progress: Progress) -> int:
    from .verify import compare, ort_fp32_fallback_ops, other_model_problem

    multiple, preset = model.config.size_multiple, model.config.preset
    specs = [guidesr_graph(multiple, args.tile, "static", batch=args.batch),
             guidesr_graph(multiple, args.tile, "dynamic")]
    candidates = [args.out_dir / graph_filename(preset, spec, precision) for precision in PRECISIONS for spec in specs]
    graphs = args.onnx or [path for path in candidates if path.is_file()]
    if args.engine is not None and args.engine.with_suffix(".onnx") not in graphs:
        graphs.append(args.engine.with_suffix(".onnx"))
    if not graphs:
        raise ValueError(f"no graphs for preset {preset}, tile {args.tile[0]}x{args.tile[1]} and static batch "
                         f"{args.batch} in {args.out_dir}; run `python -m export onnx` (make onnx) first")
    graph_metadata, problems = read_graphs_metadata([path for path in graphs if path not in args.graph_metadata])
    graph_metadata.update(args.graph_metadata)
    weights_digest = weights_sha256(model)
    for path in [path for path in graphs if path in graph_metadata]:
        problem = other_model_problem(model, path, graph_metadata[path], weights_digest)
        if problem is not None:
            problems.append(problem)
            del graph_metadata[path]
    comparable = [path for path in graphs if path in graph_metadata]
    engines = {path: path.with_suffix(".engine") for path in comparable if path.with_suffix(".engine").is_file()}
    named_engine, engine_problem = args.engine, None
    if named_engine is not None:
        engine_graph = named_engine.with_suffix(".onnx")
        try:  # from its metadata alone, without TensorRT: named and left out as a graph of another model is
            engine_metadata.check_model(args.engine_metadata, preset, model.descriptor.checkpoint_sha256,
                                        weights_digest)
            engine_metadata.check_built_from(args.engine_metadata, named_engine, engine_graph)
        except EngineMismatchError as err:
            engine_problem, named_engine = str(err), None
            if engines.get(engine_graph) == args.engine:
                del engines[engine_graph]
        else:
            engines[engine_graph] = named_engine
    for problem in problems if engine_problem is None else [*problems, engine_problem]:
        print(f"error: {problem}", file=sys.stderr)
    if not comparable:
        return EXIT_USAGE
    if engines:
        try:
            import_tensorrt()
        except TensorRTUnavailableError as err:
            if named_engine is not None:  # a named engine is checked or the command fails, as `engine` does
                print(f"error: cannot check {named_engine}: {err}", file=sys.stderr)
                return EXIT_MISSING_PACKAGE
            print(f"note: TensorRT is not installed; not checking {', '.join(e.name for e in engines.values())}")
            engines = {}
    print(f"reference: PyTorch, {weights}")
    passed = True
    progress.to_compare = len(comparable)
    for path in comparable:
        engine = engines.get(path)
        print(f"\n{path.name}" + (f" and {engine.name}" if engine else ""))
        if args.sizes and GraphSpec.from_json(graph_metadata[path]["graph_spec"]).variant == "static":
            print("  note: a static graph runs its own shape only; --sizes applies to dynamic graphs")
        checked_engine = args.engine_metadata if engine is not None and engine == named_engine else None
        comparisons = compare(model, path, args.sizes, engine, graph_metadata[path], checked_engine, weights_digest)
        for comparison in comparisons:
            print("  " + comparison.describe())
            passed &= comparison.passed
        if comparisons[0].precision == "fp16":
            fallback = ort_fp32_fallback_ops(path)
            listed = ", ".join(f"{op} x{count}" for op, count in fallback.most_common())
            print(f"  note: ONNX Runtime's CPU provider ran these fp16 ops through fp32 kernels: {listed or 'none'}")
        progress.compared.append(path)
    print("\nall comparisons passed" if passed else "\nSOME COMPARISONS FAILED")
    if problems:
        print(f"{len(problems)} of {plural(len(graphs), 'graph')} {'was' if len(problems) == 1 else 'were'} not "
              f"compared (the errors above say why)")
    if engine_problem is not None:
        print(f"{args.engine} was not checked (the error above says why)")
    if problems or engine_problem is not None:
        return EXIT_USAGE
    return 0 if passed else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
