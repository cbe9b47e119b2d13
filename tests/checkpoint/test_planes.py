"""The byte-plane transform of `ckpt pack`: the C loop and the numpy code give the same bytes,
both invert, and bad arguments are refused before anything is read or written."""
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from bastion.checkpoint import planes


def numpy_only(monkeypatch):
    monkeypatch.setattr(planes, "_planes", None)


@pytest.mark.parametrize("count", [2, 4, 8])
@pytest.mark.parametrize("rotate", [True, False])
def test_split_puts_byte_k_of_every_element_in_plane_k(count, rotate, monkeypatch):
    rng = np.random.default_rng(count)
    data = rng.integers(0, 256, count * 1001, dtype=np.uint8)  # an odd element count: no vector-width luck
    elements = data.view(f"<u{count}")
    if rotate:
        elements = np.bitwise_or(elements << 1, elements >> (8 * count - 1))
    expected = elements.view(np.uint8).reshape(-1, count).T.ravel()
    got = planes.split(data.tobytes(), count, rotate)
    assert np.array_equal(got, expected)
    assert np.array_equal(planes.join(got, count, rotate), data)
    numpy_only(monkeypatch)
    assert np.array_equal(planes.split(data, count, rotate), expected)
    assert np.array_equal(planes.join(expected, count, rotate), data)


def test_rotation_moves_the_sign_bit_to_the_bottom_and_leaves_the_exponent_alone_on_top():
    minus_zero = np.array([-0.0], dtype="<f4").tobytes()
    assert planes.split(minus_zero, 4, True).tolist() == [1, 0, 0, 0]
    one = np.array([1.0, -1.0], dtype="<f2").tobytes()  # fp16: exponent 01111, mantissa 0
    top = planes.split(one, 2, True)[2:]
    assert top.tolist() == [0b01111000, 0b01111000]  # same exponent byte whatever the sign


def test_the_native_loop_is_built_where_a_compiler_was():
    """make install compiles it (setup.py); a machine without a C compiler or Python's headers
    falls back to numpy. Where both are present (this project's machines, CI), an install
    that left it out is a broken install, not a fallback."""
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not planes.NATIVE and not (shutil.which(compiler) and headers.exists()):
        pytest.skip(f"no C compiler ({compiler}) or no {headers}: the numpy fallback is in use")
    assert planes.NATIVE, "bastion/checkpoint/_planes.c was not built: run make install (or pip install -e .)"


@pytest.mark.parametrize("native", [True, False])
def test_bad_arguments_are_refused(native, monkeypatch):
    if not native:
        numpy_only(monkeypatch)
    with pytest.raises(ValueError, match="planes must be"):
        planes.split(b"\0" * 8, 3, True)
    with pytest.raises(ValueError, match="whole number of 4-byte elements"):
        planes.split(b"\0" * 6, 4, True)
    with pytest.raises(ValueError, match="whole number"):
        planes.join(b"\0" * 9, 2, False)


def test_the_c_entry_points_check_their_buffers():
    if not planes.NATIVE:
        pytest.skip("built without the C loop")
    from bastion.checkpoint import _planes

    out = bytearray(8)
    with pytest.raises(ValueError, match="output holds 8 bytes, input 16"):
        _planes.split(b"\0" * 16, out, 2, True)
    with pytest.raises(ValueError, match="planes must be 2, 4 or 8"):
        _planes.join(b"\0" * 8, out, 1, True)
    with pytest.raises(ValueError, match="must not overlap"):
        _planes.split(out, out, 2, True)
    shared = bytearray(24)
    with pytest.raises(ValueError, match="must not overlap"):
        _planes.join(memoryview(shared)[:16], memoryview(shared)[8:], 2, False)
    with pytest.raises(TypeError):
        _planes.split(b"\0" * 8, b"\0" * 8, 2, True)  # read-only output
    _planes.split(b"", bytearray(), 2, True)  # empty: nothing to do
