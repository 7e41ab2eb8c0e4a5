"""Image classification data through Hugging Face ``datasets``, as uint8 tensors.

Small image sets (CIFAR-10/100, 32x32) are decoded once into a uint8 tensor (N, 3, H, W): 50,000
CIFAR images are 150 MB, and batched tensor augmentation on them is far faster on a CPU than a
per-image PIL pipeline.
"""
import os
from typing import Optional, Tuple

import numpy as np
import torch

__all__ = ["load_image_split", "random_crop_flip", "random_subset"]


def _load(dataset: str, split: str):
    from datasets import load_dataset

    if os.path.isdir(dataset):
        files = {s: os.path.join(dataset, f"{s}.parquet") for s in ("train", "test")}
        files = {s: f for s, f in files.items() if os.path.exists(f)}
        if split not in files:
            raise FileNotFoundError(
                f"no {split}.parquet in {dataset!r} (found: {sorted(os.listdir(dataset))}); "
                "a local data set is a folder with train.parquet / test.parquet"
            )
        return load_dataset("parquet", data_files={split: files[split]}, split=split)
    return load_dataset(dataset, split=split)


def load_image_split(
    dataset: str,
    split: str,
    limit: Optional[int] = None,
    image_column: Optional[str] = None,
    label_column: Optional[str] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 (N, 3, H, W), labels int64 (N,)) of a Hub id or a local parquet folder."""
    ds = _load(dataset, split)
    image_column = image_column or next((c for c in ("img", "image") if c in ds.column_names), None)
    label_column = label_column or next((c for c in ("label", "fine_label", "labels") if c in ds.column_names), None)
    if image_column not in ds.column_names or label_column not in ds.column_names:
        raise ValueError(
            f"{dataset!r} has columns {ds.column_names}; name the image and label columns "
            "(image_column=..., label_column=...)"
        )
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    ds = ds.with_format("numpy", columns=[label_column])
    labels = torch.as_tensor(ds[label_column], dtype=torch.int64)
    ds = ds.with_format(None)
    images = np.stack([np.asarray(im.convert("RGB")) for im in ds[image_column]])
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels


def random_subset(labels: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` indices drawn in a fixed random order (both splits of the JPEG CIFAR-10 copy are
    sorted by class, so their first N images are not a sample of the classes)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(len(labels), generator=g)[:n]


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
