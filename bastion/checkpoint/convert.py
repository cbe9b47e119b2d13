"""The one door for pickle checkpoints: an explicit, scanned, restricted conversion.

Pickle can run any code while loading, so Bastion never loads it implicitly. With
`--allow-pickle` a PyTorch zip checkpoint (`torch.save` format, also HF `pytorch_model.bin`)
is converted to safetensors in two independent layers:
  1. a static scan of every opcode of its pickle: only a small allowlist of globals (tensor
     rebuilders, storages, OrderedDict) may be referenced; anything else, unresolvable
     STACK_GLOBAL operands, or the extension registry refuses the file before loading;
  2. only then `torch.load(weights_only=True)`, PyTorch's restricted unpickler (which alone
     has had bypasses, CVE-2025-32434 among them - hence layer 1).
The archive itself is checked first: size limits, no absolute or `..` member names.
"""
from __future__ import annotations

import pickletools
import zipfile
from pathlib import Path

import safetensors.torch
import torch

from bastion.checkpoint.manifest import MANIFEST, build_manifest, manifest_bytes
from bastion.errors import CheckpointError
from bastion.safeio import fsync_dir, make_private_dir, write_bytes

MAX_PICKLE_FILE_BYTES = 64 * 2**30
MAX_PICKLE_BYTES = 256 * 2**20  # the data.pkl stream itself (tensor bytes live beside it)
ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch", "device"),
    *{("torch", f"{kind}Storage") for kind in
      ("Float", "Double", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte", "Bool")},
}
STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}
FORBIDDEN_OPS = {"EXT1", "EXT2", "EXT4"}


def scan_pickle(data: bytes, where: str) -> set[tuple[str, str]]:
    """Every global the pickle references, refusing any outside ALLOWED_GLOBALS. Static: no
    object is constructed. Returns the globals seen (for reporting)."""
    seen: set[tuple[str, str]] = set()
    recent: list[object] = []  # values of recent pushes, to resolve STACK_GLOBAL operands
    memo: dict[int, object] = {}

    def allow(module: str, name: str) -> None:
        if (module, name) not in ALLOWED_GLOBALS:
            raise CheckpointError(f"{where}: refers to {module}.{name}, which is not a tensor-rebuilding global; "
                                  "refusing to load it (it could execute code)")
        seen.add((module, name))

    try:
        for opcode, arg, _ in pickletools.genops(data):
            name = opcode.name
            if name in FORBIDDEN_OPS:
                raise CheckpointError(f"{where}: uses the pickle extension registry ({name}); refused")
            if name in ("GLOBAL", "INST"):
                module, _, attr = str(arg).partition(" ")
                allow(module, attr)
            elif name == "STACK_GLOBAL":
                if len(recent) < 2 or not all(isinstance(v, str) for v in recent[-2:]):
                    raise CheckpointError(f"{where}: STACK_GLOBAL with operands that are not plain strings; refused")
                allow(recent[-2], recent[-1])
            if name in STRING_OPS:
                recent.append(arg if isinstance(arg, str) else str(arg))
            elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
                memo[int(arg)] = recent[-1] if recent else None
            elif name == "MEMOIZE":
                memo[len(memo)] = recent[-1] if recent else None
            elif name in ("BINGET", "LONG_BINGET", "GET"):
                recent.append(memo.get(int(arg)))
            elif name not in ("FRAME", "PROTO"):
                recent.append(None)  # any other push or operation breaks a string pair
    except (ValueError, EOFError) as exc:  # genops raises these on malformed streams
        raise CheckpointError(f"{where}: malformed pickle stream ({exc})") from None
    return seen


def _data_pickle(path: Path) -> bytes:
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path}: not a PyTorch zip checkpoint; legacy (pre-1.6) and raw pickle files are not converted. "
            "Re-save it with a current torch.save in a sandbox you trust."
        )
    with zipfile.ZipFile(path) as archive:
        members = archive.infolist()
        for info in members:
            if info.filename.startswith(("/", "\\")) or ".." in Path(info.filename).parts:
                raise CheckpointError(f"{path}: archive member {info.filename!r} escapes the archive")
        pickles = [m for m in members if m.filename.endswith("/data.pkl") or m.filename == "data.pkl"]
        if len(pickles) != 1:
            raise CheckpointError(f"{path}: expected exactly one data.pkl in the archive, found {len(pickles)}")
        if pickles[0].file_size > MAX_PICKLE_BYTES:
            raise CheckpointError(f"{path}: data.pkl is {pickles[0].file_size} bytes, over {MAX_PICKLE_BYTES}")
        if sum(m.file_size for m in members) > MAX_PICKLE_FILE_BYTES:
            raise CheckpointError(f"{path}: archive expands past {MAX_PICKLE_FILE_BYTES} bytes")
        return archive.read(pickles[0])


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


def convert_pickle(src: str | Path, out_dir: str | Path, *, allow_pickle: bool = False) -> Path:
    """Convert a PyTorch pickle checkpoint into OUT_DIR/model.safetensors + MANIFEST.json."""
    src, out_dir = Path(src), Path(out_dir)
    if not allow_pickle:
        raise CheckpointError(f"{src}: converting a pickle file needs the explicit --allow-pickle flag")
    if not src.is_file() or src.is_symlink():
        raise CheckpointError(f"{src}: not a regular file")
    if src.stat().st_size > MAX_PICKLE_FILE_BYTES:
        raise CheckpointError(f"{src}: larger than {MAX_PICKLE_FILE_BYTES} bytes")
    if out_dir.exists():
        raise CheckpointError(f"{out_dir} already exists; choose a new output folder")
    scan_pickle(_data_pickle(src), str(src))
    try:
        obj = torch.load(src, map_location="cpu", weights_only=True)  # security-reviewed: after the opcode scan above
    except Exception as exc:  # torch raises many types here; the message matters, not the type
        raise CheckpointError(f"{src}: restricted load failed ({type(exc).__name__}: {str(exc)[:300]})") from None
    tensors = _state_dict(obj, src)
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

