"""Allocator setting for CPU training and evaluation processes.

glibc's malloc hands large freed blocks back to the kernel (its trim threshold and dynamic mmap
threshold), so a training step that allocates many activation-sized tensors page-faults on every
one of them, every step. An EDL layer allocates more activation-sized tensors than a convolution
(its solver's steps), so it pays more: 5-10% of a CPU training step here (benchmarks/layer_speed.py
prints both settings). PyTorch's CPU performance guide answers this with jemalloc or tcmalloc
through LD_PRELOAD; glibc's own mallopt does the same without installing anything.

The library never calls this on import: it changes the whole process. ``scripts/train.py`` and
``scripts/evaluate.py`` call it when they run on the CPU.
"""
import ctypes
import sys

import torch

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: keep up to 2 GiB of freed memory for reuse


def keep_freed_memory() -> bool:
    """Make glibc malloc keep freed memory for reuse: large blocks come from the heap instead of
    fresh mmap regions (M_MMAP_MAX = 0; glibc still falls back to mmap if the heap cannot grow), and
    the heap is not trimmed below 2 GiB of free space, so the process keeps its peak footprint.
    Returns True when applied, False where the C library has no glibc mallopt (macOS, Windows,
    musl), which leaves everything as it was."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # M_MMAP_THRESHOLD alone would not do: glibc caps it at 32 MiB, and a ViT-S/16 MLP code at
    # batch 32 is 39 MB (benchmarks/model_speed.py: 1.085x of the expected step time with the cap,
    # 0.99x without mmap)
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX), which is what makes
    ``--mixed-precision bf16`` fast on the CPU. Without it oneDNN emulates bfloat16 in float32
    and converts on every op: on an AVX2-only AMD EPYC (2 threads) an FGSM training step of
    edl_resnet18 at channels (16, 32, 64, 128) ran 11 to 14 times slower under bf16 autocast than in
    float32 (``python benchmarks/train_step_speed.py --models edl_resnet18 --adv fgsm --channels 16 32
    64 128 --repeats 1``: EDL 3.8 against 41.6 img/s in channels_last). Neither accelerate nor timm checks
    this, so the training script does (it warns; it does not change the precision it was given)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a private oneDNN query: fall back to the kernel's CPU flags
        try:
            with open("/proc/cpuinfo") as f:
                flags = f.read()
        except OSError:
            return True  # nothing to go on: do not warn
        return "avx512_bf16" in flags or "amx_bf16" in flags
