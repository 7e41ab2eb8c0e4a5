"""Common corruptions of small images: the published CIFAR-10-C files, and the same corruptions
generated on any uint8 test split.

CIFAR-10-C (Hendrycks & Dietterich 2019) is a folder of ``<corruption>.npy`` files, each 50,000
uint8 images (N, 32, 32, 3): the 10,000 test images at severity 1, then at 2, ..., 5; and
``labels.npy``, their 50,000 labels. ``read_cifar10c`` reads that layout (the one RobustBench's
loader reads from the archive), so a user who has it measures the leaderboard's number.

Without it, ``generate`` corrupts the local test images with CIFAR-10-C's own severity parameters
(those of ``make_cifar_c.py`` in hendrycks/robustness) for the corruptions whose primitives numpy,
scipy and Pillow provide exactly: 8 of CIFAR-10-C's 15 and 2 of its 4 extra ones. The
``imagecorruptions`` package was not used: it ships ImageNet-C's parameters (Gaussian noise sigma
0.08-0.38 against CIFAR-10-C's 0.04-0.10, tuned for 224-pixel images) and needs OpenCV and
scikit-image. A generated set is labelled as such, never as CIFAR-10-C: its noise draws differ
from the published files, and the local copy's images are themselves JPEG-decoded.
"""
import io
import os
import zlib
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = ["CIFAR10C_CORRUPTIONS", "GENERATED", "SEVERITIES", "CorruptionDataError", "read_cifar10c", "cifar10c_labels", "generate",
           "describe_generated"]

SEVERITIES = (1, 2, 3, 4, 5)
# CIFAR-10-C's 15 (RobustBench's corruptions board averages these), in the paper's order
CIFAR10C_CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur", "snow",
    "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)


class CorruptionDataError(ValueError):
    """A corruption folder or request that cannot be read as asked (the message says what to do)."""


def _check_severities(severities: Sequence[int]) -> List[int]:
    bad = [s for s in severities if s not in SEVERITIES]
    if bad or not severities:
        raise CorruptionDataError(f"severities are 1 to 5, got {list(severities)}")
    return sorted(set(severities))


def read_cifar10c(folder: os.PathLike, corruptions: Optional[Sequence[str]] = None,
                  severities: Sequence[int] = SEVERITIES, subset: Optional[torch.Tensor] = None,
                  ) -> Tuple[Dict[Tuple[str, int], torch.Tensor], torch.Tensor]:
    """Images (N, 3, H, W) uint8 per (corruption, severity) and their labels (N,), from a folder in
    CIFAR-10-C's layout (each file: 5 severity blocks of the same test images, in labels.npy's order;
    CIFAR-10-C's blocks are 10,000 32x32 images). ``subset``: indices into one block (the same for
    every corruption and severity); None: all. Every file is checked (present, dtype, shape, label
    count) before any is read whole; an error names the file and what was expected."""
    arrays, labels = _open_cifar10c(folder, corruptions, severities)
    severities = _check_severities(severities)
    per = len(labels)
    keep = np.arange(per) if subset is None else np.asarray(subset, dtype=np.int64)
    if len(keep) and (keep.min() < 0 or keep.max() >= per):
        raise CorruptionDataError(f"the subset indexes images beyond the {per} per severity of {folder}")
    out = {}
    for c in arrays:
        for s in severities:
            imgs = np.asarray(arrays[c][(s - 1) * per + keep])
            out[(c, s)] = torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous()
    return out, torch.from_numpy(labels[keep])


def cifar10c_labels(folder: os.PathLike, corruptions: Optional[Sequence[str]] = None,
                    severities: Sequence[int] = SEVERITIES) -> torch.Tensor:
    """The labels of one severity block of a folder in CIFAR-10-C's layout, once every file the
    evaluation will read has been checked (nothing is read whole)."""
    return torch.from_numpy(_open_cifar10c(folder, corruptions, severities)[1])


def _open_cifar10c(folder, corruptions, severities):
    folder = Path(folder)
    severities = _check_severities(severities)
    corruptions = list(corruptions or CIFAR10C_CORRUPTIONS)
    if not folder.is_dir():
        raise CorruptionDataError(f"no such CIFAR-10-C folder: {folder} (it holds <corruption>.npy and labels.npy)")

    def load(path):
        if not path.exists():
            have = sorted(p.name for p in folder.glob("*.npy"))
            raise CorruptionDataError(f"{path} is missing (the folder has {', '.join(have) or 'no .npy file'}); "
                                      "CIFAR-10-C's layout is <corruption>.npy and labels.npy")
        try:
            return np.load(path, mmap_mode="r")
        except (ValueError, OSError) as e:
            raise CorruptionDataError(f"{path} is not a readable .npy file ({e})") from None

    labels_file = folder / "labels.npy"
    all_labels = load(labels_file)
    if all_labels.ndim != 1 or len(all_labels) == 0 or len(all_labels) % len(SEVERITIES) or all_labels.dtype.kind not in "iu":
        raise CorruptionDataError(f"{labels_file} holds {all_labels.dtype} {all_labels.shape}, expected integer labels "
                                  "for 5 severities x the test images (CIFAR-10-C: 50,000)")
    per = len(all_labels) // len(SEVERITIES)  # CIFAR-10-C: 10,000
    arrays = {}
    for c in corruptions:  # every file checked before any is read whole
        path = folder / f"{c}.npy"
        arr = load(path)
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[0] != len(all_labels) or arr.shape[3] != 3:
            raise CorruptionDataError(f"{path} holds {arr.dtype} {arr.shape}, expected uint8 ({len(all_labels)}, H, W, 3): "
                                      f"5 severities x {per} images, one per label in {labels_file.name}")
        arrays[c] = arr
    labels = np.asarray(all_labels[:per]).astype(np.int64)
    for s in severities[1:]:  # every severity block holds the same images in the same order
        if not np.array_equal(np.asarray(all_labels[(s - 1) * per:s * per]), labels):
            raise CorruptionDataError(f"{labels_file}: the labels of severity {s} differ from those of severity 1")
    return arrays, labels


# ---------------------------------------------------------------------------------------------
# generated corruptions: CIFAR-10-C's parameters per severity (make_cifar_c.py), on (N, H, W, C)
# float64 images in [0, 1]; each returns the same shape in [0, 1] (or uint8 for the Pillow ones)

def _gaussian_noise(x, c, rng):
    return np.clip(x + rng.normal(size=x.shape, scale=c), 0, 1)


def _shot_noise(x, c, rng):
    return np.clip(rng.poisson(x * c) / c, 0, 1)


def _impulse_noise(x, c, rng):
    # salt and pepper on a fraction c of the values (each channel on its own), half of each, as
    # scikit-image's random_noise(mode="s&p", amount=c) draws them
    flipped = rng.random(x.shape) <= c
    salted = rng.random(x.shape) <= 0.5
    out = x.copy()
    out[flipped & salted] = 1.0
    out[flipped & ~salted] = 0.0
    return out


def _speckle_noise(x, c, rng):
    return np.clip(x + x * rng.normal(size=x.shape, scale=c), 0, 1)


def _gaussian_blur(x, c, rng):
    from scipy.ndimage import gaussian_filter

    # scikit-image's gaussian(): scipy's filter with its "nearest" edges and 4-sigma support, per channel
    return np.clip(gaussian_filter(x, sigma=(0, c, c, 0), mode="nearest", truncate=4.0), 0, 1)


def _clipped_zoom(x, factor):
    from scipy.ndimage import zoom

    h = x.shape[1]
    ch = int(np.ceil(h / factor))
    top = (h - ch) // 2
    z = zoom(x[:, top:top + ch, top:top + ch], (1, factor, factor, 1), order=1)
    trim = (z.shape[1] - h) // 2
    return z[:, trim:trim + h, trim:trim + h]


def _zoom_blur(x, factors, rng):
    out = np.zeros_like(x)
    for f in factors:
        out += _clipped_zoom(x, f)
    return np.clip((x + out) / (len(factors) + 1), 0, 1)


def _contrast(x, c, rng):
    means = x.mean(axis=(1, 2), keepdims=True)
    return np.clip((x - means) * c + means, 0, 1)


def _brightness(x, c, rng):
    # HSV's value + c with hue and saturation kept: RGB scales by v'/v (v = max channel); black
    # (v = 0, saturation 0) becomes grey v'
    v = x.max(axis=-1, keepdims=True)
    v_new = np.clip(v + c, 0, 1)
    return np.clip(np.where(v > 0, x * v_new / np.where(v > 0, v, 1), v_new), 0, 1)


def _pil_each(x_uint8, fn):
    from PIL import Image

    return np.stack([np.asarray(fn(Image.fromarray(img))) for img in x_uint8])


def _jpeg_compression(x_uint8, quality, rng):
    from PIL import Image

    def once(img):
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=quality)
        return Image.open(buf).convert("RGB")

    return _pil_each(x_uint8, once)


def _pixelate(x_uint8, c, rng):
    from PIL import Image

    def once(img):
        w, h = img.size
        return img.resize((int(w * c), int(h * c)), Image.BOX).resize((w, h), Image.BOX)

    return _pil_each(x_uint8, once)


# name -> (function, its parameter per severity 1..5, whether it takes uint8 images through Pillow)
GENERATED: Dict[str, Tuple[Callable, tuple, bool]] = {
    "gaussian_noise": (_gaussian_noise, (0.04, 0.06, 0.08, 0.09, 0.10), False),
    "shot_noise": (_shot_noise, (500, 250, 100, 75, 50), False),
    "impulse_noise": (_impulse_noise, (0.01, 0.02, 0.03, 0.05, 0.07), False),
    "zoom_blur": (_zoom_blur, tuple(np.arange(1, top, 0.01) for top in (1.06, 1.11, 1.16, 1.21, 1.26)), False),
    "brightness": (_brightness, (0.05, 0.1, 0.15, 0.2, 0.3), False),
    "contrast": (_contrast, (0.75, 0.5, 0.4, 0.3, 0.15), False),
    "pixelate": (_pixelate, (0.95, 0.9, 0.85, 0.75, 0.65), True),
    "jpeg_compression": (_jpeg_compression, (80, 65, 58, 50, 40), True),
    # two of CIFAR-10-C's extra four
    "speckle_noise": (_speckle_noise, (0.06, 0.1, 0.12, 0.16, 0.2), False),
    "gaussian_blur": (_gaussian_blur, (0.4, 0.6, 0.7, 0.8, 1.0), False),
}
# defocus_blur (an OpenCV-blurred disk kernel), glass_blur, motion_blur and snow (ImageMagick's
# motion blur), frost (its photographs), fog (a plasma fractal) and elastic_transform (OpenCV's
# affine warp) are not generated: their primitives are not in numpy, scipy or Pillow.


def describe_generated(seed: int) -> str:
    return (f"generated here with CIFAR-10-C's severity parameters (make_cifar_c.py), numpy seed {seed}: "
            "not the published CIFAR-10-C files (other noise draws, and the images are the local copy's)")


def generate(images: torch.Tensor, corruption: str, severity: int, seed: int = 0) -> torch.Tensor:
    """``images`` (N, 3, H, W) uint8 corrupted at ``severity`` (1-5), uint8 like the published files
    (the float result times 255, truncated, as make_cifar_c.py stores it). The random draws come from
    a numpy generator seeded by (seed, the corruption's name, severity): the same call gives the same
    images, whatever other corruptions exist."""
    if corruption not in GENERATED:
        known = ", ".join(GENERATED)
        raise CorruptionDataError(f"cannot generate {corruption!r}: the generated corruptions are {known}"
                                  + (" (the others need CIFAR-10-C's published files)" if corruption in CIFAR10C_CORRUPTIONS else ""))
    severity = _check_severities([severity])[0]
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise CorruptionDataError(f"expected uint8 images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    fn, params, pil = GENERATED[corruption]
    # the corruption's own name seeds its draws (not its place in GENERATED, which a new entry would
    # shift, silently redrawing every other corruption's noise)
    rng = np.random.default_rng([seed, zlib.crc32(corruption.encode()), severity])
    hwc = images.permute(0, 2, 3, 1).numpy()
    if pil:
        out = fn(hwc, params[severity - 1], rng)
    else:
        out = (fn(hwc.astype(np.float64) / 255.0, params[severity - 1], rng) * 255).astype(np.uint8)
    return torch.from_numpy(np.ascontiguousarray(out)).permute(0, 3, 1, 2).contiguous()
