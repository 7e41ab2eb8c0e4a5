"""Writing a file so that a reader never sees half of it."""
import os
from pathlib import Path
from typing import Union


def write_atomic(path: Union[str, os.PathLike], data: Union[str, bytes]) -> None:
    """Write ``data`` to a hidden temporary file beside ``path``, then rename it over ``path``: a
    kill leaves either the old file or the new one whole, never a truncated one (the rename is
    atomic on one file system). The temporary name is unique to ``path``, so one job's files never
    collide; two jobs writing the same path is the caller's mistake to refuse."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    if isinstance(data, bytes):
        tmp.write_bytes(data)
    else:
        tmp.write_text(data)
    os.replace(tmp, path)
