"""Run a benchmark's table under glibc's default malloc and again with freed memory kept for reuse
(``edl_timm.cpu.keep_freed_memory``, which scripts/train.py and scripts/evaluate.py apply on the
CPU). Both arms of every comparison always run in the same process, under the same allocator.
"""
from edl_timm.cpu import keep_freed_memory


def add_argument(ap):
    ap.add_argument(
        "--allocator", choices=["default", "keep", "both"], default="both",
        help="glibc malloc as it comes, with edl_timm.cpu.keep_freed_memory(), or one table for each (default)",
    )


def run(args, table):
    """Print ``table()`` under the allocator setting(s) that ``args.allocator`` names."""
    if args.allocator in ("default", "both"):
        print("allocator: glibc malloc defaults", flush=True)
        table()
    if args.allocator in ("keep", "both"):
        if args.allocator == "both":
            print(flush=True)
        applied = keep_freed_memory()
        print(f"allocator: edl_timm.cpu.keep_freed_memory() {'applied' if applied else 'NOT AVAILABLE here'}", flush=True)
        table()
