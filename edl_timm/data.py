"""Image classification data through Hugging Face ``datasets``, as uint8 tensors.

Small image sets (CIFAR-10/100, 32x32) are decoded once into a uint8 tensor (N, 3, H, W): 50,000
CIFAR images are 150 MB, and batched tensor augmentation on them is far faster on a CPU than a
per-image PIL pipeline.
"""
import os
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["describe_subset", "fit_size", "load_image_split", "random_crop_flip", "random_subset", "select_subset"]


def _load(dataset: str, split: str):
    from datasets import load_dataset

    if os.path.isdir(dataset):
        parquet = os.path.join(dataset, f"{split}.parquet")
        if os.path.exists(parquet):
            return load_dataset("parquet", data_files={split: parquet}, split=split)
        if os.path.isdir(os.path.join(dataset, split)):  # an image folder: <split>/<class>/<image>
            return load_dataset("imagefolder", data_dir=dataset, split=split)
        raise FileNotFoundError(
            f"no {split}.parquet and no {split}/ folder in {dataset!r} (found: {sorted(os.listdir(dataset))}); a local "
            "data set is a folder with train.parquet / test.parquet, or an image folder <split>/<class>/<image>"
        )
    if os.path.sep in dataset and not os.path.exists(dataset) and dataset.startswith((".", "/", "~")):
        raise FileNotFoundError(f"no such data set folder: {dataset!r}")
    return load_dataset(dataset, split=split)


def _as_images(ds, dataset: str, column: str):
    """``ds`` with ``column`` decoded as images. A parquet file written without the Hub's feature
    metadata (plain pyarrow or pandas) holds encoded images as {bytes, path} structs or raw bytes:
    they are cast to ``datasets.Image``, which decodes both."""
    from datasets import Image

    if isinstance(ds.features[column], Image):
        return ds
    try:
        return ds.cast_column(column, Image())
    except Exception as e:  # what datasets raises here varies (ValueError, TypeError, ArrowInvalid)
        raise ValueError(
            f"column {column!r} of {dataset!r} is {ds.features[column]}, not images: give encoded images (PNG or JPEG "
            "bytes, or {'bytes', 'path'} structs) or name the image column (--image-column / image_column=...)"
        ) from e


def load_image_split(
    dataset: str,
    split: str,
    limit: Optional[int] = None,
    image_column: Optional[str] = None,
    label_column: Optional[str] = None,
    with_names: bool = False,
    subset: Optional[int] = None,
    seed: int = 0,
):
    """(images uint8 (N, 3, H, W), labels int64 (N,)) of a Hub id, a local parquet folder or an
    image folder; with ``with_names``, also the class names (None when the data set has none).

    ``limit``: the first N examples. ``subset``: N examples chosen by ``select_subset`` (the first N,
    or a seeded random N when the split is sorted by label); only the chosen images are decoded."""
    ds = _load(dataset, split)
    image_column = image_column or next((c for c in ("img", "image") if c in ds.column_names), None)
    label_column = label_column or next((c for c in ("label", "fine_label", "labels") if c in ds.column_names), None)
    if image_column not in ds.column_names or label_column not in ds.column_names:
        raise ValueError(
            f"{dataset!r} has columns {ds.column_names}; name the image and label columns "
            "(--image-column / --label-column, or image_column=... / label_column=...)"
        )
    ds = _as_images(ds, dataset, image_column)
    feature = ds.features.get(label_column)
    names = list(feature.names) if hasattr(feature, "names") else None
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    # read whole columns through one slice ([:]): since datasets 4, ds[column] is a lazy Column that
    # formats row by row, 9 s for CIFAR-10's 50,000 labels against 0.03 s for the slice
    labels = torch.as_tensor(ds.with_format("numpy", columns=[label_column])[:][label_column], dtype=torch.int64)
    if subset is not None:
        keep = select_subset(labels, subset, seed)
        ds, labels = ds.select(keep.tolist()), labels[keep]
    images_only = ds.select_columns([image_column])
    # decoded a slice at a time: one slice of the whole split would hold every decoded image twice
    arrays = [np.asarray(im.convert("RGB")) for a in range(0, len(images_only), 1024)
              for im in images_only[a:a + 1024][image_column]]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(
            f"{dataset!r} ({split}) has images of {len(shapes)} different sizes (e.g. {sorted(shapes)[:3]}); "
            "resize them to one size first"
        )
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return (images, labels, names) if with_names else (images, labels)


def random_subset(labels: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` indices drawn in a fixed random order (both splits of the JPEG CIFAR-10 copy are
    sorted by class, so their first N images are not a sample of the classes)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(len(labels), generator=g)[:n]


def select_subset(labels: torch.Tensor, n: Optional[int], seed: int = 0) -> torch.Tensor:
    """Indices of ``n`` examples (all when ``n`` is None): the first ``n``, unless the split is sorted
    by label (like the JPEG CIFAR-10 copy), where the first ``n`` would be a few classes only; then
    ``n`` drawn in a fixed random order (``seed``)."""
    if n is None or n >= len(labels):
        return torch.arange(len(labels))
    if is_sorted_by_label(labels):
        return random_subset(labels, n, seed)
    return torch.arange(n)


def describe_subset(labels: torch.Tensor, n: Optional[int], seed: int = 0) -> str:
    """How ``select_subset(labels, n, seed)`` chose its examples, in words for a report."""
    if n is None or n >= len(labels):
        return f"all {len(labels)} images"
    if is_sorted_by_label(labels):
        return f"{n} images drawn at random (seed {seed}): the split is sorted by class"
    return f"first {n} images"


def is_sorted_by_label(labels: torch.Tensor) -> bool:
    return len(labels) > 1 and bool((labels[1:] >= labels[:-1]).all()) and labels[0] != labels[-1]


def random_crop_flip(images: torch.Tensor, padding: int = 4, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Batched random crop with zero padding and horizontal flip: (N, C, H, W) -> (N, C, H, W)."""
    n, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    rows = dy.view(n, 1) + torch.arange(h)
    cols = dx.view(n, 1) + torch.arange(w)
    cols = torch.where(flip.view(n, 1), cols.flip(1), cols)
    return padded[
        torch.arange(n).view(n, 1, 1, 1), torch.arange(c).view(1, c, 1, 1), rows.view(n, 1, h, 1), cols.view(n, 1, 1, w)
    ]


def fit_size(images: torch.Tensor, size, chunk: int = 256) -> torch.Tensor:
    """Resize uint8 images to the model's input size (timm's data config) when they differ, a
    chunk at a time into a uint8 result: only a chunk is ever held in float (CIFAR's 50,000 at
    224 px would be 30 GB of float32 at once, 7.5 GB as uint8)."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    out = torch.empty((*images.shape[:-2], *size), dtype=torch.uint8)
    for a in range(0, len(images), chunk):
        part = F.interpolate(images[a:a + chunk].float(), size=tuple(size), mode="bilinear", antialias=True,
                             align_corners=False)
        out[a:a + chunk] = part.round_().clamp_(0, 255)
    return out
