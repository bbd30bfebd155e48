"""Reading a file an operator named: a regular file only, up to a size cap, never waiting on a FIFO or device."""

import os
import stat
from pathlib import Path


class FileRefused(Exception):
    """The path names something that is not read: not a regular file, or larger than the cap."""


def read_regular_file(path: Path, limit: int) -> bytes:
    """The file's bytes, at most `limit` of them. Raises FileRefused for a FIFO, device, directory or a file over
    `limit` bytes, and OSError when it cannot be opened or read."""
    # O_NONBLOCK and the fstat check: a FIFO opened for reading would otherwise wait for a writer, forever.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise FileRefused("is not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as handle:
            raw = handle.read(limit + 1)  # one byte more than allowed tells a file over the cap without reading it all
    finally:
        os.close(fd)
    if len(raw) > limit:
        raise FileRefused(f"is larger than {limit} bytes")
    return raw
