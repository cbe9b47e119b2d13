"""A corpus of hostile and benign PyTorch pickle files: the converter's tests use it, and it
measures Bastion's pickle scan against picklescan, modelscan and fickling (docs/pickle-scan.md).

    python tests/synthetic/pickles.py OUT_DIR             write the corpus and OUT_DIR/index.json
    python tests/synthetic/pickles.py --compare [--oracle] [OUT_DIR]
                                                          detection / false-positive table per tool

Every hostile payload does one harmless thing if it runs: it creates its own sentinel file
(SENTINELS/<case>), so "did it execute" is a file check. `--oracle` loads every file with
torch.load(weights_only=False) in a child process (in OUT_DIR, payloads only touch the
sentinels) and labels each case by what really happened: "hostile" cases must create their
sentinel, "inert" ones (a payload torch never reaches, e.g. a pickle after a zip's end) must
not. Benign files are real torch.save outputs: "weights" (state dicts of the dtypes
safetensors checkpoints hold, the converter's job) and "other" (legacy format, numpy,
argparse, float8... - benign, but not what `ckpt convert` is for).
"""
from __future__ import annotations

import argparse
import codecs
import collections
import contextlib
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class Case:
    name: str
    kind: str  # "hostile" | "inert" | "weights" | "other"
    technique: str
    data: bytes
    suffix: str = ".pt"

    def path(self, root: Path) -> Path:
        return root / "files" / f"{self.name}{self.suffix}"


# ---------------------------------------------------------------- a small pickle assembler
def _s(text: str) -> bytes:
    raw = text.encode()
    return b"\x8c" + bytes([len(raw)]) + raw if len(raw) < 256 else b"X" + struct.pack("<I", len(raw)) + raw


def _arg(value) -> bytes:
    if isinstance(value, str):
        return _s(value)
    if isinstance(value, bytes):
        return b"B" + struct.pack("<I", len(value)) + value
    if isinstance(value, int):
        return b"J" + struct.pack("<i", value)
    if isinstance(value, list):
        return b"](" + b"".join(_arg(v) for v in value) + b"e"
    if isinstance(value, dict):
        return b"}"
    raise TypeError(value)


def _tuple(args: tuple) -> bytes:
    return b"(" + b"".join(_arg(a) for a in args) + b"t"


def _global(module: str, name: str, style: str) -> tuple[bytes, bytes]:
    """(prefix, opcodes pushing the global): GLOBAL, STACK_GLOBAL, STACK_GLOBAL on operands
    fetched from the memo after unrelated work, or operands computed by _codecs.decode."""
    if style == "global":
        return b"", b"c" + module.encode() + b"\n" + name.encode() + b"\n"
    if style == "stack":
        return b"", _s(module) + _s(name) + b"\x93"
    if style == "memo":  # strings parked in the memo inside a harmless dict, fetched much later
        prefix = b"}(" + _s("a") + _s(module) + b"r\xc8\x00\x00\x00" + _s("b") + _s(name) + b"r\xc9\x00\x00\x00u0"
        return prefix, b"j\xc8\x00\x00\x00j\xc9\x00\x00\x00\x93"
    if style == "computed":  # names decoded at load time: no plain string names the global
        decode = _s("_codecs") + _s("decode") + b"\x93"
        return b"", (decode + _tuple((codecs.encode(module, "rot13"), "rot13")) + b"R"
                     + decode + _tuple((codecs.encode(name, "rot13"), "rot13")) + b"R\x93")
    raise ValueError(style)


def call(module: str, name: str, args: tuple, style: str = "stack", op: str = "reduce") -> bytes:
    """A protocol-4 pickle whose result is module.name(*args)."""
    prefix, push = _global(module, name, style)
    if op == "reduce":
        body = push + _tuple(args) + b"R"
    elif op == "newobj":
        body = push + _tuple(args) + b"\x81"
    elif op == "obj":
        body = b"(" + push + b"".join(_arg(a) for a in args) + b"o"
    else:
        raise ValueError(op)
    return b"\x80\x04" + prefix + body + b"."


def inst(module: str, name: str, args: tuple) -> bytes:
    """Protocol 0/1 INST: the global and the call in one opcode."""
    return b"(" + b"".join(b"V" + a.encode("raw_unicode_escape") + b"\n" for a in args) + \
        b"i" + module.encode() + b"\n" + name.encode() + b"\n."


# ---------------------------------------------------------------- containers torch.load reads
MAGIC = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)


def torch_bytes(obj, **kwargs) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, **kwargs)
    return buffer.getvalue()


BENIGN_ZIP = None


def _benign_zip() -> bytes:
    global BENIGN_ZIP
    if BENIGN_ZIP is None:
        BENIGN_ZIP = torch_bytes({"w": torch.ones(2, 3)})
    return BENIGN_ZIP


def zip_with(data_pkl: bytes | list[tuple[str, bytes]], compress: int = zipfile.ZIP_STORED) -> bytes:
    """A real torch.save archive whose data.pkl is replaced (or whose members are given)."""
    source = zipfile.ZipFile(io.BytesIO(_benign_zip()))
    members = data_pkl if isinstance(data_pkl, list) else [
        (i.filename, data_pkl if i.filename.endswith("/data.pkl") else source.read(i)) for i in source.infolist()]
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate names are the point of some cases
        for name, data in members:
            archive.writestr(zipfile.ZipInfo(name), data, compress_type=compress)
    return out.getvalue()


def legacy_with(main: bytes, first: bytes = MAGIC) -> bytes:
    """The pre-1.6 torch.save layout: magic, protocol, sys info, the object, storage keys."""
    sys_info = pickle.dumps({"protocol_version": 1001, "little_endian": True,
                             "type_sizes": {"short": 2, "int": 4, "long": 4}}, protocol=2)
    return first + pickle.dumps(1001, protocol=2) + sys_info + main + pickle.dumps([], protocol=2)


# ---------------------------------------------------------------- hostile payloads
def payloads(sentinel: str) -> list[tuple[str, str, tuple]]:
    """(module, name, args): calls that create `sentinel` when unpickled."""
    code = f"open({sentinel!r}, 'w').close()"
    return [
        ("os", "system", (f"touch {sentinel}",)), ("posix", "system", (f"touch {sentinel}",)),
        ("os", "popen", (f"touch {sentinel}",)), ("os", "mkdir", (sentinel,)),
        ("builtins", "exec", (code,)), ("builtins", "eval", (code,)), ("builtins", "open", (sentinel, "w")),
        ("subprocess", "Popen", (["touch", sentinel],)), ("subprocess", "call", (["touch", sentinel],)),
        ("subprocess", "run", (["touch", sentinel],)), ("subprocess", "getoutput", (f"touch {sentinel}",)),
        ("io", "open", (sentinel, "w")), ("_io", "FileIO", (sentinel, "w")), ("codecs", "open", (sentinel, "w")),
        ("runpy", "_run_code", (code, {})), ("timeit", "timeit", (code,)), ("cProfile", "run", (code,)),
        ("pydoc", "pipepager", ("x", f"touch {sentinel}")), ("uuid", "_get_command_stdout", ("touch", sentinel)),
        ("_osx_support", "_read_output", (f"touch {sentinel}",)),
        ("numpy.testing._private.utils", "runstring", (code, {})),
        ("torch.fx.graph_module", "_forward_from_src", (code, {})),
        ("shutil", "copyfile", ("/etc/hostname", sentinel)), ("sqlite3", "connect", (sentinel,)),
        ("zipfile", "ZipFile", (sentinel, "w")), ("tarfile", "open", (sentinel, "w")),
    ]


def _inner_torch(sentinel: str) -> bytes:
    return zip_with(call("os", "system", (f"touch {sentinel}",)))


def hostile_cases(sentinels: Path) -> list[Case]:
    cases: list[Case] = []

    def add(name: str, technique: str, data: bytes, suffix: str = ".pt", kind: str = "hostile") -> None:
        cases.append(Case(name, kind, technique, data, suffix))

    def s(name: str) -> str:
        return str(sentinels / name)

    for module, name, _ in payloads("x"):
        for style in ("global", "stack", "memo", "computed"):
            case = f"{style}-{module}-{name}".replace(".", "_")
            args = next(a for m, n, a in payloads(s(case)) if (m, n) == (module, name))
            add(case, f"call via {style}", zip_with(call(module, name, args, style)))
    for op in ("newobj", "obj"):  # NEWOBJ runs only __new__: those payloads stay inert
        for module, name in (("subprocess", "Popen"), ("_io", "FileIO"), ("zipfile", "ZipFile")):
            case = f"{op}-{module}-{name}"
            args = next(a for m, n, a in payloads(s(case)) if (m, n) == (module, name))
            add(case, f"instantiate via {op.upper()}", zip_with(call(module, name, args, "stack", op)),
                kind="inert" if op == "newobj" else "hostile")
    for module, name in (("os", "system"), ("builtins", "exec"), ("subprocess", "getoutput")):
        case = f"inst-{module}-{name}"
        args = next(a for m, n, a in payloads(s(case)) if (m, n) == (module, name))
        add(case, "INST (protocol 0)", zip_with(inst(module, name, args)))
    cases += _protocol_cases(sentinels)
    cases += _nesting_cases(sentinels)
    cases += _container_cases(sentinels)
    return cases


class _Shell:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def _protocol_cases(sentinels: Path) -> list[Case]:
    """What pickle.dumps itself writes, protocols 0-5, inside a torch zip, raw and legacy."""
    out = []
    for protocol in range(6):
        for container in ("zip", "raw", "legacy"):
            name = f"protocol{protocol}-{container}"
            data = pickle.dumps({"w": _Shell(f"touch {sentinels / name}")}, protocol=protocol)
            wrapped = {"zip": zip_with, "raw": lambda d: d, "legacy": legacy_with}[container](data)
            out.append(Case(name, "hostile", f"pickle.dumps protocol 0-5 ({container})", wrapped,
                            ".pkl" if container == "raw" else ".pt"))
    return out


def _nesting_cases(sentinels: Path) -> list[Case]:
    """A harmless-looking outer call that unpickles an inner, hostile pickle."""
    def inner(name: str) -> bytes:
        return pickle.dumps(_Shell(f"touch {sentinels / name}"), protocol=2)

    return [
        Case("nested-pickle-loads", "hostile", "nested pickle", zip_with(call("pickle", "loads", (inner("nested-pickle-loads"),)))),
        Case("nested-_pickle-loads", "hostile", "nested pickle", zip_with(call("_pickle", "loads", (inner("nested-_pickle-loads"),)))),
        Case("nested-torch-load-from-bytes", "hostile", "nested pickle",
             zip_with(call("torch.storage", "_load_from_bytes", (_inner_torch(str(sentinels / "nested-torch-load-from-bytes")),)))),
        Case("rebuild-from-type", "hostile", "torch rebuilder calling anything",
             zip_with(b"\x80\x04" + _s("torch._tensor") + _s("_rebuild_from_type_v2") + b"\x93(" + _s("os") + _s("system")
                      + b"\x93" + _s("builtins") + _s("object") + b"\x93" + _tuple((f"touch {sentinels / 'rebuild-from-type'}",))
                      + b"}tR.")),
        Case("getattr-import", "hostile", "computed callable",
             zip_with(b"\x80\x04" + _s("builtins") + _s("getattr") + b"\x93(" + _s("importlib") + _s("import_module")
                      + b"\x93" + _tuple(("os",)) + b"R" + _s("system") + b"tR" + _tuple((f"touch {sentinels / 'getattr-import'}",))
                      + b"R.")),
        Case("rebuild-tensor-then-system", "hostile", "allowlisted globals first",
             zip_with(b"\x80\x04" + _s("torch._utils") + _s("_rebuild_tensor_v2") + b"\x930" + _s("os") + _s("system")
                      + b"\x93" + _tuple((f"touch {sentinels / 'rebuild-tensor-then-system'}",)) + b"R.")),
    ]


def _container_cases(sentinels: Path) -> list[Case]:
    """Where torch.load and a scanner's zipfile may read different bytes."""
    def shell(name: str) -> bytes:
        return call("os", "system", (f"touch {sentinels / name}",))

    benign_pkl = zipfile.ZipFile(io.BytesIO(_benign_zip())).read("archive/data.pkl")
    benign = _benign_zip()
    members = [(i.filename, zipfile.ZipFile(io.BytesIO(benign)).read(i))
               for i in zipfile.ZipFile(io.BytesIO(benign)).infolist() if not i.filename.endswith("data.pkl")]
    return [
        Case("polyglot-pickle-then-zip", "hostile", "polyglot", shell("polyglot-pickle-then-zip") + benign),
        Case("polyglot-legacy-then-zip", "hostile", "polyglot", legacy_with(shell("polyglot-legacy-then-zip")) + benign),
        Case("zip-then-pickle", "inert", "polyglot", benign + shell("zip-then-pickle")),
        Case("junk-then-hostile-zip", "inert", "polyglot", b"\x00" * 64 + zip_with(shell("junk-then-hostile-zip"))),
        Case("hostile-zip-then-junk", "hostile", "trailing bytes", zip_with(shell("hostile-zip-then-junk")) + b"\x00" * 64),
        Case("legacy-hostile-magic", "hostile", "legacy format", legacy_with(pickle.dumps({}, 2), first=shell("legacy-hostile-magic"))),
        Case("deflated-data-pkl", "hostile", "compressed member", zip_with(shell("deflated-data-pkl"), zipfile.ZIP_DEFLATED)),
        Case("duplicate-hostile-first", "inert", "duplicate members",  # torch reads the last of equal names
             zip_with([("archive/data.pkl", shell("duplicate-hostile-first")), ("archive/data.pkl", benign_pkl)] + members)),
        Case("duplicate-hostile-last", "hostile", "duplicate members",
             zip_with([("archive/data.pkl", benign_pkl), ("archive/data.pkl", shell("duplicate-hostile-last"))] + members)),
        Case("case-variant-name", "hostile", "duplicate members",
             zip_with([("archive/data.pkl", benign_pkl), ("archive/DATA.PKL", shell("case-variant-name"))] + members)),
        Case("second-folder", "inert", "duplicate members",
             zip_with([("archive/data.pkl", benign_pkl), ("other/data.pkl", shell("second-folder"))] + members)),
        Case("stacked-benign-first", "inert", "stacked pickles", zip_with(benign_pkl + shell("stacked-benign-first"))),
        Case("stacked-hostile-first", "hostile", "stacked pickles", zip_with(shell("stacked-hostile-first") + benign_pkl)),
        Case("raw-pickle", "hostile", "raw pickle", shell("raw-pickle"), ".pkl"),
    ]


# ---------------------------------------------------------------- benign files
def benign_cases() -> list[Case]:
    torch.manual_seed(0)
    weights: dict[str, object] = {
        "linear": torch.nn.Linear(8, 4).state_dict(),
        "embedding": torch.nn.Embedding(50, 8).state_dict(),
        "layernorm": torch.nn.LayerNorm(8).state_dict(),
        "encoder": torch.nn.TransformerEncoderLayer(16, 2, 32).state_dict(),
        "lstm": torch.nn.LSTM(4, 8, 2).state_dict(),
        "conv": torch.nn.Conv2d(3, 4, 3).state_dict(),
        "batchnorm": torch.nn.BatchNorm1d(4).state_dict(),
        "parameters": {"p": torch.nn.Parameter(torch.randn(3)), "q": torch.nn.Parameter(torch.ones(2), requires_grad=False)},
        "views": {"a": torch.arange(10.0)[2:7], "t": torch.randn(3, 4).t(), "s": torch.randn(4, 4)[::2]},
        "tied": (lambda w: {"emb": w, "head": w})(torch.randn(5, 3)),
        "scalars": {"n": torch.tensor(7), "x": torch.tensor(0.5), "e": torch.zeros(0, 3)},
        "large": {"w": torch.randn(256, 1024)},
        "wrapped": {"state_dict": torch.nn.Linear(3, 3).state_dict(), "epoch": 3, "lr": 0.1, "names": ["a", "b"]},
        "model-key": {"model": torch.nn.Linear(2, 2).state_dict(), "step": 10},
        "ordered": collections.OrderedDict([("b", torch.ones(1)), ("a", torch.zeros(1))]),
    }
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
                  torch.int16, torch.int8, torch.uint8, torch.bool):
        weights[f"dtype-{str(dtype)[6:]}"] = {"w": torch.ones(3, dtype=dtype)}
    cases = [Case(f"benign-{name}", "weights", "torch.save state dict", torch_bytes(obj)) for name, obj in weights.items()]
    for protocol in (2, 3, 4, 5):  # torch's restricted unpickler reads only protocols 2 and 3
        cases.append(Case(f"benign-protocol{protocol}", "weights" if protocol < 4 else "other",
                          "torch.save state dict" if protocol < 4 else "torch.save, not a plain state dict",
                          torch_bytes(weights["encoder"], pickle_protocol=protocol)))
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(1, 4)).sum().backward()
    optimizer.step()
    other = {
        "legacy": (weights["linear"], {"_use_new_zipfile_serialization": False}),
        "legacy-wrapped": (weights["wrapped"], {"_use_new_zipfile_serialization": False}),
        "optimizer": (optimizer.state_dict(), {}),
        "namespace": ({"args": argparse.Namespace(lr=0.1, layers=2), "w": torch.ones(1)}, {}),
        "numpy": ({"w": torch.ones(1), "best": __import__("numpy").float64(0.5)}, {}),
        "float8": ({"w": torch.zeros(2, dtype=torch.float8_e4m3fn)}, {}),
        "complex": ({"w": torch.zeros(2, dtype=torch.complex64)}, {}),
        "size": ({"w": torch.ones(1), "shape": torch.Size([2, 3])}, {}),
        "device": ({"w": torch.ones(2), "device": torch.device("cpu")}, {}),
        "tuple-set": ({"w": torch.ones(1), "t": (1, 2), "s": {1, 2}, "b": b"xy"}, {}),
    }
    cases += [Case(f"benign-{name}", "other", "torch.save, not a plain state dict", torch_bytes(obj, **kw))
              for name, (obj, kw) in other.items()]
    return cases


def build_corpus(root: Path) -> list[Case]:
    """Write every case under root/files (sentinels go to root/sentinels) and index.json."""
    sentinels = root / "sentinels"
    sentinels.mkdir(parents=True, exist_ok=True)
    (root / "files").mkdir(exist_ok=True)
    cases = hostile_cases(sentinels) + benign_cases()
    for case in cases:
        case.path(root).write_bytes(case.data)
    index = [{"name": c.name, "kind": c.kind, "technique": c.technique, "file": str(c.path(root))} for c in cases]
    (root / "index.json").write_text(json.dumps(index, indent=1))
    return cases


# ---------------------------------------------------------------- the comparison
ORACLE = """
import json, sys, warnings, torch
warnings.filterwarnings("ignore")
for entry in json.load(open(sys.argv[1])):
    try:
        torch.load(entry["file"], weights_only=False)  # security-reviewed: the oracle, in a child process on test payloads only
    except BaseException:
        pass
"""


def run_oracle(root: Path, cases: list[Case]) -> dict[str, bool]:
    """{case: its sentinel appeared} after torch.load(weights_only=False) of every file."""
    subprocess.run([sys.executable, "-c", ORACLE, str(root / "index.json")], cwd=root, timeout=600,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    return {c.name: (root / "sentinels" / c.name).exists() for c in cases}


def _bastion(path: Path) -> str:
    from bastion.checkpoint.convert import scan_file
    from bastion.errors import CheckpointError

    try:
        scan_file(path)
        return "pass"
    except CheckpointError:
        return "flag"


def _picklescan(path: Path, strict: bool = False) -> str:
    from picklescan.scanner import scan_file_path

    try:
        result = scan_file_path(str(path), strict=strict)
    except Exception:
        return "error"
    return "flag" if result.infected_files else ("error" if result.scan_err else "pass")


def _modelscan(path: Path) -> str:
    from modelscan.modelscan import ModelScan

    result = ModelScan().scan(path)
    return "flag" if result.get("issues") else ("error" if result.get("errors") else "pass")


def _fickling(path: Path) -> str:
    """fickling's own recipe for model files (its Hugging Face scan): zip members, else the pickle."""
    from fickling.loader import scan_file, scan_zip_archive
    from fickling.polyglot import find_file_properties

    props = find_file_properties(str(path))
    if props["is_torch_zip"] or props["is_standard_zip"]:
        results = list(scan_zip_archive(str(path), graceful=True).values())
    elif props["is_valid_pickle"] or path.suffix in (".pkl", ".pt", ".bin"):
        results = [scan_file(str(path), graceful=True)]
    else:
        return "pass"
    if any(not r.is_safe for r in results):
        return "flag"
    return "error" if any(r.errors for r in results) else "pass"


def _fickling_ml(path: Path) -> str:
    """fickling's allowlist for ML files (the `MLAllowlist` analysis its safe ML unpickler
    uses), applied statically to the same pickles as `_fickling`."""
    from fickling.analysis import Analyzer, Severity, check_safety
    from fickling.fickle import StackedPickle
    from fickling.loader import RelaxedZipFile

    if zipfile.is_zipfile(path):
        with RelaxedZipFile(path) as archive:
            blobs = [archive.read(i) for i in archive.infolist() if i.filename.endswith((".pkl", ".pickle", ".bin"))]
    else:
        blobs = [path.read_bytes()]
    analyzer = Analyzer([__import__("fickling.ml", fromlist=["MLAllowlist"]).MLAllowlist()])
    try:
        pickles = [p for blob in blobs for p in StackedPickle.load(io.BytesIO(blob), fail_on_decode_error=False)]
    except Exception:
        return "error"
    unsafe = any(p.has_invalid_opcode or check_safety(p, analyzer).severity > Severity.LIKELY_SAFE for p in pickles)
    return "flag" if unsafe else "pass"


TOOLS = {"bastion": _bastion, "picklescan": _picklescan, "picklescan --strict": lambda p: _picklescan(p, True),
         "modelscan": _modelscan, "fickling": _fickling, "fickling (ML allowlist)": _fickling_ml}


def compare(root: Path, oracle: bool) -> str:
    import logging

    logging.disable(logging.CRITICAL)  # the scanners log every finding
    cases = build_corpus(root)
    if oracle:
        ran = run_oracle(root, cases)
        wrong = sorted(c.name for c in cases if ran[c.name] != (c.kind == "hostile"))
        cases = [c for c in cases if c.name not in wrong]
        if wrong:
            print(f"oracle disagrees with the label of {len(wrong)} case(s), left out: {', '.join(wrong)}", file=sys.stderr)
    tools = {}
    for name, tool in TOOLS.items():
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # fickling prints its warnings
                tools[name] = {c.name: tool(c.path(root)) for c in cases}
        except ImportError:
            print(f"{name}: not installed, skipped", file=sys.stderr)
    return _table(cases, tools)


def _table(cases: list[Case], tools: dict[str, dict[str, str]]) -> str:
    groups = {"hostile": "detected", "inert": "refused", "weights": "false positives", "other": "refused"}
    lines = ["| files | " + " | ".join(tools) + " |", "|---|" + "---|" * len(tools)]
    techniques = sorted({(c.kind, c.technique) for c in cases}, key=lambda k: (list(groups).index(k[0]), k[1]))
    for kind, technique in [(k, None) for k in groups] + techniques:
        chosen = [c for c in cases if c.kind == kind and technique in (None, c.technique)]
        if not chosen:
            continue
        label = f"**{kind}: all ({len(chosen)})** - {groups[kind]}" if technique is None else f"{kind}: {technique} ({len(chosen)})"
        cells = []
        for results in tools.values():
            flagged = sum(results[c.name] == "flag" for c in chosen)
            errors = sum(results[c.name] == "error" for c in chosen)
            cells.append(f"{flagged}/{len(chosen)}" + (f" (+{errors} errors)" if errors else ""))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", nargs="?", type=Path)
    parser.add_argument("--compare", action="store_true")
    parser.add_argument("--oracle", action="store_true")
    args = parser.parse_args()
    if args.compare:
        import tempfile

        root = args.out_dir or Path(tempfile.mkdtemp(prefix="pickle-corpus-"))
        print(compare(root, args.oracle))
    elif args.out_dir:
        cases = build_corpus(args.out_dir)
        print(f"wrote {len(cases)} files under {args.out_dir}")
    else:
        parser.error("give OUT_DIR or --compare")


if __name__ == "__main__":
    main()
