"""The byte-plane transform of `bastion ckpt pack`: elements of 2, 4 or 8 little-endian bytes
regrouped so that byte k of every element lies in plane k, each element's bits optionally
rotated left by one first (the sign bit to the bottom, so the top plane holds the exponent
alone).

The work is done by `_planes.c`, one pass with the GIL released, when the package was built
with a C compiler (`setup.py`: the extension is optional); otherwise by the numpy code here,
which gives the same bytes (tests/checkpoint/test_planes.py holds them to it) about six times
slower. `NATIVE` says which one is in use.
"""
from __future__ import annotations

import numpy as np

try:
    from bastion.checkpoint import _planes
except ImportError:  # built without a C compiler: numpy does the same, slower
    _planes = None

NATIVE = _planes is not None
PLANE_COUNTS = (2, 4, 8)


def split(data: bytes | bytearray | memoryview | np.ndarray, planes: int, rotate: bool,
          out: np.ndarray | None = None) -> np.ndarray:
    """A uint8 array of len(data) bytes: plane k (byte k of every element) at [k * m, (k + 1) * m).
    Written into `out` (a uint8 array of at least that size, a caller's reused buffer: fresh
    pages cost more than the split itself) if given, else into a new array."""
    source = _bytes_view(data, planes)
    out = np.empty(source.size, np.uint8) if out is None else out[:source.size]
    if _planes is not None:
        _planes.split(source, out, planes, rotate)
        return out
    elements = source.view(f"<u{planes}")
    if rotate:
        elements = np.bitwise_or(elements << 1, elements >> (8 * planes - 1))
    out.reshape(planes, -1)[:] = elements.view(np.uint8).reshape(-1, planes).T
    return out


def join(data: bytes | bytearray | memoryview | np.ndarray, planes: int, rotate: bool) -> np.ndarray:
    """The inverse of `split`: a new uint8 array of the original elements' bytes."""
    source = _bytes_view(data, planes)
    out = np.empty(source.size, np.uint8)
    if _planes is not None:
        _planes.join(source, out, planes, rotate)
        return out
    out.reshape(-1, planes)[:] = source.reshape(planes, -1).T
    if rotate:
        elements = out.view(f"<u{planes}")
        np.bitwise_or(elements >> 1, elements << (8 * planes - 1), out=elements)
    return out


def _bytes_view(data: bytes | bytearray | memoryview | np.ndarray, planes: int) -> np.ndarray:
    if planes not in PLANE_COUNTS:
        raise ValueError(f"planes must be one of {PLANE_COUNTS}, got {planes!r}")
    view = np.frombuffer(data, np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1).view(np.uint8)
    if view.size % planes:
        raise ValueError(f"{view.size} bytes is not a whole number of {planes}-byte elements")
    return view
