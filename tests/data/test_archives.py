"""Compressed sources (.gz, .zst, .zip): round trips, limits, bombs and hostile archives.

Bombs are built from repeated small compressed pieces, so no test ever holds the
decompressed data in memory.
"""
from __future__ import annotations

import gzip
import io
import json
import random
import re
import struct
import time
import zipfile
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from bastion.config.schema import DataConfig
from bastion.data import archives
from bastion.data.sources import iter_documents, resolve_sources
from bastion.errors import DataError
from reading_memory import read_in_child

MiB = 1 << 20


def cfg(tmp_path: Path, *sources: Path | str, **kw) -> DataConfig:
    kw.setdefault("allowed_roots", [str(tmp_path)])
    return DataConfig(sources=[str(s) for s in sources], output_dir=str(tmp_path / "out"), **kw)


def docs(tmp_path: Path, *sources: Path | str, **kw) -> list[tuple[str, str]]:
    """(text, source relative to tmp_path) of every document."""
    return [(d.text, d.source.replace(str(tmp_path) + "/", "")) for d in iter_documents(cfg(tmp_path, *sources, **kw))]


def jsonl(*texts: str) -> bytes:
    return "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()


def make_zip(path: Path, members: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression=method) as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name), data, compress_type=method)
    return path


def zeros_zip(path: Path, name: str, mib: int) -> Path:
    """A zip with one deflated member of `mib` MiB of zeros, written in 1 MiB steps."""
    info = zipfile.ZipInfo(name)
    info.compress_type = zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(path, "w") as zf, zf.open(info, "w") as out:
        for _ in range(mib):
            out.write(bytes(MiB))
    return path


def patch_member_header(path: Path, *, flag_bits: int = 0, file_size: int | None = None) -> None:
    """Rewrite the (single) member's local and central headers: OR in flag bits and/or
    declare a different uncompressed size."""
    data = bytearray(path.read_bytes())
    local, central = data.find(b"PK\x03\x04"), data.find(b"PK\x01\x02")
    for offset, flags_at, size_at in ((local, 6, 22), (central, 8, 24)):
        (flags,) = struct.unpack_from("<H", data, offset + flags_at)
        struct.pack_into("<H", data, offset + flags_at, flags | flag_bits)
        if file_size is not None:
            struct.pack_into("<L", data, offset + size_at, file_size)
    path.write_bytes(bytes(data))


# ---- round trips -------------------------------------------------------------------------


def test_gzip_and_zstd_round_trips(tmp_path: Path) -> None:
    (tmp_path / "a.txt.gz").write_bytes(gzip.compress("caf\u0065\u0301 au lait".encode()))
    (tmp_path / "b.md.gz").write_bytes(gzip.compress(b"# title\n\nbody\n"))
    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress(jsonl("one", "two")) + gzip.compress(jsonl("three")))
    zc = zstandard.ZstdCompressor()
    (tmp_path / "d.jsonl.zst").write_bytes(zc.compress(jsonl("four")) + zc.compress(jsonl("five", "six")))
    (tmp_path / "e.txt.zst").write_bytes(zc.compress(b"zstd text"))
    (tmp_path / "F.JSONL.GZ").write_bytes(gzip.compress(jsonl("upper")))
    got = docs(tmp_path, tmp_path)
    assert got == [
        ("upper", "F.JSONL.GZ:1"),
        ("caf\u00e9 au lait", "a.txt.gz"),  # NFC-normalised like plain text
        ("# title\n\nbody\n", "b.md.gz"),
        ("one", "c.jsonl.gz:1"), ("two", "c.jsonl.gz:2"), ("three", "c.jsonl.gz:3"),  # multi-member gzip
        ("four", "d.jsonl.zst:1"), ("five", "d.jsonl.zst:2"), ("six", "d.jsonl.zst:3"),  # two zstd frames
        ("zstd text", "e.txt.zst"),
    ]


def test_zip_round_trip_members_sorted_and_named(tmp_path: Path) -> None:
    make_zip(tmp_path / "bundle.zip", {
        "sub/b.jsonl": jsonl("b1", "b2"),
        "a.txt": b"from a",
        "sub/": b"",  # a directory entry
        "c.md": b"from c",
        "LICENSE": b"skipped like in a folder walk",
        "notes.csv": b"x,y",
        ".hidden.txt": b"skipped",
        "__MACOSX/._a.txt": b"\x00\x05\x16\x07 AppleDouble",
        "empty.txt": b"",
    })
    assert docs(tmp_path, tmp_path / "bundle.zip") == [
        ("from a", "bundle.zip!a.txt"),
        ("from c", "bundle.zip!c.md"),
        ("b1", "bundle.zip!sub/b.jsonl:1"),
        ("b2", "bundle.zip!sub/b.jsonl:2"),
    ]
    make_zip(tmp_path / "stored.zip", {"x.txt": b"stored member"}, method=zipfile.ZIP_STORED)
    assert docs(tmp_path, tmp_path / "stored.zip") == [("stored member", "stored.zip!x.txt")]


def test_text_suffixes_apply_inside_archives(tmp_path: Path) -> None:
    make_zip(tmp_path / "code.zip", {"m.py": b"print(1)\n"})
    (tmp_path / "n.py.gz").write_bytes(gzip.compress(b"print(2)\n"))
    got = docs(tmp_path, tmp_path, text_suffixes=[".py"])
    assert got == [("print(1)\n", "code.zip!m.py"), ("print(2)\n", "n.py.gz")]


def test_folder_walk_and_globs_pick_up_archives(tmp_path: Path) -> None:
    for name in ["a.txt.gz", "b.jsonl.zst", "c.zip", "skip.gz", "skip.tar.gz", "skip.csv.zst", "t.parquet.gz"]:
        (tmp_path / name).write_bytes(b"")
    names = [p.name for p in resolve_sources([str(tmp_path)], roots=[tmp_path])]
    assert names == ["a.txt.gz", "b.jsonl.zst", "c.zip"]
    assert [p.name for p in resolve_sources([str(tmp_path / "*.zst")], roots=[tmp_path])] == ["b.jsonl.zst"]


def test_compressed_errors_name_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl.gz").write_bytes(gzip.compress(b'{"text": "ok"}\n{oops}\n'))
    with pytest.raises(DataError, match=r"bad\.jsonl\.gz:2: invalid JSON"):
        docs(tmp_path, tmp_path / "bad.jsonl.gz")
    (tmp_path / "bin.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(b"\xff\xfe binary"))
    with pytest.raises(DataError, match=r"bin\.txt\.zst: not valid UTF-8"):
        docs(tmp_path, tmp_path / "bin.txt.zst")
    make_zip(tmp_path / "z.zip", {"d/x.jsonl": b'{"text": "a"}\n{"body": "b"}\n'})
    with pytest.raises(DataError, match=r"z\.zip!d/x\.jsonl:2: missing text field 'text'"):
        docs(tmp_path, tmp_path / "z.zip")


# ---- corrupt input -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "data", "why"),
    [
        ("junk.txt.gz", b"this is not gzip data at all", "Not a gzipped file"),
        ("cut.txt.gz", gzip.compress(b"hello world" * 100)[:-12], "ended before"),
        ("flip.txt.gz", gzip.compress(b"hello world" * 100)[:-8] + b"\0\0\0\0\0\0\0\0", "CRC"),
        ("junk.jsonl.zst", b"this is not zstd data", "Unknown frame descriptor"),
        ("cut.jsonl.zst", zstandard.ZstdCompressor().compress(jsonl("a" * 1000) * 50)[:-6], "truncated"),
    ],
)
def test_corrupt_compressed_data_is_a_clear_error(tmp_path: Path, name: str, data: bytes, why: str) -> None:
    (tmp_path / name).write_bytes(data)
    with pytest.raises(DataError, match=rf"{name.replace('.', '[.]')}: corrupt compressed data .*{why}"):
        docs(tmp_path, tmp_path / name)


def test_corrupt_zip_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "junk.zip").write_bytes(b"PK\x03\x04 but not really a zip")
    with pytest.raises(DataError, match=r"junk\.zip: not a readable zip archive"):
        docs(tmp_path, tmp_path / "junk.zip")
    path = make_zip(tmp_path / "crc.zip", {"a.txt": b"hello " * 1000})
    data = bytearray(path.read_bytes())
    data[40] ^= 0xFF  # inside the deflated data of the only member
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"crc\.zip!a\.txt: corrupt compressed data"):
        docs(tmp_path, path)
    make_zip(tmp_path / "none.zip", {"README": b"nothing to read", "data.csv": b"a,b"})
    with pytest.raises(DataError, match=r"none\.zip: holds no .*members"):
        docs(tmp_path, tmp_path / "none.zip")


# ---- limits and bombs --------------------------------------------------------------------


def gzip_bomb(path: Path, mib: int) -> Path:
    """`mib` MiB of zeros as concatenated gzip members (each 1 MiB -> ~1 KiB)."""
    member = gzip.compress(bytes(MiB), compresslevel=9)
    with open(path, "wb") as f:
        f.writelines(member for _ in range(mib))
    return path


def test_gzip_bomb_refused_quickly_with_the_limit_named(tmp_path: Path) -> None:
    bomb = gzip_bomb(tmp_path / "bomb.txt.gz", 200)
    assert bomb.stat().st_size < 300_000
    start = time.perf_counter()
    with pytest.raises(DataError, match=r"bomb\.txt\.gz: decompresses to more than data\.max_decompressed_bytes = 1048576"):
        docs(tmp_path, bomb, max_decompressed_bytes=MiB)
    # with the default (4 GiB) per-member limit the ratio check stops it
    with pytest.raises(DataError, match=r"bomb\.txt\.gz: compression ratio over 200:1"):
        docs(tmp_path, bomb)
    assert time.perf_counter() - start < 5


def test_newline_free_jsonl_bomb_is_bounded(tmp_path: Path) -> None:
    # one endless "line": the line reader must not buffer past the limit
    bomb = gzip_bomb(tmp_path / "line.jsonl.gz", 50)
    with pytest.raises(DataError, match=r"line\.jsonl\.gz: decompresses to more than data\.max_decompressed_bytes"):
        docs(tmp_path, bomb, max_decompressed_bytes=MiB)


def salad_bomb(path: Path, mib: int, *, head: bytes = b"", tail: bytes = b"") -> Path:
    """One document of `mib` MiB at about 40:1, like the reported 10.9 MB -> 512 MB .txt.gz
    (under the 200:1 ratio limit, so only a document limit stops it): a 1 MiB gzip member
    of word salad, 90 % a repeated sentence, concatenated `mib` times."""
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(2, 7))) for _ in range(400)]
    sentence = " ".join(rng.choice(words) for _ in range(600))[:3600]
    text = "".join(sentence + " " + " ".join(rng.choice(words) for _ in range(30))[:150] + " " for _ in range(300))
    member = gzip.compress(text.encode()[:MiB].ljust(MiB, b" "), compresslevel=9, mtime=0)
    with open(path, "wb") as f:
        f.write(gzip.compress(head, mtime=0))
        f.writelines(member for _ in range(mib))
        f.write(gzip.compress(tail, mtime=0))
    return path


@pytest.mark.parametrize(("name", "head", "tail"), [("one.txt.gz", b"", b""),
                                                    ("one.jsonl.gz", b'{"text": "', b'"}\n')])
def test_one_huge_document_is_refused_in_bounded_memory(tmp_path: Path, name: str, head: bytes, tail: bytes) -> None:
    """A 13 MB file holding one 512 MiB document: refused at data.max_document_bytes (64 MiB)
    while streaming. Peak RSS of the reading process, measured: 162 MiB (.txt.gz) and 227 MiB
    (.jsonl.gz: readline joins its chunks), against 1121 MiB and 2658 MiB before the limit
    existed, when the document was decompressed whole; Python with the reader imported
    holds ~100 MiB."""
    bomb = salad_bomb(tmp_path / name, 512, head=head, tail=tail)
    assert bomb.stat().st_size < 16 * MiB
    start = time.perf_counter()
    message, peak_mib = read_in_child(bomb, tmp_path)
    assert re.fullmatch(rf".*{re.escape(name)}(:1)?: a document longer than data\.max_document_bytes = 67108864 bytes;.*",
                        message), message
    assert peak_mib < 300, f"peak RSS {peak_mib} MiB"
    assert time.perf_counter() - start < 30


@pytest.mark.parametrize("container", ["plain", "gz", "zst", "zip"])
@pytest.mark.parametrize("kind", ["txt", "jsonl"])
def test_a_document_over_the_limit_is_refused_in_every_container(tmp_path: Path, container: str, kind: str) -> None:
    limit = 4096
    fits, over = ("x" * limit, "y" * (limit + 1)) if kind == "txt" else (
        jsonl("x" * (limit - 12)).decode(), jsonl("y" * (limit - 11)).decode())
    assert len(fits.rstrip("\n").encode()) == limit and len(over.rstrip("\n").encode()) == limit + 1

    def write(stem: str, text: str) -> Path:
        data, name = text.encode(), f"{stem}.{kind}"
        if container == "zip":
            return make_zip(tmp_path / f"{stem}.zip", {name: data})
        compress = {"plain": bytes, "gz": gzip.compress, "zst": zstandard.ZstdCompressor().compress}[container]
        path = tmp_path / (name if container == "plain" else f"{name}.{container}")
        path.write_bytes(compress(data))
        return path

    assert len(docs(tmp_path, write("fits", fits), max_document_bytes=limit)) == 1
    line = ":1" if kind == "jsonl" else ""
    with pytest.raises(DataError, match=rf"over\.{kind}.*{line}: a document longer than data\.max_document_bytes = {limit}"):
        docs(tmp_path, write("over", over), max_document_bytes=limit)


def test_zstd_bomb_refused(tmp_path: Path) -> None:
    frame = zstandard.ZstdCompressor(level=19).compress(bytes(8 * MiB))
    bomb = tmp_path / "bomb.jsonl.zst"
    bomb.write_bytes(frame * 25)  # 200 MiB of zeros
    with pytest.raises(DataError, match=r"bomb\.jsonl\.zst: decompresses to more than data\.max_decompressed_bytes"):
        docs(tmp_path, bomb, max_decompressed_bytes=MiB)
    with pytest.raises(DataError, match=r"bomb\.jsonl\.zst: compression ratio over 200:1"):
        docs(tmp_path, bomb)


def test_zip_bomb_high_ratio_refused_before_reading(tmp_path: Path) -> None:
    bomb = zeros_zip(tmp_path / "bomb.zip", "zeros.txt", 50)
    with pytest.raises(DataError, match=r"bomb\.zip!zeros\.txt: compression ratio over 200:1"):
        docs(tmp_path, bomb)
    with pytest.raises(DataError, match=r"bomb\.zip!zeros\.txt: declares 52428800 bytes, over data\.max_decompressed_bytes = 1048576"):
        docs(tmp_path, bomb, max_decompressed_bytes=MiB)


def test_zip_bomb_with_lying_declared_size_refused(tmp_path: Path) -> None:
    bomb = zeros_zip(tmp_path / "liar.zip", "zeros.txt", 50)
    patch_member_header(bomb, file_size=1000)  # looks harmless: 1000 bytes from ~50 KB
    start = time.perf_counter()
    with pytest.raises(DataError, match=r"liar\.zip!zeros\.txt: corrupt compressed data"):
        docs(tmp_path, bomb)
    assert time.perf_counter() - start < 2


def test_declared_size_is_not_trusted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Even if the zip reader produced more than the header declares, the meter refuses it.
    path = make_zip(tmp_path / "x.zip", {"a.txt": b"0123456789" * 100})
    real_open = zipfile.ZipFile.open

    def lying_open(self, info, *a, **kw):
        info.file_size = 10  # what the header "declared"
        return real_open(self, info, *a, **kw)

    monkeypatch.setattr(zipfile.ZipFile, "open", lying_open)
    monkeypatch.setattr(zipfile.ZipExtFile, "read", lambda self, n=-1: b"x" * min(n, 64) if n else b"")
    with pytest.raises(DataError, match=r"x\.zip!a\.txt: decompresses to more than the 10 bytes its header declares"):
        docs(tmp_path, path)


def test_decompressed_bytes_count_toward_the_total(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("x" * 100)
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(jsonl("y" * 500) * 4))
    assert (tmp_path / "b.jsonl.gz").stat().st_size < 200  # passes the on-disk total check
    with pytest.raises(DataError, match=r"max_total_bytes = 1000 .*decompressed.*b\.jsonl\.gz"):
        docs(tmp_path, tmp_path, max_total_bytes=1000)
    make_zip(tmp_path / "c.zip", {"m.txt": b"z" * 2000})
    with pytest.raises(DataError, match=r"max_total_bytes = 1500 .*c\.zip!m\.txt"):
        docs(tmp_path, tmp_path / "c.zip", max_total_bytes=1500)


def test_too_many_members(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(archives, "MAX_ZIP_MEMBERS", 5)
    path = make_zip(tmp_path / "many.zip", {f"{i}.txt": b"x" for i in range(6)})
    with pytest.raises(DataError, match=r"many\.zip: 6 members, over the limit of 5"):
        docs(tmp_path, path)
    # the end record's count can lie; the parsed directory is counted too
    data = bytearray(path.read_bytes())
    eocd = data.rfind(b"PK\x05\x06")
    struct.pack_into("<HH", data, eocd + 8, 1, 1)
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"many\.zip: more than 5 members"):
        docs(tmp_path, path)


# ---- hostile zips ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("../../evil.txt", "'..' component"),
        ("ok/../../evil.txt", "'..' component"),
        ("/etc/x.txt", "absolute path"),
        ("C:\\x.txt", "backslash"),
        ("C:x.txt", "drive letter"),
        ("dir\\..\\x.txt", "backslash"),
        ("skipped.csv\x00.txt", "NUL"),
    ],
)
def test_zip_slip_names_refused(tmp_path: Path, name: str, why: str) -> None:
    # hostile even where the member would be skipped, and although nothing is ever extracted
    path = make_zip(tmp_path / "slip.zip", {"fine.txt": b"fine", name.replace("\x00", "\x01"): b"pwned"})
    if "\x00" in name:  # zipfile cuts names at NUL when writing: put it in by hand
        path.write_bytes(path.read_bytes().replace(b"skipped.csv\x01.txt", b"skipped.csv\x00.txt"))
    with pytest.raises(DataError, match=rf"slip\.zip: member name .* {why}.*zip-slip"):
        docs(tmp_path, path)


def test_encrypted_member_refused(tmp_path: Path) -> None:
    path = make_zip(tmp_path / "enc.zip", {"secret.txt": b"hidden text"})
    patch_member_header(path, flag_bits=0x1)
    with pytest.raises(DataError, match=r"enc\.zip!secret\.txt: member is encrypted"):
        docs(tmp_path, path)


def test_duplicate_member_names_refused(tmp_path: Path) -> None:
    path = tmp_path / "dup.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("a.txt", b"first")
        with pytest.warns(UserWarning, match="Duplicate name"):
            zf.writestr("a.txt", b"second")
    with pytest.raises(DataError, match=r"dup\.zip: member name 'a\.txt' appears twice"):
        docs(tmp_path, path)


def test_unsupported_members_and_methods_refused(tmp_path: Path) -> None:
    make_zip(tmp_path / "bz.zip", {"a.txt": b"bzip2 member"}, method=zipfile.ZIP_BZIP2)
    with pytest.raises(DataError, match=r"bz\.zip!a\.txt: compression method 12 is not supported"):
        docs(tmp_path, tmp_path / "bz.zip")
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": ["row"]}), buf)
    make_zip(tmp_path / "pq.zip", {"t.parquet": buf.getvalue()})
    with pytest.raises(DataError, match=r"pq\.zip!t\.parquet: parquet files and nested archives are not read"):
        docs(tmp_path, tmp_path / "pq.zip")
    make_zip(tmp_path / "nest.zip", {"inner.zip": b"PK"})
    with pytest.raises(DataError, match=r"nest\.zip!inner\.zip: .*nested archives"):
        docs(tmp_path, tmp_path / "nest.zip")
    (tmp_path / "t.parquet.gz").write_bytes(gzip.compress(buf.getvalue()))
    with pytest.raises(DataError, match=r"t\.parquet\.gz: parquet inside \.gz is not supported"):
        docs(tmp_path, tmp_path / "t.parquet.gz")


def test_hostile_name_rules() -> None:
    assert archives.hostile_name("a/b/c.txt") is None
    assert archives.hostile_name("a..b.txt") is None  # '..' only as a whole component
    for bad in ["..", "../x", "a/../b", "/x", "\\\\server\\share", "D:/x", "x\x00"]:
        assert archives.hostile_name(bad), bad


def test_zlib_bomb_inside_plain_deflate_helper_sanity() -> None:
    # the test bombs really are bombs: ~1000:1
    assert len(zlib.compress(bytes(MiB), 9)) < 1100
