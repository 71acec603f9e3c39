"""Fused Triton kernels for GuideSR inference, one op per module.

- `fca_attention`: the FCA block's channel attention, GELU -> pool -> 1x1 conv -> sigmoid -> scale.
- `pixel_unshuffle_concat`: cat([h, PixelUnshuffle(f, s)], dim=1) written straight into one buffer.
- `fca_attention_aot`: the FCA kernels compiled ahead of time to PTX for TensorRT plugins, with their launches.

Each module holds the Triton kernels and their launcher, the PyTorch reference, a
`torch.library.triton_op` custom op (``torch.ops.guidesr.*``) and the dispatcher the model calls,
which picks the op on CUDA at inference and the reference everywhere else (CPU, autograd, ONNX
export, no Triton installed). `python -m kernels.benchmark` times both against PyTorch on a GPU.

Import from the modules (`from kernels.fca_attention import fca_channel_attention`): the package
re-exports nothing, since `kernels.pixel_unshuffle_concat` is both a module and its op's name.
"""
