"""Real-ESRGAN degradation pipeline: each stage does what it claims, JPEG is real JPEG,
and the whole pipeline is reproducible from its generator."""

import io
import math
import weakref
from dataclasses import replace

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from guidesr.degradations import (
    DegradationConfig,
    degrade,
    filter2d,
    gaussian_noise,
    jpeg_compress,
    jpeg_quant_tables,
    poisson_noise,
    random_blur_kernels,
    random_noise,
    sinc_kernels,
    upsample_lr,
)


def photo(name: str = "astronaut", size: tuple[int, int] = (64, 64), top: int = 0, left: int = 0) -> torch.Tensor:
    """A crop of a real photograph, (1, 3, H, W) in [0, 1]."""
    array = getattr(skimage.data, name)()[top : top + size[0], left : left + size[1]]
    return torch.from_numpy(array.copy()).permute(2, 0, 1)[None].float() / 255.0


def high_frequency_energy(images: torch.Tensor) -> float:
    """Spectral energy above a quarter of the sampling rate; mean removed and Hann-windowed
    so that the FFT's wrap-around edge does not count as detail."""
    window = torch.outer(torch.hann_window(images.shape[-2], periodic=False),
                         torch.hann_window(images.shape[-1], periodic=False))
    spectrum = torch.fft.fft2((images - images.mean(dim=(-2, -1), keepdim=True)) * window).abs() ** 2
    fy = torch.fft.fftfreq(images.shape[-2]).abs().view(-1, 1)
    fx = torch.fft.fftfreq(images.shape[-1]).abs().view(1, -1)
    return float(spectrum[..., (fy > 0.25) | (fx > 0.25)].sum())


def blockiness(images: torch.Tensor) -> float:
    """Mean |horizontal + vertical step| across 8-px block boundaries divided by the mean
    step inside blocks: ~1 for natural images, > 1 where 8x8 blocks show."""
    gray = images.mean(dim=1)
    steps_x = (gray[..., :, 1:] - gray[..., :, :-1]).abs()  # step between column j and j+1
    steps_y = (gray[..., 1:, :] - gray[..., :-1, :]).abs()
    across_x = torch.arange(steps_x.shape[-1]) % 8 == 7
    across_y = torch.arange(steps_y.shape[-2]) % 8 == 7
    boundary = torch.cat([steps_x[..., across_x].flatten(), steps_y[..., across_y, :].flatten()]).mean()
    inside = torch.cat([steps_x[..., ~across_x].flatten(), steps_y[..., ~across_y, :].flatten()]).mean()
    return float(boundary / inside)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255.0**2 / np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


def test_default_config_is_real_esrgan_x4plus():
    c = DegradationConfig()
    assert c.kernel_sizes == (7, 9, 11, 13, 15, 17, 19, 21)
    assert c.kernel_prob == (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    assert (c.sinc_prob, c.sinc_prob2, c.second_blur_prob, c.final_sinc_prob) == (0.1, 0.1, 0.8, 0.8)
    assert (c.blur_sigma, c.blur_sigma2) == ((0.2, 3.0), (0.2, 1.5))
    assert (c.resize_prob, c.resize_range, c.resize_range2) == ((0.2, 0.7, 0.1), (0.15, 1.5), (0.3, 1.2))
    assert ((c.noise_range, c.noise_range2, c.poisson_scale_range, c.poisson_scale_range2)
            == ((1, 30), (1, 25), (0.05, 3), (0.05, 2.5)))
    assert (c.jpeg_range, c.jpeg_range2, c.scale, c.second_order_prob) == ((30, 95), (30, 95), 4, 1.0)
    with pytest.raises(ValueError, match="odd"):
        DegradationConfig(kernel_sizes=(8,))
    with pytest.raises(ValueError, match="second_order_prob"):
        DegradationConfig(second_order_prob=1.5)


def test_kernels_sum_to_one_and_respect_their_size():
    g = torch.Generator().manual_seed(0)
    kernels = random_blur_kernels(64, (7,), DegradationConfig().kernel_types, DegradationConfig().kernel_prob, 0.1,
                                  (0.2, 3.0), (0.5, 4.0), (1.0, 2.0), g)
    assert kernels.shape == (64, 21, 21)
    torch.testing.assert_close(kernels.sum(dim=(1, 2)), torch.ones(64, dtype=torch.float64))
    outside = torch.ones(21, 21, dtype=torch.bool)
    outside[7:14, 7:14] = False
    assert kernels[:, outside].abs().max() == 0  # 7x7 kernels zero-padded to 21x21
    assert not torch.allclose(kernels[0], kernels[1])  # one kernel per image

    sinc = sinc_kernels(torch.tensor([torch.pi / 3]), torch.tensor([21]))[0]
    torch.testing.assert_close(sinc, sinc.T)
    assert sinc.min() < 0  # the ringing lobes that make sinc artefacts


def test_blur_lowers_high_frequency_energy():
    image = photo(size=(64, 64), top=100, left=180)
    g = torch.Generator().manual_seed(0)
    gaussian = random_blur_kernels(1, (21,), ("iso",), (1.0,), 0.0, (2.0, 2.0), (0.5, 4.0), (1.0, 2.0), g)
    blurred = filter2d(image, gaussian)
    assert blurred.shape == image.shape
    assert high_frequency_energy(blurred) < 0.05 * high_frequency_energy(image)
    # Blur keeps the mean (kernels sum to 1).
    assert abs(float(blurred.mean() - image.mean())) < 0.01


def test_gaussian_noise_raises_residual_variance_as_specified():
    image = photo()
    g = torch.Generator().manual_seed(0)
    batch = image.repeat(2, 1, 1, 1)
    noise = gaussian_noise(batch, torch.tensor([20.0, 20.0]), torch.tensor([False, True]), g)
    assert noise.std().item() == pytest.approx(20 / 255, rel=0.05)
    assert not torch.equal(noise[0, 0], noise[0, 1])  # colour: channels independent
    assert torch.equal(noise[1, 0], noise[1, 1]) and torch.equal(noise[1, 1], noise[1, 2])  # grey: one field

    noisy = random_noise(batch, 1.0, (20.0, 20.0), (1.0, 1.0), 0.0, g)
    assert noisy.min() >= 0 and noisy.max() <= 1
    assert (noisy - batch).var() > 0.5 * (20 / 255) ** 2


def test_poisson_noise_is_signal_dependent():
    image = photo(size=(128, 128), top=200, left=200)
    g = torch.Generator().manual_seed(0)
    noise = poisson_noise(image, torch.tensor([1.0]), torch.tensor([False]), g)
    # Shot noise: variance = signal / photon count; a photo has >128 distinct 8-bit values,
    # so Real-ESRGAN's count is 256.
    signal = (image * 255).round() / 255
    assert float((noise**2).mean() / signal.mean()) == pytest.approx(1 / 256, rel=0.1)
    dark, bright = signal < 0.2, signal > 0.6
    assert dark.sum() > 500 and bright.sum() > 500
    assert noise[bright].var() > 2 * noise[dark].var()
    gray = poisson_noise(image, torch.tensor([1.0]), torch.tensor([True]), g)
    assert torch.equal(gray[0, 0], gray[0, 2])


@pytest.mark.parametrize("quality", [10, 50, 75, 95, 100])
def test_jpeg_quant_tables_match_libjpeg(quality):
    array = skimage.data.coffee()[:64, :64]
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "JPEG", quality=quality)
    tables = Image.open(io.BytesIO(buffer.getvalue())).quantization
    luma, chroma = jpeg_quant_tables(torch.tensor([quality]))
    assert luma[0].flatten().int().tolist() == list(tables[0])
    assert chroma[0].flatten().int().tolist() == list(tables[1])


@pytest.mark.parametrize("quality", [30, 60, 90])
def test_jpeg_matches_pil(quality):
    # 100x132: not a multiple of the 16-px MCU, so edge padding is exercised too.
    array = skimage.data.astronaut()[20:120, 150:282]
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "JPEG", quality=quality)
    pil = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    ours = jpeg_compress(photo(size=(100, 132), top=20, left=150), torch.tensor([quality]))
    ours = (ours[0].permute(1, 2, 0) * 255).round().byte().numpy()
    assert psnr(ours, pil) > 40.0  # both decoders differ only in DCT arithmetic and rounding
    assert psnr(ours, array) == pytest.approx(psnr(pil, array), abs=0.3)  # and lose the same information


def test_jpeg_leaves_8x8_block_artifacts():
    image = photo(size=(96, 96), top=300, left=300)
    compressed = jpeg_compress(image, torch.tensor([15]))
    assert blockiness(image) < 1.15
    assert blockiness(compressed) > 1.3
    assert torch.equal(compressed, (compressed * 255).round() / 255)  # decoded to 8 bits
    # Higher quality, fewer artefacts: per-image qualities in one batch.
    both = jpeg_compress(image.repeat(2, 1, 1, 1), torch.tensor([15, 95]))
    assert torch.equal(both[0], compressed[0])
    assert (both[1] - image[0]).abs().mean() < (both[0] - image[0]).abs().mean()


def hr_batch() -> torch.Tensor:
    return torch.cat([photo("astronaut", top=100, left=180), photo("coffee", top=100, left=200),
                      photo("chelsea", top=80, left=150)])


def test_degrade_shapes_range_and_8bit_values():
    hr = hr_batch()
    lr = degrade(hr, DegradationConfig(), torch.Generator().manual_seed(0))
    assert lr.shape == (3, 3, 16, 16) and lr.dtype == torch.float32
    assert lr.min() >= 0 and lr.max() <= 1
    assert torch.equal(lr, (lr * 255).round() / 255)
    up = upsample_lr(lr, (64, 64))
    assert up.shape == hr.shape and up.min() >= 0 and up.max() <= 1
    # Degraded, not just downscaled: far from the clean area-downsampled image.
    clean = torch.nn.functional.interpolate(hr, scale_factor=0.25, mode="area")
    assert (lr - clean).abs().mean() > 0.01
    with pytest.raises(ValueError, match="multiple of the scale"):
        degrade(hr[..., :62], DegradationConfig(), torch.Generator())


def test_degrade_is_reproducible_from_the_seed():
    hr = hr_batch()
    first = degrade(hr, DegradationConfig(), torch.Generator().manual_seed(1234))
    again = degrade(hr, DegradationConfig(), torch.Generator().manual_seed(1234))
    other = degrade(hr, DegradationConfig(), torch.Generator().manual_seed(1235))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_the_drawn_parameters_do_not_depend_on_the_pixels():
    """Poisson noise takes a number of random draws that depends on its input; drawn from the parameters' generator,
    a one-level change of one pixel (another CPU's kernels) re-drew every later parameter of the image (the evaluation
    inputs of 2026-11-26 and 2026-11-27 differed by up to 1 dB per draw this way). Here the two batches take the same
    number of draws from the generator, so every parameter after the noise is the same."""
    config = DegradationConfig(gaussian_noise_prob=0.0, gaussian_noise_prob2=0.0)  # Poisson noise in both stages
    hr = hr_batch()
    nudged = hr.clone()
    nudged[0, :, 10, 10] = 1.0 - nudged[0, :, 10, 10]
    states = []
    for batch in (hr, nudged, hr * 0.25):
        generator = torch.Generator().manual_seed(7)
        degrade(batch, config, generator)
        states.append(generator.get_state())
    assert torch.equal(states[0], states[1]) and torch.equal(states[0], states[2])


def test_second_stage_is_applied_to_whole_batches_at_its_probability():
    # Below probability 1 one draw decides the stage, so a batch that skips it equals the
    # probability-0 result and one that takes it equals the (almost) probability-1 result.
    hr = hr_batch()
    outcomes = []
    for seed in range(24):
        run = {p: degrade(hr, DegradationConfig(second_order_prob=p), torch.Generator().manual_seed(seed))
               for p in (0.0, 0.5, 0.99999)}
        skipped, applied = torch.equal(run[0.5], run[0.0]), torch.equal(run[0.5], run[0.99999])
        assert skipped != applied, seed
        assert not torch.equal(run[0.0], run[0.99999]), seed
        outcomes.append(applied)
    assert 6 <= sum(outcomes) <= 18, outcomes  # Binomial(24, 0.5): outside this range p < 0.03


def test_every_stage_runs_on_tiny_images_without_failing():
    # Strong down-scaling of a 32 px crop leaves ~2 px in stage 2: filters must cope.
    hr = photo(size=(32, 32)).repeat(4, 1, 1, 1)
    config = DegradationConfig(resize_prob=(0, 1, 0), resize_prob2=(0, 1, 0), second_blur_prob=1.0)
    for seed in range(3):
        lr = degrade(hr, config, torch.Generator().manual_seed(seed))
        assert lr.shape == (4, 3, 8, 8) and torch.isfinite(lr).all()


class DeviceSyncs(TorchFunctionMode):
    """Records what would synchronise the host with a CUDA batch's device: host reads (`.item()`,
    `bool()`, `int()`, `float()`, `.tolist()`, ops whose output size or checks depend on values) of
    tensors on the batch's device, and blocking uploads of Python data to a named device
    (`torch.tensor(data, device=...)`, `new_tensor` of a device tensor). Reads of host tensors are
    recorded apart. On the CPU both are CPU tensors, so a tensor counts as on the batch's device when it
    is the batch, was made by a call naming a device (the device of the batch or of a generator on it),
    or was computed from such a tensor; a draw from a CPU generator that names no device is a host tensor."""

    READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__,
             torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.numpy, torch.Tensor.cpu,
             torch.nonzero, torch.Tensor.nonzero, torch.masked_select, torch.Tensor.masked_select,
             torch.unique, torch.Tensor.unique, torch.multinomial, torch.Tensor.multinomial}

    def __init__(self, batch: torch.Tensor) -> None:
        super().__init__()
        self.on_device: dict[int, weakref.ref] = {}
        self.device_reads: list[str] = []
        self.uploads: list[str] = []
        self.host_reads: list[str] = []
        self._mark(batch)

    def _mark(self, tensor: torch.Tensor) -> None:
        self.on_device[id(tensor)] = weakref.ref(tensor)

    def _is_on_device(self, tensor: torch.Tensor) -> bool:
        ref = self.on_device.get(id(tensor))
        return ref is not None and ref() is tensor

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = tree_leaves((args, kwargs))
        tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
        from_device = any(self._is_on_device(t) for t in tensors)
        names_device = kwargs.get("device") is not None or any(isinstance(leaf, torch.device) for leaf in leaves)
        if func in self.READS:
            (self.device_reads if from_device else self.host_reads).append(func.__name__)
        uploads_data = func in (torch.tensor, torch.as_tensor) and names_device
        if uploads_data or (func is torch.Tensor.new_tensor and from_device):
            self.uploads.append(func.__name__)
        result = func(*args, **kwargs)
        if from_device or names_device:
            for tensor in tree_leaves(result):
                if isinstance(tensor, torch.Tensor):
                    self._mark(tensor)
            if from_device and tensors and (func.__name__.endswith("_") or func.__name__ == "__setitem__"):
                self._mark(tensors[0])
        return result


@pytest.mark.parametrize("second_order_prob", [1.0, 0.5])
def test_degrade_reads_no_value_from_the_batch_device(second_order_prob):
    """On CUDA every read of a device tensor into a Python value, and every blocking upload, stalls the host
    until the GPU has caught up. The batch-level choices (resize kind, scale and mode, second stage, order
    of the final stage) are read on the host from CPU draws, nothing is read from the batch's device, and
    parameters and constants reach it by asynchronous copies."""
    hr = hr_batch()
    config = DegradationConfig(second_order_prob=second_order_prob)
    expected = degrade(hr, config, torch.Generator().manual_seed(3))
    with DeviceSyncs(hr) as syncs:
        lr = degrade(hr, config, torch.Generator().manual_seed(3))
    assert torch.equal(lr, expected)  # counting changes nothing
    assert syncs.device_reads == []
    assert syncs.uploads == []
    assert len(syncs.host_reads) >= 7  # the counter sees the host reads: 2 scales x 2 reads + 3 modes + order


@pytest.mark.gpu
def test_degrade_on_cuda_is_reproducible_and_jpeg_agrees_with_cpu():
    hr = hr_batch().cuda()
    first = degrade(hr, DegradationConfig(), torch.Generator().manual_seed(7))
    again = degrade(hr, DegradationConfig(), torch.Generator().manual_seed(7))
    assert first.is_cuda and torch.equal(first, again)
    cpu = jpeg_compress(hr.cpu(), torch.tensor([40, 60, 80]))
    gpu = jpeg_compress(hr, torch.tensor([40, 60, 80], device="cuda")).cpu()
    assert (cpu - gpu).abs().max() <= 2 / 255 + 1e-6  # float DCT rounding may flip a level (+ fp32 rounding)
    with pytest.raises(ValueError, match="generator is on"):
        degrade(hr, DegradationConfig(), torch.Generator(device="cuda"))


@pytest.mark.gpu
def test_a_seed_draws_the_same_parameters_on_the_cpu_and_on_cuda():
    """Both devices take the noise fields from a generator of their own, so the parameters' generator ends in the same
    state: every kernel, strength, quality and resize of a seed is the same on either device."""
    config = DegradationConfig(gaussian_noise_prob=0.5, second_order_prob=0.5)
    for seed in range(4):
        states = []
        for device in ("cpu", "cuda"):
            generator = torch.Generator().manual_seed(seed)
            degrade(hr_batch().to(device), config, generator)
            states.append(generator.get_state())
        assert torch.equal(*states), seed


@pytest.mark.gpu
@pytest.mark.parametrize("second_order_prob", [1.0, 0.5])
def test_degrading_a_cuda_batch_never_synchronises(second_order_prob):
    hr = hr_batch().cuda()
    config = DegradationConfig(second_order_prob=second_order_prob)
    degrade(hr, config, torch.Generator().manual_seed(0))  # first use: CUDA context, kernels, pinned memory pool
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        lrs = [degrade(hr, config, torch.Generator().manual_seed(seed)) for seed in range(8)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(lr.is_cuda and lr.shape == (3, 3, 16, 16) for lr in lrs)


def _kernels(batch, kernel_type, sigma, beta_g=(0.5, 4.0), beta_p=(1.0, 2.0), sizes=(21,), seed=0):
    return random_blur_kernels(batch, sizes, (kernel_type,), (1.0,), 0.0, sigma, beta_g, beta_p,
                               torch.Generator().manual_seed(seed))


def test_blur_kernels_follow_their_formulas():
    """With equal standard deviations every rotation gives the same radial kernel, so each family can be
    checked against its formula in float64: Gaussian exp(-r^2 / 2 s^2), plateau 1 / (1 + (r^2 / s^2)^beta)."""
    axis = torch.arange(-10, 11, dtype=torch.float64)
    r2 = axis.view(-1, 1) ** 2 + axis.view(1, -1) ** 2
    s = torch.tensor(1.3).item()  # the float32 value the sampler draws
    gaussian = torch.exp(-r2 / (2 * s**2))
    plateau = 1 / (1 + r2 / s**2)
    for kind, beta_g, beta_p, expected in (("aniso", (0.5, 4.0), (1.0, 2.0), gaussian),
                                           ("generalized_aniso", (1.0, 1.0), (1.0, 2.0), gaussian),
                                           ("plateau_aniso", (0.5, 4.0), (1.0, 1.0), plateau)):
        kernels = _kernels(16, kind, (s, s), beta_g, beta_p)  # 16 random rotations
        torch.testing.assert_close(kernels, (expected / expected.sum()).expand(16, 21, 21), rtol=0, atol=1e-12,
                                   msg=kind)


def test_isotropic_kernels_are_symmetric_and_anisotropic_ones_are_not():
    iso = _kernels(32, "iso", (0.5, 3.0))
    torch.testing.assert_close(iso, iso.transpose(1, 2), rtol=0, atol=1e-15)
    torch.testing.assert_close(iso, iso.flip(1), rtol=0, atol=1e-15)
    aniso = _kernels(32, "aniso", (0.5, 3.0))
    assert (aniso - aniso.transpose(1, 2)).abs().amax(dim=(1, 2)).gt(1e-3).sum() > 16


def test_sinc_cutoff_range_depends_on_the_kernel_size():
    """Real-ESRGAN: cut-off in [pi/3, pi] below 13 taps, [pi/5, pi] from 13 up. The centre tap of a normalised
    sinc kernel grows with the cut-off, so it bounds the cut-off from below."""
    for size, low in ((7, math.pi / 3), (11, math.pi / 3), (13, math.pi / 5), (21, math.pi / 5)):
        kernels = random_blur_kernels(400, (size,), ("iso",), (1.0,), 1.0, (1.0, 2.0), (0.5, 4.0), (1.0, 2.0),
                                      torch.Generator().manual_seed(size))
        centre = kernels[:, 10, 10]
        at_pi_3 = sinc_kernels(torch.tensor([math.pi / 3]), torch.tensor([size]))[0, 10, 10]
        at_low = sinc_kernels(torch.tensor([low]), torch.tensor([size]))[0, 10, 10]
        assert centre.min() >= at_low - 1e-12, size
        assert (centre < at_pi_3 - 1e-9).any() == (size >= 13), size


@pytest.mark.parametrize("kernel_size,mode", [(5, "reflect"), (21, "edge")])
def test_filter2d_gives_each_image_its_own_kernel(kernel_size, mode):
    """Batch 3 x 3 channels, 9x13 images, against a direct float64 correlation; a 21-tap kernel is wider than
    the image can reflect, so its border is replicated."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 9, 13, generator=g, dtype=torch.float64)
    kernels = torch.rand(3, kernel_size, kernel_size, generator=g, dtype=torch.float64)
    pad = kernel_size // 2
    expected = np.zeros(images.shape)
    for b in range(3):
        for c in range(3):
            padded = np.pad(images[b, c].numpy(), pad, mode=mode)
            for dy in range(kernel_size):
                for dx in range(kernel_size):
                    expected[b, c] += kernels[b, dy, dx].item() * padded[dy : dy + 9, dx : dx + 13]
    torch.testing.assert_close(filter2d(images, kernels), torch.from_numpy(expected), rtol=0, atol=1e-12)


def test_resize_kind_follows_its_probabilities():
    from guidesr.degradations import _random_scale

    g = torch.Generator().manual_seed(0)
    scales = np.array([_random_scale((0.2, 0.7, 0.1), (0.15, 1.5), g) for _ in range(3000)])
    up, down, keep = (scales > 1).mean(), (scales < 1).mean(), (scales == 1).mean()
    assert abs(up - 0.2) < 0.03 and abs(down - 0.7) < 0.03 and abs(keep - 0.1) < 0.03, (up, down, keep)
    assert scales.min() >= 0.15 and scales.max() <= 1.5


def test_second_stage_resizes_relative_to_the_lr_size(monkeypatch):
    """Real-ESRGAN's second resize scales the LR size (HR / scale), the first the HR size."""
    import guidesr.degradations as degradations

    sizes = []
    real_resize = degradations.resize
    monkeypatch.setattr(degradations, "resize",
                        lambda images, size, mode: sizes.append(size) or real_resize(images, size, mode))
    keep = DegradationConfig(resize_prob=(0, 0, 1), resize_prob2=(0, 0, 1))
    degrade(photo(size=(64, 48)).repeat(2, 1, 1, 1), keep, torch.Generator().manual_seed(0))
    assert sizes == [(64, 48), (16, 12), (16, 12)]


def test_second_blur_happens_at_its_probability():
    """The second-stage kernel parameters are drawn either way (so the random stream is the same); they change
    the output only when the second blur is applied."""
    hr = hr_batch()

    def run(**changes):
        config = DegradationConfig(sinc_prob2=0.0, kernel_types=("iso",) * 6, **changes)
        return degrade(hr, config, torch.Generator().manual_seed(5))

    assert torch.equal(run(second_blur_prob=0.0, blur_sigma2=(0.2, 0.3)),
                       run(second_blur_prob=0.0, blur_sigma2=(1.4, 1.5)))
    assert not torch.equal(run(second_blur_prob=1.0, blur_sigma2=(0.2, 0.3)),
                           run(second_blur_prob=1.0, blur_sigma2=(1.4, 1.5)))


def test_grey_poisson_noise_is_the_shot_noise_of_the_luma():
    image = photo(size=(128, 128), top=200, left=200)
    image[:, 0] = 0  # no red: the luma is not any one channel
    noise = poisson_noise(image, torch.tensor([1.0]), torch.tensor([True]), torch.Generator().manual_seed(0))
    luma = (0.587 * image[:, 1] + 0.114 * image[:, 2])
    assert torch.equal(noise[0, 0], noise[0, 1])
    assert float((noise[0, 0] ** 2).mean() / luma.mean()) == pytest.approx(1 / 256, rel=0.15)


# Per stage, a setting and two values of it that change what a fixed seed gives (the seed's other draws stay the
# same): a stage that is skipped, a probability that is ignored, or the other stage's setting read in its place leaves
# the output unchanged.
STAGE_SETTINGS = {
    "first blur": ("blur_sigma", (0.2, 0.2), (3.0, 3.0)),
    "first resize": ("resize_prob", (1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "first noise": ("noise_range", (1.0, 1.0), (30.0, 30.0)),
    "first noise kind": ("gaussian_noise_prob", 0.0, 1.0),
    "first grey noise": ("gray_noise_prob", 0.0, 1.0),
    "first JPEG": ("jpeg_range", (30.0, 30.0), (95.0, 95.0)),
    "second blur": ("blur_sigma2", (0.2, 0.2), (1.5, 1.5)),
    "second resize": ("resize_prob2", (1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "second noise": ("noise_range2", (1.0, 1.0), (25.0, 25.0)),
    "second noise kind": ("gaussian_noise_prob2", 0.0, 1.0),
    "second grey noise": ("gray_noise_prob2", 0.0, 1.0),
    "final sinc": ("final_sinc_prob", 0.0, 1.0),
    "final JPEG": ("jpeg_range2", (30.0, 30.0), (95.0, 95.0)),
}


@pytest.mark.parametrize("stage", STAGE_SETTINGS)
def test_every_stage_reads_its_own_settings(stage):
    field, low, high = STAGE_SETTINGS[stage]
    base = DegradationConfig(sinc_prob=0.0, sinc_prob2=0.0, second_blur_prob=1.0, kernel_types=("iso",) * 6,
                             gaussian_noise_prob=1.0, gaussian_noise_prob2=1.0)  # noise_range is Gaussian noise's
    hr, configs = hr_batch(), [replace(base, **{field: value}) for value in (low, high)]
    for seed in (0, 1):  # the final stage's two orders: JPEG then resize, resize then JPEG
        runs = [degrade(hr, config, torch.Generator().manual_seed(seed)) for config in configs]
        assert not torch.equal(*runs), (stage, seed)


def test_the_final_resize_and_jpeg_come_in_either_order(monkeypatch):
    """Real-ESRGAN's final stage is resize (+ sinc) then JPEG, or JPEG then resize, each with probability 1/2 per
    batch; the first stage always compresses after its resize and the second stage has no JPEG."""
    import guidesr.degradations as degradations

    calls = []
    real_resize, real_jpeg = degradations.resize, degradations.random_jpeg
    monkeypatch.setattr(degradations, "resize",
                        lambda images, size, mode: calls.append("resize") or real_resize(images, size, mode))
    monkeypatch.setattr(degradations, "random_jpeg",
                        lambda images, jpeg_range, generator: calls.append("jpeg") or real_jpeg(images, jpeg_range,
                                                                                                 generator))
    hr = photo(size=(32, 32)).repeat(2, 1, 1, 1)
    jpeg_last = []
    for seed in range(16):
        calls.clear()
        degrade(hr, DegradationConfig(), torch.Generator().manual_seed(seed))
        assert calls[:3] == ["resize", "jpeg", "resize"] and sorted(calls[3:]) == ["jpeg", "resize"], (seed, calls)
        jpeg_last.append(calls[-1] == "jpeg")
    assert 3 <= sum(jpeg_last) <= 13, jpeg_last  # Binomial(16, 1/2): outside this range p < 0.005
