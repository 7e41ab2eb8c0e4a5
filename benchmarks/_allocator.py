"""Run a benchmark's table under glibc's default malloc and again with page reuse.

With default settings glibc hands large freed blocks back to the kernel (trim threshold, dynamic
mmap threshold), so a step that allocates many activation-sized tensors pays page faults on every
one of them, every step. PyTorch's CPU performance guide answers this with jemalloc or tcmalloc
(LD_PRELOAD); glibc's own tunables do the same job without installing anything. Both arms of a
comparison always run in the same process, under the same allocator.
"""
import os
import subprocess
import sys

TUNABLES = "glibc.malloc.trim_threshold=4000000000:glibc.malloc.mmap_threshold=33554432"


def add_argument(ap):
    ap.add_argument(
        "--allocator", choices=["default", "tuned", "both"], default="both",
        help=f"glibc malloc as it comes, with GLIBC_TUNABLES={TUNABLES}, or one table for each (default)",
    )


def run(args, table):
    """Print ``table()`` under the allocator(s) that ``args.allocator`` names."""
    if args.allocator == "tuned" and os.environ.get("GLIBC_TUNABLES") != TUNABLES:
        sys.exit(_rerun_tuned())
    if args.allocator in ("default", "both"):
        print("allocator: glibc malloc defaults", flush=True)
        table()
    if args.allocator == "tuned":
        print(f"allocator: GLIBC_TUNABLES={TUNABLES}", flush=True)
        table()
    if args.allocator == "both":
        print(flush=True)
        if _rerun_tuned():
            sys.exit("the tuned-allocator run failed")


def _rerun_tuned() -> int:
    # tunables are read when the process starts, so the second table needs a new process
    env = dict(os.environ, GLIBC_TUNABLES=TUNABLES)
    return subprocess.run([sys.executable, *sys.argv, "--allocator", "tuned"], env=env).returncode
