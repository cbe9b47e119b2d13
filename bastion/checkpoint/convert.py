"""The one door for pickle checkpoints: an explicit, scanned, restricted conversion.

Pickle can run any code while loading, so Bastion never loads it implicitly. With
`--allow-pickle` a PyTorch zip checkpoint (`torch.save` format, also HF `pytorch_model.bin`)
is converted to safetensors in three independent layers, all on one open file (a file
swapped after the checks is never the one loaded):
  0. the archive is the exact bytes torch.load will read: it starts with a zip header at
     byte 0 (torch.load's own test), every byte belongs to a stored member, the central
     directory or the end record (nothing before, between or after: no polyglot pickle +
     zip, whose leading pickle torch would read while `zipfile` finds a harmless zip at the
     end), member names are unique even ignoring case (torch's reader looks them up
     case-insensitively) and all under the folder of the first entry, as torch requires;
  1. a static scan of every opcode of `<folder>/data.pkl`, the pickle torch unpickles, on
     a symbolic stack: only a small allowlist of globals may be named, only the tensor
     rebuilders among them may be called, STACK_GLOBAL needs two plain strings, and nothing
     may follow the pickle's STOP;
  2. only then `torch.load(weights_only=True)`, PyTorch's restricted unpickler (which alone
     has had bypasses, CVE-2025-32434 among them - hence layers 0 and 1).
Legacy (pre-1.6) torch.save files and raw pickles are refused: re-save them with a current
torch in a sandbox you trust.
"""
from __future__ import annotations

import os
import pickletools
import stat
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import safetensors.torch
import torch

from bastion.checkpoint.manifest import MANIFEST, build_manifest, manifest_bytes
from bastion.errors import CheckpointError
from bastion.safeio import fsync_dir, make_private_dir, write_bytes

MAX_PICKLE_FILE_BYTES = 64 * 2**30
MAX_PICKLE_BYTES = 256 * 2**20  # the data.pkl stream itself (tensor bytes live beside it)
MAX_MEMBERS = 200_000  # a storage per tensor: far beyond any real model
MAX_CENTRAL_DIRECTORY_BYTES = 64 * 2**20
MAX_SCAN_ITEMS = 1_000_000  # stack + memo entries of the symbolic scan (a real data.pkl: ~10 per tensor)
# Functions a tensor checkpoint calls while unpickling (REDUCE / NEWOBJ / OBJ / INST).
CALLABLE_GLOBALS = {
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch", "device"),
}
# Storage types appear only as data, inside the persistent ids that name tensor bytes.
STORAGE_GLOBALS = {("torch", f"{kind}Storage") for kind in
                   ("Float", "Double", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte", "Bool")}
ALLOWED_GLOBALS = CALLABLE_GLOBALS | STORAGE_GLOBALS
STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}
FORBIDDEN_OPS = {"EXT1", "EXT2", "EXT4"}
MUTATING_OPS = {"BUILD", "APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS"}

_ZIP_LOCAL = b"PK\x03\x04"
_END = struct.Struct("<4s4H2LH")  # end of central directory record
_ZIP64_LOCATOR = struct.Struct("<4sLQL")
_ZIP64_END = struct.Struct("<4sQ2H2L4Q")
_LOCAL_HEADER = struct.Struct("<4s5H3L2H")


@dataclass(frozen=True)
class _Global:
    module: str
    name: str


_MARK = object()  # where MARK split the stack
_VALUE = object()  # any value the scan does not need to know


class _PickleScan:
    """The unpickler's stack and memo, with values reduced to what matters: strings (the
    operands of STACK_GLOBAL), globals, and anything else."""

    def __init__(self, where: str):
        self.where = where
        self.stack: list[Any] = []
        self.metastack: list[list[Any]] = []
        self.memo: dict[int, Any] = {}
        self.seen: set[tuple[str, str]] = set()

    def refuse(self, why: str) -> CheckpointError:
        return CheckpointError(f"{self.where}: {why}; refused (it could execute code)")

    def pop(self) -> Any:
        if not self.stack:
            raise CheckpointError(f"{self.where}: malformed pickle stream (stack underflow)")
        return self.stack.pop()

    def pop_mark(self) -> list[Any]:
        if not self.metastack:
            raise CheckpointError(f"{self.where}: malformed pickle stream (no MARK)")
        items, self.stack = self.stack, self.metastack.pop()
        return items

    def top(self) -> Any:
        if not self.stack:
            raise CheckpointError(f"{self.where}: malformed pickle stream (stack underflow)")
        return self.stack[-1]

    def push(self, value: Any) -> None:
        self.bound()
        self.stack.append(value)

    def bound(self) -> None:
        if len(self.stack) + len(self.memo) > MAX_SCAN_ITEMS:
            raise CheckpointError(f"{self.where}: pickle holds more than {MAX_SCAN_ITEMS} objects")

    def global_(self, module: Any, name: Any) -> _Global:
        if (module, name) not in ALLOWED_GLOBALS:
            raise CheckpointError(f"{self.where}: refers to {module}.{name}, which is not a tensor-rebuilding global; "
                                  "refusing to load it (it could execute code)")
        self.seen.add((module, name))
        return _Global(module, name)

    def call(self, target: Any) -> None:
        if not isinstance(target, _Global):
            raise self.refuse("calls a computed object, not a named function")
        if (target.module, target.name) not in CALLABLE_GLOBALS:
            raise self.refuse(f"calls {target.module}.{target.name}, which is not a tensor-rebuilding function")
        self.push(_VALUE)

    def step(self, opcode: pickletools.OpcodeInfo, arg: Any) -> None:
        name = opcode.name
        if name in FORBIDDEN_OPS:
            raise CheckpointError(f"{self.where}: uses the pickle extension registry ({name}); refused")
        if name in STRING_OPS:
            self.push(str(arg))
        elif name == "GLOBAL":
            self.push(self.global_(*str(arg).partition(" ")[::2]))
        elif name == "STACK_GLOBAL":
            attr, module = self.pop(), self.pop()
            if not (isinstance(module, str) and isinstance(attr, str)):
                raise CheckpointError(f"{self.where}: STACK_GLOBAL with operands that are not plain strings; refused")
            self.push(self.global_(module, attr))
        elif name in ("REDUCE", "NEWOBJ", "NEWOBJ_EX"):
            for _ in range({"REDUCE": 1, "NEWOBJ": 1, "NEWOBJ_EX": 2}[name]):
                self.pop()  # arguments
            self.call(self.pop())
        elif name in ("INST", "OBJ"):
            items = self.pop_mark()
            if name == "INST":
                items.insert(0, self.global_(*str(arg).partition(" ")[::2]))
            self.call(items[0] if items else None)
        else:
            self.step_data(opcode, arg)

    def step_data(self, opcode: pickletools.OpcodeInfo, arg: Any) -> None:
        """Opcodes that move values around without calling anything."""
        name = opcode.name
        if name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
            self.bound()
            self.memo[len(self.memo) if name == "MEMOIZE" else int(arg)] = self.top()
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            if int(arg) not in self.memo:
                raise CheckpointError(f"{self.where}: malformed pickle stream (memo entry {arg} not set)")
            self.push(self.memo[int(arg)])
        elif name == "DUP":
            self.push(self.top())
        elif name == "MARK":
            self.metastack.append(self.stack)
            self.stack = []
        elif name == "POP" and not self.stack:
            self.pop_mark()  # what the unpickler does
        else:
            self.generic(opcode)

    def generic(self, opcode: pickletools.OpcodeInfo) -> None:
        """Pop what the opcode consumes and push anonymous values for what it produces."""
        before = opcode.stack_before
        if pickletools.markobject in before:
            self.pop_mark()
            before = before[: before.index(pickletools.markobject)]
        popped = [self.pop() for _ in before]
        target = popped[-1] if popped else None  # the deepest operand: the object an update changes
        if opcode.name in MUTATING_OPS and isinstance(target, _Global):
            raise self.refuse(f"{opcode.name} changes {target.module}.{target.name} itself")
        for _ in opcode.stack_after:
            self.push(_VALUE)


def scan_pickle(data: bytes, where: str) -> set[tuple[str, str]]:
    """Every global the pickle references, refusing any outside ALLOWED_GLOBALS, any call of
    something but a tensor rebuilder, and any byte after the pickle's STOP. Static: no object
    is constructed. Returns the globals seen (for reporting)."""
    scan = _PickleScan(where)
    end = None
    try:
        for opcode, arg, pos in pickletools.genops(data):
            if opcode.name == "STOP":
                end = pos + 1
                break
            if opcode.name not in ("FRAME", "PROTO"):
                scan.step(opcode, arg)
    except (ValueError, EOFError) as exc:  # genops raises these on malformed streams
        raise CheckpointError(f"{where}: malformed pickle stream ({exc})") from None
    if end is None:
        raise CheckpointError(f"{where}: malformed pickle stream (no STOP)")
    if end != len(data):
        raise CheckpointError(f"{where}: {len(data) - end} bytes after the pickle's end (a second pickle?); refused")
    return scan.seen


def _read_at(fh: BinaryIO, offset: int, n: int, where: str) -> bytes:
    if offset < 0:
        raise CheckpointError(f"{where}: truncated or malformed zip archive")
    fh.seek(offset)
    data = fh.read(n)
    if len(data) != n:
        raise CheckpointError(f"{where}: truncated or malformed zip archive")
    return data


def _central_directory(fh: BinaryIO, size: int, where: str) -> int:
    """The central directory's offset, where it ends exactly where the end record starts
    and that record ends the file: no comment, no trailing bytes, no data before the archive
    (zipfile would shift every offset past such data; torch.load would not)."""
    if size < _END.size:
        raise CheckpointError(f"{where}: not a zip archive")
    sig, disk, cd_disk, _, entries, cd_size, cd_offset, comment = _END.unpack(_read_at(fh, size - _END.size, _END.size, where))
    if sig != b"PK\x05\x06" or comment:
        raise CheckpointError(f"{where}: the zip archive does not end at its end record (trailing bytes or a comment)")
    end = size - _END.size
    if end >= _ZIP64_LOCATOR.size and _read_at(fh, end - _ZIP64_LOCATOR.size, 4, where) == b"PK\x06\x07":
        end, cd_size, cd_offset = _zip64_directory(fh, end, where)  # torch.save always writes one
    elif 0xFFFFFFFF in (cd_size, cd_offset) or entries == 0xFFFF:
        raise CheckpointError(f"{where}: malformed zip64 end record")
    if disk or cd_disk:
        raise CheckpointError(f"{where}: split zip archives are not read")
    if cd_offset + cd_size != end:
        raise CheckpointError(f"{where}: bytes before the archive or after its central directory (a polyglot file?)")
    if cd_size > MAX_CENTRAL_DIRECTORY_BYTES:
        raise CheckpointError(f"{where}: zip central directory over {MAX_CENTRAL_DIRECTORY_BYTES} bytes")
    return cd_offset


def _zip64_directory(fh: BinaryIO, end: int, where: str) -> tuple[int, int, int]:
    """(where the zip64 end record starts, central directory size, offset)."""
    sig, _, record_offset, _ = _ZIP64_LOCATOR.unpack(_read_at(fh, end - _ZIP64_LOCATOR.size, _ZIP64_LOCATOR.size, where))
    if sig != b"PK\x06\x07":
        raise CheckpointError(f"{where}: malformed zip64 end record")
    record = _ZIP64_END.unpack(_read_at(fh, record_offset, _ZIP64_END.size, where))
    if record[0] != b"PK\x06\x06" or record_offset + 12 + record[1] != end - _ZIP64_LOCATOR.size:
        raise CheckpointError(f"{where}: malformed zip64 end record")
    return record_offset, record[8], record[9]


def _check_names(members: list[zipfile.ZipInfo], where: str) -> str:
    """The archive's folder; every member in it, names unique even ignoring case (torch's
    reader looks records up case-insensitively: two spellings of data.pkl would leave it to
    chance which one is unpickled)."""
    if not members or len(members) > MAX_MEMBERS:
        raise CheckpointError(f"{where}: archive holds {len(members)} members (1 to {MAX_MEMBERS} expected)")
    for info in members:
        if info.filename.startswith(("/", "\\")) or ".." in Path(info.filename).parts:
            raise CheckpointError(f"{where}: archive member {info.filename!r} escapes the archive")
    folder = members[0].filename.split("/", 1)[0]
    names = [info.filename.lower() for info in members]
    if len(set(names)) != len(names):
        raise CheckpointError(f"{where}: archive holds two members with the same name (ignoring case)")
    if not all(info.filename.startswith(folder + "/") for info in members):
        raise CheckpointError(f"{where}: archive members outside the folder {folder!r} of its first entry")
    if sum(m.file_size for m in members) > MAX_PICKLE_FILE_BYTES:
        raise CheckpointError(f"{where}: archive expands past {MAX_PICKLE_FILE_BYTES} bytes")
    return folder


def _descriptor_length(fh: BinaryIO, offset: int, info: zipfile.ZipInfo, where: str) -> int:
    """Length of the data descriptor at `offset` (torch.save writes one after each member)."""
    data = _read_at(fh, offset, 4, where)
    forms = [struct.pack("<LQQ", info.CRC, info.compress_size, info.file_size)]
    if max(info.compress_size, info.file_size) < 2**32:
        forms.append(struct.pack("<LLL", info.CRC, info.compress_size, info.file_size))
    for body in forms + [b"PK\x07\x08" + form for form in forms]:
        if data == body[:4] and _read_at(fh, offset, len(body), where) == body:
            return len(body)
    raise CheckpointError(f"{where}: malformed data descriptor after {info.filename!r}")


def _check_layout(fh: BinaryIO, members: list[zipfile.ZipInfo], cd_offset: int, where: str) -> None:
    """Every byte before the central directory belongs to a stored, unencrypted member whose
    local header matches its directory entry: nothing hidden before or between members."""
    position = 0
    for info in sorted(members, key=lambda m: m.header_offset):
        if info.header_offset != position:
            raise CheckpointError(f"{where}: bytes outside any archive member at offset {position}")
        sig, _, flags, method, _, _, _, _, _, name_len, extra_len = _LOCAL_HEADER.unpack(
            _read_at(fh, position, _LOCAL_HEADER.size, where))
        name = _read_at(fh, position + _LOCAL_HEADER.size, name_len, where).decode("utf-8" if flags & 0x800 else "cp437", "replace")
        if sig != _ZIP_LOCAL or name != info.orig_filename:
            raise CheckpointError(f"{where}: local header of {info.filename!r} does not match the central directory")
        if method != zipfile.ZIP_STORED or info.compress_type != zipfile.ZIP_STORED or flags & 0x1:
            raise CheckpointError(f"{where}: member {info.filename!r} is compressed or encrypted (torch.save stores them)")
        position += _LOCAL_HEADER.size + name_len + extra_len + info.compress_size
        if info.flag_bits & 0x8:
            position += _descriptor_length(fh, position, info, where)
    if position != cd_offset:
        raise CheckpointError(f"{where}: bytes between the last archive member and the central directory")


def _data_pickle(fh: BinaryIO, size: int, where: str) -> bytes:
    """The bytes torch.load unpickles from this file: `<folder>/data.pkl` of a zip archive
    that is exactly the file."""
    if _read_at(fh, 0, 4, where) != _ZIP_LOCAL:
        raise CheckpointError(
            f"{where}: not a PyTorch zip checkpoint (it does not start with a zip header); legacy (pre-1.6) and raw "
            "pickle files are not converted. Re-save it with a current torch.save in a sandbox you trust."
        )
    cd_offset = _central_directory(fh, size, where)
    try:
        with zipfile.ZipFile(fh) as archive:
            members = archive.infolist()
            folder = _check_names(members, where)
            _check_layout(fh, members, cd_offset, where)
            pickles = [m for m in members if m.filename.lower() == f"{folder}/data.pkl".lower()]
            if len(pickles) != 1 or pickles[0].filename != f"{folder}/data.pkl":
                raise CheckpointError(f"{where}: expected exactly one data.pkl in the archive folder {folder!r}")
            if pickles[0].file_size > MAX_PICKLE_BYTES:
                raise CheckpointError(f"{where}: data.pkl is {pickles[0].file_size} bytes, over {MAX_PICKLE_BYTES}")
            return archive.read(pickles[0])
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, ValueError, EOFError) as exc:
        raise CheckpointError(f"{where}: not a valid zip archive ({str(exc)[:200]})") from None


def _open_source(src: Path) -> BinaryIO:
    """`src` opened once, never through a symlink, refused unless a regular file."""
    try:
        fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        raise CheckpointError(f"{src}: not a regular file") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_PICKLE_FILE_BYTES:
        os.close(fd)
        raise CheckpointError(f"{src}: not a regular file of at most {MAX_PICKLE_FILE_BYTES} bytes")
    return os.fdopen(fd, "rb")


def scan_file(src: str | Path) -> set[tuple[str, str]]:
    """Layers 0 and 1 on a file, nothing loaded: the globals its data.pkl names, or
    CheckpointError saying why it is refused."""
    with _open_source(Path(src)) as fh:
        return scan_pickle(_data_pickle(fh, os.fstat(fh.fileno()).st_size, str(src)), str(src))


def _state_dict(obj: object, where: Path) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} from what torch.save stored (a state dict, or one under a
    conventional key such as "state_dict" or "model")."""
    if isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("state_dict", "model", "module"):
            if isinstance(obj.get(key), dict):
                return _state_dict(obj[key], where)
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise CheckpointError(f"{where}: does not hold a state dict of named tensors")
    return {k: v.detach().contiguous() for k, v in obj.items()}


def _restricted_load(src: Path) -> object:
    """Layers 0-2 on one open file: the bytes scanned are the bytes torch unpickles."""
    with _open_source(src) as fh:
        scan_pickle(_data_pickle(fh, os.fstat(fh.fileno()).st_size, str(src)), str(src))
        fh.seek(0)
        try:
            return torch.load(fh, map_location="cpu", weights_only=True)  # security-reviewed: after layers 0 and 1
        except Exception as exc:  # torch raises many types here; the message matters, not the type
            raise CheckpointError(f"{src}: restricted load failed ({type(exc).__name__}: {str(exc)[:300]})") from None


def convert_pickle(src: str | Path, out_dir: str | Path, *, allow_pickle: bool = False) -> Path:
    """Convert a PyTorch pickle checkpoint into OUT_DIR/model.safetensors + MANIFEST.json."""
    src, out_dir = Path(src), Path(out_dir)
    if not allow_pickle:
        raise CheckpointError(f"{src}: converting a pickle file needs the explicit --allow-pickle flag")
    if out_dir.exists():
        raise CheckpointError(f"{out_dir} already exists; choose a new output folder")
    tensors = _state_dict(_restricted_load(src), src)
    shared = {}
    for name, tensor in tensors.items():  # safetensors refuses aliasing views: store copies
        key = tensor.untyped_storage().data_ptr()
        tensors[name] = tensor.clone() if key in shared else tensor
        shared[key] = name
    files = {"model.safetensors": safetensors.torch.save(tensors, metadata={"converted_from": src.name[:200]})}
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    make_private_dir(tmp)
    for name, data in files.items():
        write_bytes(tmp / name, data)
    write_bytes(tmp / MANIFEST, manifest_bytes(build_manifest(files)))
    fsync_dir(tmp)
    tmp.rename(out_dir)
    fsync_dir(out_dir.parent)
    return out_dir
