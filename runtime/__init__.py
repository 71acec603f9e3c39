"""GuideSR runtime: tiled, batched upscaling of image files on interchangeable backends.

    import runtime
    sr = runtime.upscale("photo.jpg")          # float32 [H*4, W*4, C] in [0, 1]

    python -m runtime.upscale IN... -o OUT     # the command line (see runtime/upscale.py)

Modules: imageio (read/write), tiling (tile plan, blending), backends (what runs the model),
upscale (API + CLI), sharding (torchrun splits).
"""


def __getattr__(name: str):
    # Imported lazily so that `python -m runtime.upscale` does not find its own module already
    # imported by the package (runpy warns about that). `runtime.upscale` is the callable module.
    if name == "upscale":
        import importlib

        return importlib.import_module(".upscale", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
