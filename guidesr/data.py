"""HR image sources and the (degraded input, ground truth) batches GuideSR trains on.

* `HRImageFolder`: every PNG / JPEG / WebP / TIFF / BMP under a folder, recursively (ImageNet, FFHQ,
  DIV2K, ... as the paper uses).
* `SampleImages`: the colour photographs that ship inside scikit-image, so that training
  and evaluation can run on a machine with no data set at all. `SAMPLE_EVAL` is a fixed
  held-out subset that `SampleImages("train")` never yields.
* `TrainingPairs`: an endless, seeded stream of batches: random HR crops with random
  horizontal flips (done here, per image, on the CPU, in DataLoader workers if asked) -> the
  Real-ESRGAN degradation of `guidesr.degradations` (batched, on the training device) -> bicubic
  upsampling back to HR size. Batch i depends only on (seed, rank, i), so resumed runs are
  exact. `eval_pairs` gives the deterministic counterpart for validation.

Images are read by the runtime's reader (runtime.imageio: EXIF orientation, 16 bits kept), as RGB,
transparency composited onto white (see `load_image`). Tensors handed to the
model are NCHW float32 in [-1, 1].
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from runtime.cli import plural
from runtime.imageio import IMAGE_EXTENSIONS, ImageReadError, ImageTooLargeError, check_image_header, read_image

from guidesr.degradations import DegradationConfig, degrade, upsample_lr

# Colour photographs shipped in scikit-image's own data folder (no download), by file name.
# The stereo pair stays together on the training side: its two views are near-duplicates,
# and one of them in the evaluation set would leak the other's content into training.
SAMPLE_FILES: dict[str, str] = {
    "astronaut": "astronaut.png",  # portrait, 512x512
    "rocket": "rocket.jpg",  # rocket on its launch pad, 427x640
    "motorcycle_left": "motorcycle_left.png",  # Middlebury stereo pair, 500x741
    "motorcycle_right": "motorcycle_right.png",
    "immunohistochemistry": "ihc.png",  # stained-tissue micrograph, 512x512
    "retina": "retina.jpg",  # fundus photograph, 1411x1411
    "hubble_deep_field": "hubble_deep_field.jpg",  # telescope image, 872x1000
    "coffee": "coffee.png",  # cup of coffee, 400x600
    "chelsea": "chelsea.png",  # cat, 300x451
}
SAMPLE_EVAL: tuple[str, ...] = ("coffee", "chelsea")
SAMPLE_TRAIN: tuple[str, ...] = tuple(name for name in SAMPLE_FILES if name not in SAMPLE_EVAL)


def _max_megapixels() -> float | None:
    """Pillow's own refusal (twice its warning limit), so that training reads what Pillow would."""
    return None if Image.MAX_IMAGE_PIXELS is None else 2 * Image.MAX_IMAGE_PIXELS / 1e6


def _training_reason(error: ImageReadError) -> str:
    """Why training cannot read an image; over the pixel limit, which limit (training has no option for it)."""
    if isinstance(error, ImageTooLargeError):
        return (f"{error.over_limit} (Pillow's decompression-bomb limit, 2 x PIL.Image.MAX_IMAGE_PIXELS, which training "
                f"keeps)")
    return error.reason


def load_image(path: str | Path) -> torch.Tensor:
    """Read an image file as a (3, H, W) float32 tensor in [0, 1], through the runtime's reader
    (`runtime.imageio.read_image`: EXIF orientation, 16-bit grey and colour at their real range,
    float and wider-than-16-bit images refused), up to Pillow's decompression-bomb limit.

    * Grey is repeated over the three channels.
    * Transparent images (RGBA, LA, PA, or P / L / RGB with a transparent colour) are composited onto
      white, as transparent logos and cut-outs are usually shown; the colour stored under
      transparent pixels is arbitrary (often black or leftovers of editing) and is not trained on.

    Raises `ValueError` naming the file if it cannot be read, so that one broken file in a large
    folder is easy to find.
    """
    try:
        array, info = read_image(path, max_megapixels=_max_megapixels())
    except ImageReadError as error:
        raise ValueError(f"cannot read image {error.path}: {_training_reason(error)}") from error
    image = torch.from_numpy(array).permute(2, 0, 1)  # [C, H, W]
    if info.has_alpha:
        colour, alpha = image[:-1], image[-1:]
        image = colour * alpha + (1.0 - alpha)
    return image.expand(3, -1, -1).contiguous() if image.shape[0] == 1 else image.contiguous()


def check_crop_sizes(paths: Sequence[Path], crop_size: int) -> None:
    """Raise one `ValueError` listing every file in `paths` that `load_image` would refuse from its
    header (`runtime.imageio.check_image_header`: unreadable, unsupported format or pixels, animated
    or multi-page, over the pixel limit) or that is too small for `crop_size` x `crop_size` crops
    (the rule of `random_crop_flip` and `center_crop`).

    Only headers are read (no pixel is decoded), so a file whose header is sound but whose pixel
    data is corrupt is found only when it is loaded.
    """
    problems = []
    limit = _max_megapixels()
    for path in paths:
        try:
            width, height = check_image_header(path, max_megapixels=limit)
        except ImageReadError as error:
            problems.append(f"{path}: cannot read image: {_training_reason(error)}")
            continue
        if not _fits_crop(height, width, crop_size):
            problems.append(f"{path}: {width}x{height} (width x height) is too small")
    if problems:
        listing = "\n  ".join(problems)
        raise ValueError(
            f"{len(problems)} of {plural(len(paths), 'image')} cannot be used for {crop_size}x{crop_size} crops "
            f"(each side needs at least {crop_size // 2 + 1} px):\n  {listing}"
        )


class HRImageFolder(Dataset):
    """Every image file under `root` that `runtime.upscale` reads too (PNG / JPEG / WebP / TIFF / BMP:
    `runtime.imageio.IMAGE_EXTENSIONS`, any letter case), recursively, in sorted path order; item i is
    `load_image(paths[i])`.

    With `crop_size`, every file's header is read here and one `ValueError` lists every file
    that is unreadable or too small for `crop_size` crops (`check_crop_sizes`), so that a bad
    file stops a run before it starts rather than when a random batch first picks it.
    """

    def __init__(self, root: str | Path, crop_size: int | None = None) -> None:
        self.root = Path(root)
        if not self.root.exists():
            raise FileNotFoundError(f"HR image folder {self.root} does not exist")
        if not self.root.is_dir():
            raise NotADirectoryError(f"HR image folder {self.root} is not a folder")
        self.paths = sorted(p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not self.paths:
            raise ValueError(f"no {'/'.join(sorted(IMAGE_EXTENSIONS))} images under {self.root}")
        if crop_size is not None:
            if crop_size < 1:
                raise ValueError(f"crop_size must be >= 1, got {crop_size}")
            check_crop_sizes(self.paths, crop_size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return load_image(self.paths[index])


def sample_image_dir() -> Path:
    """scikit-image's bundled data folder."""
    import skimage.data

    return Path(skimage.data.data_dir)


class SampleImages(Dataset):
    """The built-in `sample` set: scikit-image's bundled colour photographs.

    `split` is "train" (`SAMPLE_TRAIN`), "eval" (`SAMPLE_EVAL`) or "all".
    """

    def __init__(self, split: str = "train") -> None:
        splits = {"train": SAMPLE_TRAIN, "eval": SAMPLE_EVAL, "all": tuple(SAMPLE_FILES)}
        if split not in splits:
            raise ValueError(f"unknown split {split!r}; expected one of {sorted(splits)}")
        self.names = splits[split]
        self.paths = [sample_image_dir() / SAMPLE_FILES[name] for name in self.names]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return load_image(self.paths[index])


def _fits_crop(h: int, w: int, size: int) -> bool:
    """Whether an h x w image gives `size` x `size` crops: reflect padding adds at most
    side - 1 pixels, so each side must be over half the crop."""
    return 2 * min(h, w) > size


def _pad_to(image: torch.Tensor, size: int) -> torch.Tensor:
    """Reflect-pad an image smaller than `size` on a side up to `size` (Real-ESRGAN does
    the same); images with a side of half the crop or less cannot be reflected that far and
    are refused."""
    _, h, w = image.shape
    pad_h, pad_w = max(0, size - h), max(0, size - w)
    if pad_h == 0 and pad_w == 0:
        return image
    if not _fits_crop(h, w, size):
        raise ValueError(f"image of {h}x{w} is too small for {size}x{size} crops "
                         f"(needs at least {size // 2 + 1} px a side)")
    return F.pad(image.unsqueeze(0), (0, pad_w, 0, pad_h), mode="reflect").squeeze(0)


def random_crop_flip(image: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """A random `size` x `size` crop of a (3, H, W) image, mirrored left-right with
    probability 1/2 (the paper's only augmentation)."""
    image = _pad_to(image, size)
    _, h, w = image.shape
    top = int(torch.randint(h - size + 1, (1,), generator=generator).item())
    left = int(torch.randint(w - size + 1, (1,), generator=generator).item())
    crop = image[:, top : top + size, left : left + size]
    if bool(torch.rand(1, generator=generator).item() < 0.5):
        crop = crop.flip(-1)
    return crop.contiguous()


def center_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    image = _pad_to(image, size)
    _, h, w = image.shape
    top, left = (h - size) // 2, (w - size) // 2
    return image[:, top : top + size, left : left + size].contiguous()


# A CPU torch.Generator keeps the low 32 bits of its seed only: ranks share those 2**32 seeds, each with
# RANK_MICRO_BATCHES of its own.
RANK_MICRO_BATCHES = 2**24
MAX_RANKS = 2**32 // RANK_MICRO_BATCHES


def batch_seed(seed: int, rank: int, index: int) -> int:
    """The seed of micro-batch `index` on `rank`: batches depend on nothing else. For `index` under
    `RANK_MICRO_BATCHES` and `rank` under `MAX_RANKS`, no two (rank, index) of one seed share the low
    32 bits."""
    return _offset_seed(seed, rank * RANK_MICRO_BATCHES + index)


def draw_seed(seed: int, image: int, draw: int) -> int:
    """The seed of `eval_pairs`' draw `draw` of image `image` (the evaluation inputs of every recorded
    result; distinct for up to 7_919 draws per image)."""
    return _offset_seed(seed, image * 7_919 + draw)


def _offset_seed(seed: int, offset: int) -> int:
    return (seed * 1_000_003 + offset) % (2**63 - 1)


class StepCrops(Dataset):
    """Item i is the HR batch of micro-step i, (B, 3, S, S) in [0, 1]: which images, their crops
    and flips, all drawn from a generator seeded with `batch_seed(seed, rank, i)`. Being a pure
    function of i, it needs no iterator state: DataLoader workers and resumed runs agree."""

    def __init__(self, images: Dataset | Sequence[torch.Tensor], batch_size: int, crop_size: int, seed: int,
                 rank: int = 0) -> None:
        self.images = images
        self.batch_size = batch_size
        self.crop_size = crop_size
        self.seed = seed
        self.rank = rank

    def __getitem__(self, index: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(batch_seed(self.seed, self.rank, index))
        picks = torch.randint(len(self.images), (self.batch_size,), generator=generator).tolist()
        crops = []
        for pick in picks:
            try:
                crops.append(random_crop_flip(self.images[pick], self.crop_size, generator))
            except ValueError as error:
                raise ValueError(f"{_source(self.images, pick)}: {error}") from error
        return torch.stack(crops)


def _source(images: Dataset | Sequence[torch.Tensor], index: int) -> str:
    """The file of item `index` where `images` has `paths`, else "image {index}"."""
    paths = getattr(images, "paths", None)
    return str(paths[index]) if paths is not None else f"image {index}"


@dataclass(frozen=True)
class PairConfig:
    """How training pairs are made. `crop_size` must be a multiple of the degradation
    scale (`TrainingPairs` checks it); no other multiple is needed, as the model pads its input
    to its own size multiple. Every image side must be over half of `crop_size` (smaller
    sides are reflect-padded up to it). 256 is the paper's."""

    batch_size: int = 8
    crop_size: int = 256
    degradation: DegradationConfig = DegradationConfig()
    seed: int = 0
    num_workers: int = 0


def _to_model_range(images: torch.Tensor) -> torch.Tensor:
    return images * 2.0 - 1.0


def make_pairs(hr: torch.Tensor, degradation: DegradationConfig,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """HR batch in [0, 1] -> (bicubic-upsampled degraded input, HR), both in [-1, 1]."""
    lr = degrade(hr, degradation, generator)
    lq = upsample_lr(lr, hr.shape[-2:])
    return _to_model_range(lq), _to_model_range(hr)


class TrainingPairs:
    """Endless iterator of `(lq, hr)` training batches, (B, 3, S, S) float32 in [-1, 1] on
    `device`, where `lq` is the degraded image upsampled back to S x S, starting at micro-batch
    `start`.

    Batch i is a pure function of (seed, rank, i): crops come from `StepCrops` (read by
    DataLoader workers when `num_workers` > 0), degradations run batched on `device` with a CPU
    generator seeded from (seed + 1, rank, i). A run resumed at step k rebuilds batch k exactly.
    """

    def __init__(self, images: Dataset | Sequence[torch.Tensor], config: PairConfig = PairConfig(),
                 device: str | torch.device = "cpu", rank: int = 0, start: int = 0) -> None:
        if config.crop_size % config.degradation.scale:
            raise ValueError(f"crop_size {config.crop_size} is not a multiple of the scale {config.degradation.scale}")
        if not 0 <= rank < MAX_RANKS:
            raise ValueError(f"rank {rank}: the batch seeds keep {MAX_RANKS} ranks' batches apart, ranks 0 to "
                             f"{MAX_RANKS - 1}")
        self.config = config
        self.device = torch.device(device)
        self.rank = rank
        self.index = start
        self.loader = DataLoader(
            StepCrops(images, config.batch_size, config.crop_size, config.seed, rank),
            batch_size=None,
            sampler=itertools.count(start),
            num_workers=config.num_workers,
            pin_memory=self.device.type == "cuda",
        )
        self._batches = iter(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.index >= RANK_MICRO_BATCHES:
            raise ValueError(f"micro-batch {self.index}: a rank has {RANK_MICRO_BATCHES} batches of its own, and "
                             f"the next would repeat another rank's")
        hr = next(self._batches).to(self.device, non_blocking=True)
        generator = torch.Generator().manual_seed(batch_seed(self.config.seed + 1, self.rank, self.index))
        self.index += 1
        return make_pairs(hr, self.config.degradation, generator)


def eval_pairs(
    images: Sequence[torch.Tensor] | Dataset,
    crop_size: int = 256,
    degradation: DegradationConfig = DegradationConfig(),
    seed: int = 0,
    device: str | torch.device = "cpu",
    draws: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed validation pairs: the centre crop of every image, degraded `draws` times with fixed
    seeds, so that every evaluation sees the same inputs. Returns `(lq, hr)` like `TrainingPairs`,
    len(images) * draws pairs, image-major (image i's draws at i * draws ... i * draws + draws - 1).

    Each image is degraded on its own, draw d of image i with a generator seeded from (seed, i, d):
    the degradation draws its resizes (kind, scale, interpolation) once per batch, as Real-ESRGAN
    does, so degrading the images as one batch would give every image the same resizes and make an
    image's input depend on which other images are evaluated with it."""
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    crops = []
    for i in range(len(images)):
        try:
            crops.append(center_crop(images[i], crop_size))
        except ValueError as error:
            raise ValueError(f"{_source(images, i)}: {error}") from error
    hr = torch.stack(crops).to(device)
    pairs = []
    for i in range(len(hr)):
        for d in range(draws):
            generator = torch.Generator().manual_seed(draw_seed(seed, i, d))
            pairs.append(make_pairs(hr[i : i + 1], degradation, generator))
    return torch.cat([lq for lq, _ in pairs]), torch.cat([target for _, target in pairs])
