"""Issue 5: the fused FCA channel-attention op (kernels/fca_attention.py).

Without CUDA the kernels run on CPU tensors through Triton's interpreter; with CUDA the same tests
run the compiled kernels, and the `gpu` tests add torch.compile, full opcheck and ONNX export.
"""

import pytest
import torch

triton = pytest.importorskip("triton")
from helpers import OpRecorder, require_interpreted_kernel  # noqa: E402

from kernels import fca_attention  # noqa: E402
from kernels.fca_attention import (  # noqa: E402
    fast_gelu_reference,
    fca_channel_attention,
    fca_channel_attention_reference,
    fca_channel_attention_triton,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
require_interpreted_kernel(fca_attention._gated_gelu_kernel, "kernels.fca_attention")
OP = torch.ops.guidesr.fca_channel_attention.default


def make_inputs(batch, channels, height, width, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(batch, channels, height, width, generator=g)
    weight = torch.randn(channels, channels, 1, 1, generator=g) / channels**0.5
    bias = torch.randn(channels, generator=g) * 0.5
    return tuple(t.to(DEVICE, dtype) for t in (y, weight, bias))


def max_error_vs_float64(result, y, weight, bias, y_bias=None):
    exact = fca_channel_attention_reference(y.double(), weight.double(), bias.double(),
                                            None if y_bias is None else y_bias.double())
    return (result.double() - exact).abs().max().item()


def test_fast_gelu_fit_within_4e6_of_erf_gelu():
    """The fp16/bf16 kernels' GELU form, in float64: the fit itself, its tails, and special values."""
    x = torch.cat([torch.linspace(-12, 12, 240001, dtype=torch.float64),
                   torch.tensor([-65504.0, -1e3, -40.0, 40.0, 1e3, 65504.0], dtype=torch.float64)])
    error = (fast_gelu_reference(x) - torch.nn.functional.gelu(x)).abs()
    assert error.max().item() < 4e-6, (error.max().item(), x[error.argmax()].item())
    x32 = x.float()  # as the kernels evaluate it
    assert (fast_gelu_reference(x32).double() - torch.nn.functional.gelu(x)).abs()[:240001].max().item() < 5e-6
    special = fast_gelu_reference(torch.tensor([float("inf"), float("nan"), 0.0]))
    assert special[0] == float("inf") and special[1].isnan() and special[2] == 0


@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")  # 2^x -> inf: GELU -> 0, as meant
@pytest.mark.parametrize("fast_gelu", [True, False])
def test_kernel_gelu_forms_match_their_python_definitions(fast_gelu):
    """fp32 input, either GELU form forced: the kernel's constants are FAST_GELU_COEFFICIENTS (a fp32-accurate
    match to the float64 evaluation of the same form, much tighter than the fit's own 4e-6)."""
    y, weight, bias = make_inputs(2, 7, 19, 23, torch.float32, seed=3)
    y = y * 3  # GELU's curved range and its tails
    z = fca_channel_attention_triton(y, weight, bias, fast_gelu=fast_gelu)
    y64 = y.double()
    g = fast_gelu_reference(y64) if fast_gelu else torch.nn.functional.gelu(y64)
    gate = torch.sigmoid(torch.nn.functional.linear(g.mean(dim=(2, 3)), weight.double().reshape(7, 7), bias.double()))
    exact_form = g * gate[:, :, None, None]
    assert (z.double() - exact_form).abs().max().item() < 2e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "shape",
    [
        (3, 17, 23, 37),  # odd C, H != W, nothing a multiple of a block size; 2-channel tiles, the last ragged
        (1, 3, 97, 131),  # H*W = 12707 > 8192: two pass-1 chunks, the second one ragged
        (2, 64, 20, 24),
    ],
)
def test_kernel_error_at_most_twice_pytorchs(shape, dtype):
    """Error vs float64 <= 2x the error of PyTorch's own code in the same dtype, + eps; every element written."""
    y, weight, bias = make_inputs(*shape, dtype)
    out = torch.full_like(y, float("nan"))
    result = fca_channel_attention_triton(y, weight, bias, out=out)
    assert result.data_ptr() == out.data_ptr() and result.dtype == dtype
    assert not torch.isnan(out).any(), "some output elements were never written"
    kernel_error = max_error_vs_float64(out, y, weight, bias)
    torch_error = max_error_vs_float64(fca_channel_attention_reference(y, weight, bias), y, weight, bias)
    # (The CPU interpreter rounds fp32 -> bf16 by truncation, the GPU to nearest; the bound holds for both.)
    assert kernel_error <= 2 * torch_error + torch.finfo(dtype).eps, (kernel_error, torch_error)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_y_bias_is_added_before_gelu(dtype, layout):
    """conv1's bias, passed as y_bias, gives what adding it to y first gives (within the same error bound)."""
    y, weight, bias = make_inputs(3, 17, 23, 37, dtype, seed=4)
    y = y.contiguous(memory_format=layout)
    y_bias = (torch.randn(17, generator=torch.Generator().manual_seed(5)) * 0.5).to(DEVICE, dtype)
    out = torch.full_like(y, float("nan"))
    fca_channel_attention_triton(y, weight, bias, y_bias=y_bias, out=out)
    assert not torch.isnan(out).any()
    kernel_error = max_error_vs_float64(out, y, weight, bias, y_bias)
    torch_error = max_error_vs_float64(fca_channel_attention_reference(y, weight, bias, y_bias), y, weight, bias,
                                       y_bias)
    assert kernel_error <= 2 * torch_error + torch.finfo(dtype).eps, (kernel_error, torch_error)
    with pytest.raises(ValueError, match=r"bias and y_bias must have shape \(17,\), got \(17,\) and \(5,\)"):
        fca_channel_attention_triton(y, weight, bias, y_bias=y_bias[:5])
    with pytest.raises(ValueError, match=r"got \(16,\) and None"):
        fca_channel_attention_triton(y, weight, bias[:16])


def test_strided_inputs_read_in_place_and_output_layout():
    y, weight, bias = make_inputs(2, 17, 19, 23, torch.float32)
    weight_t = weight.reshape(17, 17).t()  # a non-contiguous [C, C] view
    cases = {
        "channels_last": y.to(memory_format=torch.channels_last),
        "crop": y[:, :, 1:-2, 2:],  # H and W do not flatten: copied to contiguous first
        "channel_slice": y[:, ::2],
    }
    for name, case in cases.items():
        c = case.shape[1]
        args = (case, weight_t[:c, :c], bias[:c])
        torch.testing.assert_close(
            fca_channel_attention_triton(*args), fca_channel_attention_reference(*args), rtol=1e-5, atol=1e-6, msg=name
        )
    z = fca_channel_attention_triton(cases["channels_last"], weight, bias)
    assert z.is_contiguous(memory_format=torch.channels_last)


def test_output_written_with_its_own_strides_where_they_differ_from_ys():
    """z's H·W stride is not y's: an NCHW y written into a given channels_last `out`, and a channel slice of a
    channels_last tensor (H·W stride 2C; z comes back contiguous)."""
    y, weight, bias = make_inputs(2, 10, 7, 9, torch.float32, seed=7)
    out = torch.full_like(y, float("nan"), memory_format=torch.channels_last)
    fca_channel_attention_triton(y, weight, bias, out=out)
    torch.testing.assert_close(out, fca_channel_attention_reference(y, weight, bias), rtol=1e-5, atol=1e-6)
    sliced = y.contiguous(memory_format=torch.channels_last)[:, ::2]
    args = (sliced, weight.reshape(10, 10)[::2, ::2], bias[::2].contiguous())
    z = fca_channel_attention_triton(*args)
    assert z.is_contiguous()
    torch.testing.assert_close(z, fca_channel_attention_reference(*args), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("strided", ["bias", "y_bias"])
def test_strided_bias_vectors(strided):
    """A [C] bias or y_bias that is a strided view (every other element of a longer vector): the kernels read them at
    unit stride, so the launcher makes them contiguous (the model's biases are contiguous parameters already)."""
    y, weight, bias = make_inputs(2, 5, 7, 9, torch.float32, seed=8)
    wide = torch.randn(10, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    bias, y_bias = (wide[::2], None) if strided == "bias" else (bias, wide[::2])
    torch.testing.assert_close(fca_channel_attention_triton(y, weight, bias, y_bias=y_bias),
                               fca_channel_attention_reference(y, weight, bias, y_bias), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_many_chunks_and_gate_steps(monkeypatch, layout):
    """Small chunk limits force many pass-1 chunks (as a 2048^2 tensor gets) and several gate-kernel steps."""
    monkeypatch.setattr(fca_attention, "_TILE", 64)
    monkeypatch.setattr(fca_attention, "_MIN_PROGRAM_ELEMENTS", 64)
    monkeypatch.setattr(fca_attention, "_MAX_BLOCK_K", 4)
    y, weight, bias = make_inputs(2, 5, 29, 41, torch.float32, seed=2)
    y = y.contiguous(memory_format=layout)
    out = torch.full_like(y, float("nan"))
    fca_channel_attention_triton(y, weight, bias, out=out)
    assert not torch.isnan(out).any()
    kernel_error = max_error_vs_float64(out, y, weight, bias)
    torch_error = max_error_vs_float64(fca_channel_attention_reference(y, weight, bias), y, weight, bias)
    assert kernel_error <= 2 * torch_error + torch.finfo(torch.float32).eps, (kernel_error, torch_error)


def test_deterministic_across_runs():
    y, weight, bias = make_inputs(1, 2, 67, 131, torch.float32, seed=1)  # two pass-1 chunks
    assert torch.equal(fca_channel_attention_triton(y, weight, bias), fca_channel_attention_triton(y, weight, bias))


def test_rejects_bad_out():
    y, weight, bias = make_inputs(1, 3, 5, 6, torch.float32)
    with pytest.raises(ValueError):
        fca_channel_attention_triton(y, weight, bias, out=torch.empty(1, 3, 6, 5, device=DEVICE))


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("shape", [(0, 5, 6, 7), (2, 5, 0, 7), (2, 5, 6, 0), (3, 0, 6, 7)])
def test_empty_input_gives_the_references_empty_output(shape, layout):
    """B, C, H or W of 0: the launcher, the op and its fake give the reference's empty z (shape, dtype, strides),
    as PyTorch's own ops do; a batch of 0 through FCABlock's kernel path too."""
    channels = shape[1]
    generator = torch.Generator().manual_seed(10)
    y = torch.randn(shape, generator=generator).to(DEVICE, torch.float16).contiguous(memory_format=layout)
    weight, bias = (torch.randn(size, generator=generator).to(DEVICE, torch.float16)
                    for size in [(channels, channels, 1, 1), (channels,)])
    expected = fca_channel_attention_reference(y, weight, bias, bias)
    for z in (fca_channel_attention_triton(y, weight, bias, y_bias=bias), OP(y, weight, bias, bias)):
        assert (z.shape, z.dtype, z.stride()) == (expected.shape, expected.dtype, expected.stride())
    out = torch.empty_like(y)
    assert fca_channel_attention_triton(y, weight, bias, out=out) is out
    utils = None if DEVICE == "cuda" else ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(OP, (y, weight, bias, bias), test_utils=utils)
    with torch._subclasses.FakeTensorMode() as mode:
        fake = OP(*(mode.from_tensor(t) for t in (y, weight, bias, bias)))
    assert (fake.shape, fake.stride()) == (expected.shape, expected.stride())


def test_fca_block_with_a_batch_of_zero_through_the_op(monkeypatch):
    from guidesr import guidance

    for module in (guidance, fca_attention):
        monkeypatch.setattr(module, "fused_op_applies", lambda *tensors: True)
    block = guidance.FCABlock(6).to(DEVICE).eval()
    with torch.no_grad(), OpRecorder() as recorder:
        z = block(torch.randn(0, 6, 13, 17, device=DEVICE))
    assert "guidesr.fca_channel_attention.default" in recorder.ops and z.shape == (0, 6, 13, 17)


def test_rejects_an_out_whose_elements_share_memory():
    """An `out` expanded along B (stride 0) would have every sample's programs write one buffer: refused, as PyTorch
    refuses such an out= tensor, instead of returning whichever sample was written last."""
    y, weight, bias = make_inputs(2, 3, 5, 6, torch.float32)
    out = torch.empty(1, 3, 5, 6, device=DEVICE).expand(2, 3, 5, 6)
    with pytest.raises(ValueError, match=r"out's elements must not share memory .* \(0, 30, 6, 1\)"):
        fca_channel_attention_triton(y, weight, bias, out=out)
    sliced = torch.full((2, 6, 5, 6), float("nan"), device=DEVICE)[:, ::2]  # strided, but no element shared
    fca_channel_attention_triton(y, weight, bias, out=sliced)
    torch.testing.assert_close(sliced, fca_channel_attention_reference(y, weight, bias), rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_dispatcher_on_cuda_hands_an_empty_batch_to_the_op():
    y, weight, bias = make_inputs(2, 5, 6, 7, torch.float16)
    empty = y[:0]  # sliced before recording: the slice is an op of its own
    with OpRecorder() as recorder, torch.no_grad():
        z = fca_channel_attention(empty, weight, bias, use_kernel=True)
    assert recorder.ops == ["guidesr.fca_channel_attention.default"] and z.shape == (0, 5, 6, 7)


def test_rejects_dtypes_the_kernels_would_round_to_float32():
    y, weight, bias = make_inputs(1, 3, 5, 6, torch.float32)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16.*not torch.float64"):
        fca_channel_attention_triton(y.double(), weight, bias)


def test_rejects_tensors_on_different_devices():
    y, weight, bias = make_inputs(1, 3, 5, 6, torch.float32)
    with pytest.raises(ValueError, match=f"one device, got y on {DEVICE}.*, weight on meta"):
        fca_channel_attention_triton(y, weight.to("meta"), bias)
    with pytest.raises(ValueError, match="y_bias on meta"):
        fca_channel_attention_triton(y, weight, bias, y_bias=bias.to("meta"))
    with pytest.raises(ValueError, match="out on meta"):
        fca_channel_attention_triton(y, weight, bias, out=torch.empty_like(y, device="meta"))


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_launches_on_the_inputs_device_not_the_current_one():
    """Triton launches on the current device: cuda:1 tensors while cuda:0 is current must still run on cuda:1."""
    y, weight, bias = (t.to("cuda:1") for t in make_inputs(2, 17, 37, 53, torch.float16))
    with torch.cuda.device(0):
        z = fca_channel_attention_triton(y, weight, bias, y_bias=bias)
    assert z.device == y.device
    torch.testing.assert_close(z, fca_channel_attention_triton(y, weight, bias, y_bias=bias).to("cuda:1"))
    assert not fca_attention.fused_op_applies(y, weight.to("cuda:0"), bias)


def test_dispatchers_hand_fused_op_applies_every_op_input(monkeypatch):
    """The op has no autograd formula, so a y_bias (conv1's bias) that alone needs a gradient must send the call to the
    reference: fused_op_applies has to see it, from both call sites (what it then decides on CUDA: the gpu test)."""
    from guidesr import guidance

    seen, applies = [], fca_attention.fused_op_applies

    def recording(y, *parameters):
        seen.append(parameters)
        return applies(y, *parameters)

    for module in (guidance, fca_attention):
        monkeypatch.setattr(module, "fused_op_applies", recording)
    y, weight, bias = make_inputs(1, 3, 5, 6, torch.float32)
    y_bias = bias.clone()
    fca_channel_attention(y, weight, bias, y_bias)
    block = guidance.FCABlock(3).to(DEVICE)
    block(y)
    assert any(t is y_bias for t in seen[0]) and any(t is block.conv1.bias for t in seen[1])


@pytest.mark.gpu
def test_reference_runs_when_only_conv1s_bias_needs_a_gradient():
    from guidesr import guidance

    y, weight, bias = make_inputs(2, 6, 13, 17, torch.float32)
    y_bias = bias.clone().requires_grad_(True)
    fca_channel_attention(y, weight, bias, y_bias, use_kernel=True).sum().backward()
    expected = torch.autograd.grad(fca_channel_attention_reference(y, weight, bias, y_bias).sum(), y_bias)[0]
    torch.testing.assert_close(y_bias.grad, expected)
    block = guidance.FCABlock(6).to(DEVICE).requires_grad_(False)
    block.conv1.bias.requires_grad_(True)
    block(y).sum().backward()
    assert block.conv1.bias.grad is not None and torch.isfinite(block.conv1.bias.grad).all()


def test_custom_op_registered_with_fake_impl():
    y, weight, bias = make_inputs(2, 5, 6, 7, torch.float16)
    y = y.to(memory_format=torch.channels_last)
    # Under the interpreter the AOT checks would trace the launcher with fake tensors: GPU only.
    utils = None if DEVICE == "cuda" else ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(OP, (y, weight, bias, None), test_utils=utils)
    torch.library.opcheck(OP, (y, weight, bias, bias), test_utils=utils)
    with torch._subclasses.FakeTensorMode() as mode:
        fake = OP(mode.from_tensor(y), mode.from_tensor(weight), mode.from_tensor(bias), None)
    assert (fake.shape, fake.dtype, fake.stride()) == (y.shape, y.dtype, y.stride())


def test_dispatcher_runs_reference_on_cpu():
    y, weight, bias = (t.cpu() for t in make_inputs(2, 5, 6, 7, torch.float32))
    with OpRecorder() as recorder:
        z = fca_channel_attention(y, weight, bias, use_kernel=True)
    assert "guidesr.fca_channel_attention.default" not in recorder.ops
    assert torch.equal(z, fca_channel_attention_reference(y, weight, bias))


@pytest.mark.gpu
def test_dispatcher_on_cuda_uses_op_only_without_grad():
    y, weight, bias = make_inputs(2, 17, 37, 53, torch.float16)
    with OpRecorder() as recorder, torch.no_grad():
        z = fca_channel_attention(y, weight, bias, use_kernel=True)
    assert recorder.ops == ["guidesr.fca_channel_attention.default"]
    assert torch.equal(z, fca_channel_attention_triton(y, weight, bias))
    with OpRecorder() as recorder:
        fca_channel_attention(y, weight, bias, use_kernel=False)
    assert "guidesr.fca_channel_attention.default" not in recorder.ops

    y.requires_grad_(True)
    z = fca_channel_attention(y, weight, bias, use_kernel=True)
    z.float().sum().backward()  # the reference ran: it has a gradient
    assert y.grad is not None and torch.isfinite(y.grad).all()


@pytest.mark.gpu
def test_torch_compile_calls_the_op():
    y, weight, bias = make_inputs(2, 17, 37, 53, torch.float16)

    @torch.compile(fullgraph=True)
    def attention(y, weight, bias):
        return fca_channel_attention(y, weight, bias, use_kernel=True) + 1

    with torch.no_grad():
        compiled = attention(y, weight, bias)
    torch.testing.assert_close(compiled, fca_channel_attention_triton(y, weight, bias) + 1)


@pytest.mark.gpu
def test_onnx_export_records_the_reference():
    pytest.importorskip("onnxscript")

    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Conv2d(8, 8, 1).to(DEVICE)

        def forward(self, y):
            return fca_channel_attention(y, self.proj.weight, self.proj.bias, use_kernel=True)

    with torch.no_grad():
        program = torch.onnx.export(Attention(), (torch.randn(1, 8, 12, 16, device=DEVICE),), dynamo=True)
    op_types = {node.op_type for node in program.model_proto.graph.node}
    assert "Sigmoid" in op_types and not any("fca" in t for t in op_types), op_types


def test_fca_block_hands_conv1s_bias_to_the_op(monkeypatch):
    """FCABlock's kernel path (conv1 without its bias, the bias passed as y_bias) computes the block's
    reference path. The op is made to apply to CPU tensors, where the interpreter runs its kernels."""
    from guidesr import guidance

    for module in (guidance, fca_attention):
        monkeypatch.setattr(module, "fused_op_applies", lambda *tensors: True)
    torch.manual_seed(6)
    block = guidance.FCABlock(6).to(DEVICE).eval()
    torch.nn.init.normal_(block.conv1.bias, std=0.5)  # a bias that matters
    x = torch.randn(2, 6, 13, 17, device=DEVICE)
    with torch.no_grad(), OpRecorder() as recorder:
        fused = block(x)
    assert "guidesr.fca_channel_attention.default" in recorder.ops
    block.use_kernel = False
    with torch.no_grad():
        reference = block(x)
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5)
