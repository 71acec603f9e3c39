"""Export of GuideSR for deployment: ONNX graphs, TensorRT engines, and their verification.

- `graphs`: the one declaration of every exported graph (names, dynamic axes, min/opt/max shapes).
- `merge`: LoRA folded into plain weights (peft's merge_and_unload).
- `rewrites`: equivalent rewrites (strided-conv injection, frozen time embedding, constant folding).
- `onnx_export`: trace, rewrite, check and save the graphs with their metadata.
- `fp16`: the fp16 graph's explicit fp32 islands for strongly typed TensorRT.
- `plugin_nodes`: FCA channel attention as TensorRT plugin nodes (graphs with `trt_plugins`);
  `tensorrt_plugins`: those plugins, with AOT Triton kernels, registered by the engine builder.
- `trt_supported_ops`: TensorRT's ONNX operator support matrix and the check against it.
- `tensorrt_build`: the engine builder (TensorRT Python API); `engine_metadata`: what an engine
  was built for and the runtime's compatibility check.
- `verify`: Polygraphy comparison against the PyTorch reference.

`python -m export onnx|engine|verify` (see `export/__main__.py`); docs/parts/export.md has the design.
"""
