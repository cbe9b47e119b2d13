"""The hostile-input corpus, by failure class (issue 13), and the commands each case is fed to.

    python tests/hostile/corpus.py OUT_DIR      writes every case under OUT_DIR/<class>/<case>/
                                                and prints the commands that read it

Each case is built from a valid artefact (a tiny checkpoint, adapter, packed checkpoint,
Hugging Face folder, prepared dataset, config, key file...) by one hostile change. Where a
hash would catch the change, the manifest is re-forged so that only a format check can.
Command lines are lists of strings with {placeholders}: {case} is the case folder, {out} a
fresh path for outputs (it must not appear), {keys} a valid key file, {sentinel} the file
a hostile pickle tries to create (it must never exist).

The classes:
    0  files read through symlinks (import hf's cache layout, checkpoint pointers)
    1  unbounded parsers (deep JSON / YAML, alias bombs)
    2  malformed files (encodings, empty, truncated, absurd headers)
    3  format not validated where hashes are (forged files, pickles, bombs, NaN, pruning)
    4  resource bombs in data and chat templates
    5  secrets that could be echoed
    6  the server and the CLI's own options (see test_hostile_http.py for the routes)
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import pickle
import shutil
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/: helpers and synthetic fixtures

SENTINEL_NAME = "PWNED"


@dataclass
class Case:
    klass: int
    name: str
    build: Callable[[Path, "Base"], None]  # writes the hostile artefact into the case folder
    commands: list[list[str]]
    env: dict[str, str] = field(default_factory=dict)
    secret: str | None = None  # a value that must appear in no output
    exit_codes: tuple[int, ...] = (2,)
    forbidden: tuple[str, ...] = ()  # text the answer must not contain (the wrong error)


# ---- the valid artefacts every case starts from --------------------------------------------

@dataclass
class Base:
    root: Path
    ckpt: Path  # a checkpoint directory (step_00000000)
    adapter: Path  # a LoRA adapter folder trained on ckpt
    hf: Path  # a Hugging Face folder exported from ckpt
    data: Path  # a prepared dataset
    chat: Path  # a chat JSONL file
    packed: Path  # ckpt, packed
    run: Path  # a run folder: RUN/checkpoints/step_N + latest


def build_base(root: Path) -> Base:
    import torch

    from bastion.adapters import save_adapter
    from bastion.checkpoint.contents import manifest_sha256
    from bastion.checkpoint.pack import pack_checkpoint
    from bastion.config import build_config
    from bastion.config.schema import LoraConfig
    from bastion.data import prepare_dataset
    from bastion.interop import export_hf
    from bastion.model import Transformer
    from bastion.model.lora import apply_lora
    from helpers import make_base_checkpoint
    from synthetic.chat import reverse_chat_records, write_jsonl
    from synthetic.corpus import arithmetic_documents, write_corpus

    root.mkdir(parents=True, exist_ok=True)
    ckpt = make_base_checkpoint(root / "base")
    from bastion.checkpoint import load_checkpoint
    from bastion.checkpoint.contents import checkpoint_config

    loaded = load_checkpoint(ckpt, load_optimizer=False)
    model = Transformer.from_state_dict(checkpoint_config(loaded).model, loaded.model)
    lora = LoraConfig(enabled=True, rank=2, alpha=4.0)
    apply_lora(model, lora)
    adapter = save_adapter(model, lora, root / "adapter", manifest_sha256(ckpt))
    hf = export_hf(ckpt, root / "hf")
    write_corpus(root / "src", arithmetic_documents(300, seed=0, max_operand=20), name="arith")
    cfg = build_config({"data": {"sources": [str(root / "src")], "output_dir": str(root / "data"),
                                 "allowed_roots": [str(root)], "val_fraction": 0.1, "tokenizer": {"vocab_size": 300}}})
    prepare_dataset(cfg.data)
    chat = write_jsonl(root / "chat.jsonl", reverse_chat_records(8, seed=0))
    packed = root / "packed"
    pack_checkpoint(ckpt, packed)
    run = root / "run" / "checkpoints"
    run.mkdir(parents=True)
    shutil.copytree(ckpt, run / ckpt.name)
    (run / "latest").write_text(ckpt.name + "\n")
    del torch
    return Base(root, ckpt, adapter, hf, root / "data", chat, packed, root / "run")


# ---- small tools -----------------------------------------------------------------------------

def copy_of(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    for path in [dst, *dst.rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, 0o700 if path.is_dir() else 0o600)
    return dst


def forge(directory: Path, name: str, data: bytes) -> None:
    """Replace a file AND re-forge its manifest entry: only a format check can catch it."""
    (directory / name).write_bytes(data)
    manifest_path = directory / "MANIFEST.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest_path.write_text(json.dumps(manifest))


def deep_json(levels: int, leaf: str = "1") -> bytes:
    return ("[" * levels + leaf + "]" * levels).encode()


def safetensors_bytes(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


class _Pwn:
    """A pickle that, if ever unpickled, creates the sentinel file (and proves it ran)."""

    def __init__(self, target: Path):
        self.target = str(target)

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def evil_pickle(sentinel: Path) -> bytes:
    return pickle.dumps(_Pwn(sentinel), protocol=2)


# ---- the cases -------------------------------------------------------------------------------

LOADERS = [  # every command that loads a checkpoint's model
    ["generate", "--checkpoint", "{case}/ckpt", "--prompt", "hi", "--max-new-tokens", "2"],
    ["export", "hf", "{case}/ckpt", "{out}"],
    ["export", "gguf", "{case}/ckpt", "{out}.gguf"],
    ["eval", "loss", "--checkpoint", "{case}/ckpt", "--file", "{chat}", "--root", "/"],
    ["merge", "{case}/ckpt", "{adapter}", "{out}"],
    ["quantize", "{case}/ckpt", "{out}", "--to", "int8"],
    ["publish", "{case}/ckpt", "--dry-run", "--out", "{out}", "--license", "mit"],
]
READERS = [  # commands that read a checkpoint's files without building a model
    ["ckpt", "verify", "{case}/ckpt"],
    ["ckpt", "inspect", "{case}/ckpt"],
    ["ckpt", "pack", "{case}/ckpt", "{out}"],
    ["ckpt", "push", "{case}/ckpt", "{out}"],
]
EVERY_CHECKPOINT_VERB = READERS + LOADERS


def _ckpt_case(mutate: Callable[[Path, Base], None]) -> Callable[[Path, Base], None]:
    def build(case: Path, base: Base) -> None:
        mutate(copy_of(base.ckpt, case / "ckpt"), base)
    return build


def _adapter_case(mutate: Callable[[Path, Base], None]) -> Callable[[Path, Base], None]:
    def build(case: Path, base: Base) -> None:
        mutate(copy_of(base.adapter, case / "adapter"), base)
    return build


def _hf_case(mutate: Callable[[Path, Base], None]) -> Callable[[Path, Base], None]:
    def build(case: Path, base: Base) -> None:
        mutate(copy_of(base.hf, case / "hf"), base)
    return build


def _write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())


def _hf_cache_escape(case: Path, base: Base) -> None:
    """A Hugging Face cache layout whose `blobs` is a link to a private folder elsewhere."""
    private = case / "private"
    _write(private / "credentials", "{{ 'AWS_SECRET=hunter2hunter2' }}")
    repo = case / "models--x--y"
    snapshot = repo / "snapshots" / "rev"
    snapshot.mkdir(parents=True)
    for f in base.hf.iterdir():
        shutil.copy(f, snapshot / f.name)
    os.symlink(private, repo / "blobs")
    os.symlink("../../blobs/credentials", snapshot / "chat_template.jinja")
    config = json.loads((snapshot / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (snapshot / "tokenizer_config.json").write_text(json.dumps(config))


def _hf_blob_link_out(case: Path, base: Base) -> None:
    private = case / "private"
    _write(private / "secret.txt", "{{ 'hunter2hunter2' }}")
    repo = case / "models--x--y"
    snapshot = repo / "snapshots" / "rev"
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in base.hf.iterdir():
        shutil.copy(f, snapshot / f.name)
    os.symlink(private / "secret.txt", repo / "blobs" / "abc")  # the blob itself leads out
    os.symlink("../../blobs/abc", snapshot / "chat_template.jinja")
    config = json.loads((snapshot / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (snapshot / "tokenizer_config.json").write_text(json.dumps(config))


def _latest_outside(case: Path, base: Base) -> None:
    run = case / "run" / "checkpoints"
    run.mkdir(parents=True)
    copy_of(base.ckpt, case / "elsewhere")
    os.symlink(case / "elsewhere", run / "step_00000009")
    (run / "latest").write_text("step_00000009\n")


def _zstd_bomb(case: Path, base: Base) -> None:
    """A packed checkpoint whose blob is one zstd frame that inflates to 64 MiB."""
    import blake3
    import zstandard

    packed = copy_of(base.packed, case / "packed")
    pack = json.loads((packed / "PACK.json").read_text())
    name, meta = next((n, m) for n, m in pack["files"].items() if n == "trainer_state.json")
    bomb = zstandard.ZstdCompressor(level=19).compress(b"\0" * (64 * 2**20))
    blob = meta["blob"]["name"]
    (packed / blob).write_bytes(bomb)
    meta["blob"].update(size=len(bomb), blake3=blake3.blake3(bomb).hexdigest())
    (packed / "PACK.json").write_text(json.dumps(pack))


def _gz_bomb(case: Path, base: Base) -> None:
    src = case / "src"
    src.mkdir(parents=True)
    with gzip.open(src / "bomb.txt.gz", "wb", compresslevel=9) as fh:
        line = b"a" * (1 << 20)
        for _ in range(512):  # one 512 MB document, ~0.5 MB compressed
            fh.write(line)
    _write(case / "cfg.yaml", json.dumps({"data": {"allowed_roots": [str(case)], "output_dir": str(case / "out"),
                                                   "sources": [str(src)]}}))


def _run_with_deep_state(case: Path, base: Base) -> None:
    """A run folder whose newest checkpoint's trainer_state.json is a deep nest (re-forged)."""
    run = copy_of(base.run, case / "run")
    step = run / "checkpoints" / base.ckpt.name
    forge(step, "trainer_state.json", deep_json(100_000))


def _deep_index(case: Path, base: Base) -> None:
    data = copy_of(base.data, case / "data")
    (data / "index.json").write_bytes(deep_json(100_000))
    _write(case / "cfg.yaml", json.dumps({"train": {"data_dir": str(data), "out_dir": str(case / "run")}}))


def _deep_jsonl_source(case: Path, base: Base) -> None:
    _write(case / "src" / "docs.jsonl", b'{"text": "fine"}\n' + b'{"text": ' + deep_json(100_000) + b"}\n")
    _write(case / "cfg.yaml", json.dumps({"data": {"allowed_roots": [str(case)], "output_dir": str(case / "out"),
                                                   "sources": [str(case / "src")]}}))


def _template(source: str) -> Callable[[Path, Base], None]:
    def mutate(ckpt: Path, base: Base) -> None:
        state = json.loads((ckpt / "trainer_state.json").read_text())
        state["chat_template"] = source
        forge(ckpt, "trainer_state.json", json.dumps(state).encode())
    return mutate


def _config_yaml(text: str) -> Callable[[Path, Base], None]:
    return lambda ckpt, base: forge(ckpt, "config.yaml", text.encode())


BILLION_LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
CHAT_ARGS = ["generate", "--checkpoint", "{case}/ckpt", "--chat", "--prompt", "hi", "--max-new-tokens", "2"]
SECRET = "sk-live-5fZ9qQ2xWm8rT4vY7uK1"


def cases(sentinel: Path) -> list[Case]:
    huge = {"w": {"dtype": "F32", "shape": [2**31, 2**31, 2**31], "data_offsets": [0, 8]}}
    return [
        # 0: reads through symlinks
        Case(0, "hf-cache-blobs-link-out", _hf_cache_escape,
             [["import", "hf", "{case}/models--x--y/snapshots/rev", "{out}"]]),
        Case(0, "hf-cache-blob-link-out", _hf_blob_link_out,
             [["import", "hf", "{case}/models--x--y/snapshots/rev", "{out}"]]),
        Case(0, "hf-config-link-out", _hf_case(lambda hf, b: (os.remove(hf / "config.json"),
                                                              os.symlink("/etc/hostname", hf / "config.json"))),
             [["import", "hf", "{case}/hf", "{out}"]]),
        Case(0, "latest-points-outside-the-run", _latest_outside,
             [["ckpt", "verify", "{case}/run"], ["generate", "--checkpoint", "{case}/run", "--prompt", "x"]]),
        # 1: unbounded parsers
        Case(1, "deep-manifest", _ckpt_case(lambda c, b: (c / "MANIFEST.json").write_bytes(deep_json(100_000))),
             EVERY_CHECKPOINT_VERB),
        Case(1, "deep-trainer-state", _ckpt_case(lambda c, b: forge(c, "trainer_state.json", deep_json(100_000))),
             EVERY_CHECKPOINT_VERB),
        Case(1, "deep-safetensors-header", _ckpt_case(
            lambda c, b: forge(c, "model.safetensors", struct.pack("<Q", 200_000) + deep_json(100_000))),
             EVERY_CHECKPOINT_VERB),
        Case(1, "deep-adapter-config", _adapter_case(
            lambda a, b: forge(a, "adapter_config.json", deep_json(100_000))),
             [["export", "peft", "{case}/adapter", "{out}"], ["merge", "{base_ckpt}", "{case}/adapter", "{out}"]]),
        Case(1, "deep-hf-config", _hf_case(lambda hf, b: (hf / "config.json").write_bytes(deep_json(100_000))),
             [["import", "hf", "{case}/hf", "{out}"]]),
        Case(1, "deep-pack-json", lambda case, b: (copy_of(b.packed, case / "packed") / "PACK.json").write_bytes(
            deep_json(100_000)), [["ckpt", "verify", "{case}/packed"], ["ckpt", "unpack", "{case}/packed", "{out}"]]),
        Case(1, "deep-config-yaml", lambda case, b: _write(case / "cfg.yaml", "x: " + "[" * 900 + "]" * 900),
             [["config", "validate", "{case}/cfg.yaml"], ["config", "show", "{case}/cfg.yaml"],
              ["train", "-c", "{case}/cfg.yaml"]]),
        Case(1, "yaml-alias-bomb", lambda case, b: _write(case / "cfg.yaml", BILLION_LAUGHS),
             [["config", "validate", "{case}/cfg.yaml"], ["data", "prepare", "-c", "{case}/cfg.yaml"]]),
        Case(1, "checkpoint-config-alias-bomb", _ckpt_case(_config_yaml(BILLION_LAUGHS)), LOADERS),
        Case(1, "deep-key-file", lambda case, b: _write(case / "keys.json", deep_json(100_000)),
             [["serve", "keys", "list", "--key-file", "{case}/keys.json"]]),
        Case(1, "listing-a-run-with-a-deep-state", _run_with_deep_state,
             [["ckpt", "list", "{case}/run"], ["ckpt", "prune", "{case}/run/checkpoints", "--dry-run"]],
             exit_codes=(0,)),  # listing and pruning tolerate a damaged checkpoint (verify names it)
        Case(1, "deep-dataset-index", _deep_index,
             [["train", "-c", "{case}/cfg.yaml"], ["data", "canaries", "{case}/data", "--out", "{out}.json"]]),
        Case(1, "deep-jsonl-source-line", _deep_jsonl_source, [["data", "prepare", "-c", "{case}/cfg.yaml"]]),
        Case(1, "deep-finetune-line", lambda case, b: _write(case / "deep.jsonl", b'{"messages": ' + deep_json(100_000) + b"}\n"),
             [["eval", "loss", "--checkpoint", "{base_ckpt}", "--file", "{case}/deep.jsonl", "--root", "/"],
              ["eval", "generate", "--checkpoint", "{base_ckpt}", "--file", "{case}/deep.jsonl", "--root", "/",
               "--reward", "exact"]]),
        Case(1, "deep-canary-records", lambda case, b: _write(case / "canaries.json", deep_json(100_000)),
             [["eval", "memorization", "--checkpoint", "{base_ckpt}", "--canaries", "{case}/canaries.json"]]),
        Case(1, "deep-metrics-line", lambda case, b: _write(case / "run" / "metrics.jsonl", deep_json(100_000) + b"\n"),
             [["plot", "{case}/run", "--output", "{out}.png"]]),
        # 2: malformed files
        Case(2, "trainer-state-not-utf8", _ckpt_case(lambda c, b: forge(c, "trainer_state.json", b'{"step": "\xff"}')),
             EVERY_CHECKPOINT_VERB),
        Case(2, "tokenizer-not-utf8", _ckpt_case(lambda c, b: forge(c, "tokenizer.json", b"\xff\xfe{}")), LOADERS),
        Case(2, "tokenizer-out-of-range-id", _ckpt_case(lambda c, b: forge(c, "tokenizer.json", json.dumps(
            {**json.loads((c / "tokenizer.json").read_text()),
             "added_tokens": [{"id": 2**40, "content": "<x>", "special": True, "single_word": False, "lstrip": False,
                               "rstrip": False, "normalized": False}]}).encode())), LOADERS),
        Case(2, "bogus-quantization-description", _ckpt_case(lambda c, b: forge(c, "trainer_state.json", json.dumps(
            {"step": 0, "quantization": {"format": 1, "mode": "int8", "library": "torchao", "library_version": "x",
                                         "weights": {"../../etc/passwd": {"type": "os.system"}}}}).encode())),
             LOADERS),
        Case(2, "empty-model-file", _ckpt_case(lambda c, b: forge(c, "model.safetensors", b"")),
             EVERY_CHECKPOINT_VERB),
        Case(2, "truncated-model-file", _ckpt_case(lambda c, b: forge(
            c, "model.safetensors", (c / "model.safetensors").read_bytes()[:1000])), EVERY_CHECKPOINT_VERB),
        Case(2, "huge-dimensions", _ckpt_case(lambda c, b: forge(c, "model.safetensors", safetensors_bytes(huge, b"\0" * 8))),
             EVERY_CHECKPOINT_VERB),
        Case(2, "huge-dimensions-hf", _hf_case(lambda hf, b: (hf / "model.safetensors").write_bytes(
            safetensors_bytes(huge, b"\0" * 8))), [["import", "hf", "{case}/hf", "{out}"]]),
        Case(2, "huge-dimensions-adapter", _adapter_case(lambda a, b: forge(
            a, "adapter.safetensors", safetensors_bytes(huge, b"\0" * 8))),
             [["export", "peft", "{case}/adapter", "{out}"], ["merge", "{base_ckpt}", "{case}/adapter", "{out}"]]),
        Case(2, "config-yaml-not-utf8", _ckpt_case(lambda c, b: forge(c, "config.yaml", b"model: \xff\n")), LOADERS),
        # 3: format not validated where hashes are
        Case(3, "pickle-as-model-forged-manifest", _ckpt_case(
            lambda c, b: forge(c, "model.safetensors", evil_pickle(sentinel))), EVERY_CHECKPOINT_VERB),
        Case(3, "garbage-as-optimizer-forged-manifest", _ckpt_case(
            lambda c, b: forge(c, "optimizer.safetensors", b"not a tensor file at all")), READERS),
        Case(3, "pickle-beside-the-files", _ckpt_case(
            lambda c, b: (c / "model.pt").write_bytes(evil_pickle(sentinel))), EVERY_CHECKPOINT_VERB),
        Case(3, "pickle-weights-only-hf", _hf_case(lambda hf, b: ((hf / "model.safetensors").unlink(),
                                                                 (hf / "pytorch_model.bin").write_bytes(evil_pickle(sentinel)))),
             [["import", "hf", "{case}/hf", "{out}"]]),
        Case(3, "pickle-convert-without-opt-in", lambda case, b: _write(case / "evil.pt", evil_pickle(sentinel)),
             [["ckpt", "convert", "{case}/evil.pt", "{out}"]]),
        Case(3, "pickle-convert-scanned", lambda case, b: _write(case / "evil.pt", evil_pickle(sentinel)),
             [["ckpt", "convert", "{case}/evil.pt", "{out}", "--allow-pickle"]]),
        Case(3, "zstd-bomb-in-pack", _zstd_bomb,
             [["ckpt", "verify", "{case}/packed"], ["ckpt", "unpack", "{case}/packed", "{out}"]]),
        # 4: resource bombs
        Case(4, "gz-bomb-one-huge-document", _gz_bomb, [["data", "prepare", "-c", "{case}/cfg.yaml"]]),
        Case(4, "template-concat-doubling", _ckpt_case(_template(
            "{% set s = namespace(v='x') %}{% for i in range(40) %}{% set s.v = s.v ~ s.v %}{% endfor %}{{ s.v }}")),
             [CHAT_ARGS]),
        Case(4, "template-replace-amplification", _ckpt_case(_template(
            "{{ ('x' * 1000) | replace('x', 'y' * 1000) | replace('y', 'z' * 1000) }}")), [CHAT_ARGS]),
        Case(4, "template-lipsum", _ckpt_case(_template("{{ lipsum(n=100000) }}")), [CHAT_ARGS]),
        Case(4, "template-tojson-indent", _ckpt_case(_template(
            "{{ messages | tojson(indent=100000000) }}")), [CHAT_ARGS]),
        # 5: secrets that could be echoed
        Case(5, "secret-as-preset", lambda case, b: _write(case / "cfg.yaml", "model: {preset: '${OPENAI_KEY}'}\n"),
             [["config", "validate", "{case}/cfg.yaml"], ["config", "show", "{case}/cfg.yaml"],
              ["train", "-c", "{case}/cfg.yaml"]], env={"OPENAI_KEY": SECRET}, secret=SECRET),
        Case(5, "secret-as-suffix", lambda case, b: _write(case / "cfg.yaml", "data: {text_suffixes: ['${MY_TOKEN}']}\n"),
             [["config", "validate", "{case}/cfg.yaml"], ["data", "prepare", "-c", "{case}/cfg.yaml"]],
             env={"MY_TOKEN": SECRET}, secret=SECRET),
        Case(5, "secret-inside-a-path", lambda case, b: _write(case / "cfg.yaml", (
            "train: {objective: sft, out_dir: '" + str(case / "run") + "'}\n"
            "finetune: {init_from: '/nonexistent/${OPENAI_KEY}/ckpt', train_file: x}\n")),
             [["train", "-c", "{case}/cfg.yaml"]], env={"OPENAI_KEY": SECRET}, secret=SECRET),
        Case(5, "secret-shown-in-config", lambda case, b: _write(case / "cfg.yaml", "train: {run_name: '${OPENAI_KEY}'}\n"),
             [["config", "show", "{case}/cfg.yaml"]], env={"OPENAI_KEY": SECRET}, secret=SECRET, exit_codes=(0,)),
        # 6: the CLI's own options
        Case(6, "serve-host-ipv6-any", lambda case, b: None,
             [["serve", "--checkpoint", "{case}/none", "--host", "::"],
              ["serve", "--checkpoint", "{case}/none", "--host", "0"]],
             env={"BASTION_API_KEYS": "bst_hostile-suite-key-0123456789abcdefghijkl"},
             forbidden=("valid string",)),  # the host is accepted; the missing checkpoint is the error
    ]


def main(out: Path) -> None:
    base = build_base(out / "base")
    sentinel = out / SENTINEL_NAME
    for case in cases(sentinel):
        folder = out / str(case.klass) / case.name
        folder.mkdir(parents=True)
        case.build(folder, base)
        for command in case.commands:
            print(f"[{case.klass}] {case.name}: bastion {' '.join(command)}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/hostile/corpus.py OUT_DIR")
    main(Path(sys.argv[1]))
