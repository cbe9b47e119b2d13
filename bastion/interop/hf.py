"""Hugging Face folders in and out: `import_hf` (HF folder -> Bastion checkpoint) and
`export_hf` (Bastion checkpoint -> a folder `AutoModelForCausalLM` / `AutoTokenizer` load).

Import reads only data formats: config.json, tokenizer*.json and safetensors. It refuses
remote code (`auto_map`), architectures other than Llama / Mistral / Qwen2, pickle weights
(pytorch_model.bin: convert them with `bastion ckpt convert --allow-pickle` first), and any
tensor that is missing, unexpected or the wrong shape. Every safetensors header is validated
(`parse_header`) on a memory map of the file, and the tensors are built from that same map,
so the bytes that were checked are the bytes that are used. Every file of the folder is read
through `_HFFolder.open`: no link is followed except a Hugging Face cache link, checked hop
by hop, so nothing outside the folder (or its cache repo's blobs/) can be imported.

Where the chat template and special tokens live: an imported checkpoint keeps the HF
tokenizer's `chat_template` and its bos / eos / pad token strings in trainer_state.json
(keys "chat_template" and "special_tokens"): a checkpoint file the manifest already hashes,
free-form JSON (any template text is stored verbatim), and no schema change to config.yaml.
bastion/checkpoint/contents.py reads them back.
"""
from __future__ import annotations

import errno
import json
import math
import mmap
import os
import re
import stat
from pathlib import Path
from typing import Any, BinaryIO

import torch
from tokenizers import Tokenizer

from bastion.checkpoint.checkpoint import Checkpoint, save_checkpoint, write_safetensors
from bastion.checkpoint.contents import (
    chat_template,
    checkpoint_chat,
    checkpoint_tokenizer,
    load_full_model,
    special_tokens,
)
from bastion.checkpoint.safetensors_check import TORCH_DTYPE, parse_header
from bastion.config.load import build_config, to_yaml
from bastion.config.schema import BastionConfig, GenerateConfig
from bastion.errors import CheckpointError
from bastion.model.heads import hf_label_fields
from bastion.model.hf import (
    SUPPORTED_ARCHITECTURES,
    from_hf_state_dict,
    has_zero_o_proj_bias,
    hf_config_from_model_config,
    hf_model_type,
    model_config_from_hf_config,
    to_hf_state_dict,
)
from bastion.safeio import parse_json, write_dir_atomic
from bastion.tokenizer import BastionTokenizer

MAX_CONFIG_JSON_BYTES = 1 * 2**20
MAX_TOKENIZER_CONFIG_BYTES = 16 * 2**20
MAX_TOKENIZER_BYTES = 64 * 2**20
MAX_INDEX_BYTES = 64 * 2**20
MAX_CHAT_TEMPLATE_BYTES = 1 * 2**20
MAX_SHARDS = 10_000
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")
# The one link a model folder may hold: huggingface_hub's snapshots/<rev>/NAME -> ../../blobs/<file>.
CACHE_LINK = re.compile(r"\.\./\.\./blobs/([^/]+)")
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth",
                  "consolidated.00.pth", "tf_model.h5", "flax_model.msgpack")
# Qwen2's split regex: what transformers' Qwen2Tokenizer (and llama.cpp's "qwen2" pre-tokenizer) use.
QWEN2_SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                     r"|\s*[\r\n]+|\s+(?!\S)|\s+")


# ---- reading an HF folder -----------------------------------------------------------------

class _HFFolder:
    """The folder `bastion import hf` reads, pinned by a directory descriptor so that every
    file comes from it: each is opened relative to that descriptor without following any
    link, and must be a regular file. One link is allowed, hop by hop, because it is how
    `huggingface_hub` stores every download: when the folder is `<repo>/snapshots/<rev>`,
    `NAME -> ../../blobs/<file>` is read as `<repo>/blobs/<file>`, where `<repo>` is the
    folder's real grandparent, `snapshots` and `blobs` are real folders of it (not links)
    and the blob is a regular file (not a link). Anything else - a link elsewhere, `blobs`
    linked out, a blob that is itself a link, a FIFO, a folder - is a CheckpointError.
    Hard links are ordinary files here: making one needs access to the file already."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            raise CheckpointError(f"{path}: not a folder (expected a Hugging Face model folder)") from None

    def __enter__(self) -> _HFFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self._fd)

    def lexists(self, name: str) -> bool:
        try:
            os.stat(name, dir_fd=self._fd, follow_symlinks=False)
        except OSError:
            return False
        return True

    def open(self, name: str, *, required: bool = True, what: str = "file") -> BinaryIO | None:
        """`name` (a plain file name) opened for reading, or None when it is absent and not
        `required`. The only way any file of an imported folder is read."""
        if not isinstance(name, str) or not SAFE_NAME.match(name):
            raise CheckpointError(f"{self.path}: {what} name {str(name)[:80]!r} is not a plain file name inside the folder")
        shown = self.path / name
        if not self.lexists(name):
            if required:
                raise CheckpointError(f"{self.path}: {what} {name} is missing")
            return None
        try:
            return _open_regular_at(self._fd, name, shown)
        except _IsLink:
            return self._open_cache_blob(name, shown)

    def _open_cache_blob(self, name: str, shown: Path) -> BinaryIO:
        target = os.readlink(name, dir_fd=self._fd)
        match = CACHE_LINK.fullmatch(target)
        if match is None or not SAFE_NAME.match(match.group(1)):
            raise CheckpointError(f"{shown}: is a symbolic link leading outside the model folder (to {target[:200]!r}); "
                                  "only Hugging Face cache links (snapshots/<rev>/NAME -> ../../blobs/<file>) are followed")
        repo = _open_dir_at(self._fd, "../..", shown)
        try:
            self._check_snapshots(repo, shown)
            blobs = _open_dir_at(repo, "blobs", shown)
            try:
                return _open_regular_at(blobs, match.group(1), shown)
            except _IsLink:
                raise CheckpointError(f"{shown}: its cache blob {target} is itself a symbolic link; refused") from None
            finally:
                os.close(blobs)
        finally:
            os.close(repo)

    def _check_snapshots(self, repo: int, shown: Path) -> None:
        """The folder's real parent must be `<repo>/snapshots` itself (a real folder, not a link)."""
        parent = os.stat("..", dir_fd=self._fd)
        try:
            snapshots = os.stat("snapshots", dir_fd=repo, follow_symlinks=False)
        except OSError:
            snapshots = None
        if snapshots is None or (snapshots.st_dev, snapshots.st_ino) != (parent.st_dev, parent.st_ino):
            raise CheckpointError(f"{shown}: is a symbolic link, and the folder is not a Hugging Face cache snapshot "
                                  "(<repo>/snapshots/<rev>); links leading outside the model folder are refused")


class _IsLink(Exception):
    """Raised by `_open_regular_at` for a symbolic link, which only the cache layout may hold."""


def _open_dir_at(dir_fd: int, name: str, shown: Path) -> int:
    try:
        return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:  # ELOOP: a link; ENOTDIR / ENOENT: not a real folder
        raise CheckpointError(f"{shown}: the cache folder {name!r} it leads through is missing, not a folder, or a "
                              "symbolic link; refused") from None


def _open_regular_at(dir_fd: int, name: str, shown: Path) -> BinaryIO:
    """`name` in the folder `dir_fd`, opened without following a link (`_IsLink`) and without
    waiting on a FIFO, refused unless it is a regular file."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        raise CheckpointError(f"{shown}: missing (a dangling link?)") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _IsLink from None
        raise CheckpointError(f"{shown}: cannot be opened ({exc.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CheckpointError(f"{shown}: not a regular file")
    return os.fdopen(fd, "rb")


def _read_bounded(fh: BinaryIO, max_bytes: int, where: Path | str) -> bytes:
    with fh:
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise CheckpointError(f"{where}: over the limit of {max_bytes} bytes")
    return data


def _read_json(fh: BinaryIO, max_bytes: int, where: Path | str) -> Any:
    return parse_json(_read_bounded(fh, max_bytes, where), CheckpointError, str(where))


def _decode(data: bytes, where: Path | str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{where}: not valid UTF-8 (byte {exc.start})") from None


def read_safetensors(source: Path | BinaryIO, *, dtype: torch.dtype | None = torch.float32,
                     where: Path | str | None = None) -> dict[str, torch.Tensor]:
    """Tensors of one safetensors file (a path, or a file already opened: it is closed): the
    header is validated strictly (`parse_header`) on a private memory map, and the tensors
    are copied out of that same map (no second read of the file that could see different
    bytes). Floating tensors are cast to `dtype` (None: kept); non-floating tensors are
    refused (they are not model weights). `where` names the file in errors."""
    path = where or source
    with open(source, "rb") if isinstance(source, (str, Path)) else source as fh:
        size = os.fstat(fh.fileno()).st_size
        if size == 0:
            raise CheckpointError(f"{path}: empty file, not a safetensors file")
        # ACCESS_COPY: writable for torch.frombuffer, but writes never reach the file.
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY) as mm:
            header, _ = parse_header(mm, path)  # slicing an mmap copies: no buffer export to leak
            base = 8 + int.from_bytes(mm[:8], "little")
            tensors: dict[str, torch.Tensor] = {}
            for name, info in header.items():
                if info["dtype"] not in TORCH_DTYPE or not TORCH_DTYPE[info["dtype"]].is_floating_point:
                    raise CheckpointError(f"{path}: tensor {name!r} has dtype {info['dtype']}; model weights must be floating point")
                src_dtype = TORCH_DTYPE[info["dtype"]]
                numel = math.prod(info["shape"])
                begin = base + info["data_offsets"][0]
                if numel == 0:
                    tensor = torch.empty(info["shape"], dtype=src_dtype)
                else:
                    view = torch.frombuffer(mm, dtype=src_dtype, count=numel, offset=begin)
                    tensor = view.reshape(info["shape"]).clone()
                    del view  # release the buffer export before the map closes
                tensors[name] = tensor if dtype is None else tensor.to(dtype)
    return tensors


def _weight_names(folder: _HFFolder) -> list[str]:
    """The safetensors files holding the weights: model.safetensors, or the shards its index names."""
    index_name = "model.safetensors.index.json"
    has_single = folder.lexists("model.safetensors")
    if has_single and folder.lexists(index_name):
        raise CheckpointError(f"{folder.path}: holds both model.safetensors and {index_name}; "
                              "remove the one that is stale")
    if has_single:
        return ["model.safetensors"]
    index_fh = folder.open(index_name, required=False, what="shard index")
    if index_fh is not None:
        index = _read_json(index_fh, MAX_INDEX_BYTES, folder.path / index_name)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{folder.path / index_name}: malformed shard index (no weight_map)")
        names = sorted(set(weight_map.values()), key=str)
        if len(names) > MAX_SHARDS:
            raise CheckpointError(f"{folder.path / index_name}: names {len(names)} shards, over {MAX_SHARDS}")
        for name in names:
            if not isinstance(name, str) or not name.endswith(".safetensors"):
                raise CheckpointError(f"{folder.path / index_name}: shard {str(name)[:80]!r} is not a .safetensors file name")
        return names
    pickles = [n for n in PICKLE_WEIGHTS if folder.lexists(n)] + sorted(
        p.name for p in folder.path.glob("pytorch_model-*.bin"))
    if pickles:
        raise CheckpointError(
            f"{folder.path}: has only pickle-format weights ({', '.join(pickles[:3])}), which can execute code when "
            "loaded and are never read implicitly. Convert each file with `bastion ckpt convert --allow-pickle "
            "FILE OUT_DIR` (a scanned, restricted load), put OUT_DIR/model.safetensors in the model folder in its "
            "place, and import again")
    raise CheckpointError(f"{folder.path}: no model.safetensors or {index_name}")


def _load_hf_weights(folder: _HFFolder) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for name in _weight_names(folder):
        path = folder.path / name
        for tensor_name, tensor in read_safetensors(folder.open(name, what="weight shard"), where=path).items():
            if tensor_name in state:
                raise CheckpointError(f"{path}: tensor {tensor_name!r} also appears in another shard")
            state[tensor_name] = tensor
    return state


def _token_text(value: Any) -> str | None:
    """A tokenizer_config special token: a string, an AddedToken dict, or null."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _chat_template(folder: _HFFolder, tok_cfg: dict[str, Any]) -> str | None:
    """tokenizer_config.json's chat_template (a string, or a list of named templates: the
    "default" one), else chat_template.jinja (where transformers >= 4.43 / v5 save it)."""
    template = tok_cfg.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is None:
        fh = folder.open("chat_template.jinja", required=False, what="chat template")
        if fh is not None:
            template = _decode(_read_bounded(fh, MAX_CHAT_TEMPLATE_BYTES, folder.path / "chat_template.jinja"),
                               folder.path / "chat_template.jinja")
    if template is not None and (not isinstance(template, str) or len(template.encode()) > MAX_CHAT_TEMPLATE_BYTES):
        raise CheckpointError(f"{folder.path}: chat_template must be a string of at most {MAX_CHAT_TEMPLATE_BYTES} bytes")
    return template


def _check_out_dir(out_dir: Path, what: str) -> None:
    if out_dir.is_symlink() or (out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir()))):
        raise CheckpointError(f"{what} {out_dir} already exists and is not an empty folder; choose a new one")


def import_hf(hf_dir: str | Path, out_dir: str | Path) -> Path:
    """Convert a local Hugging Face Llama / Mistral / Qwen2 folder into a Bastion checkpoint
    root `out_dir` (step 0, no optimizer; weights stored as float32). Returns the checkpoint
    directory (out_dir/step_00000000)."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    _check_out_dir(out_dir, "output")
    with _HFFolder(hf_dir) as folder:
        ckpt = _read_hf_folder(folder)
    return save_checkpoint(out_dir, 0, ckpt)


def _read_hf_folder(folder: _HFFolder) -> Checkpoint:
    """The checkpoint an HF folder makes: every file read through `folder.open`."""
    hf_dir = folder.path
    hf_config = _read_json(folder.open("config.json", what="config"), MAX_CONFIG_JSON_BYTES, hf_dir / "config.json")
    model_cfg = model_config_from_hf_config(hf_config, where=str(hf_dir / "config.json"))

    tok_fh = folder.open("tokenizer.json", what="tokenizer (tokenizer.json)")
    tok_text = json.dumps(_read_json(tok_fh, MAX_TOKENIZER_BYTES, hf_dir / "tokenizer.json"))
    try:
        tokenizer = Tokenizer.from_str(tok_text)
    except Exception as exc:  # tokenizers raises a bare Exception on schema errors
        raise CheckpointError(f"{hf_dir / 'tokenizer.json'}: not a valid tokenizer ({str(exc)[:200]})") from None
    n_tokens = tokenizer.get_vocab_size(with_added_tokens=True)
    if n_tokens > model_cfg.vocab_size:
        raise CheckpointError(f"{hf_dir}: the tokenizer has {n_tokens} tokens but the model's vocab_size is "
                              f"{model_cfg.vocab_size}")
    tc_path = hf_dir / "tokenizer_config.json"
    tc_fh = folder.open("tokenizer_config.json", required=False, what="tokenizer config")
    tok_cfg = _read_json(tc_fh, MAX_TOKENIZER_CONFIG_BYTES, tc_path) if tc_fh else {}
    if not isinstance(tok_cfg, dict):
        raise CheckpointError(f"{tc_path}: not a JSON object")
    specials = {key: _token_text(tok_cfg.get(key)) for key in ("bos_token", "eos_token", "pad_token")}
    for key, token in specials.items():
        if token is not None and tokenizer.token_to_id(token) is None:
            raise CheckpointError(f"{tc_path}: {key} {token[:40]!r} is not in tokenizer.json's vocabulary")

    hf_state = _load_hf_weights(folder)
    state = from_hf_state_dict(hf_state, model_cfg, where=f"weights in {hf_dir}")
    config = build_config({"model": model_cfg.model_dump(mode="json"),
                           "train": {"seq_len": min(256, model_cfg.max_seq_len)}}, source="imported config")
    trainer_state: dict[str, Any] = {"step": 0, "imported_from": hf_config["model_type"],
                                     "special_tokens": specials}
    template = _chat_template(folder, tok_cfg)
    if template is not None:
        trainer_state["chat_template"] = template
    return Checkpoint(model=state, trainer_state=trainer_state, config_yaml=to_yaml(config),
                      tokenizer_json=tokenizer.to_str())


# ---- writing an HF folder -----------------------------------------------------------------

def exported_special_tokens(ckpt: Checkpoint, tokenizer: BastionTokenizer | None = None
                            ) -> tuple[dict[str, str | None], dict[str, int | None]]:
    """The bos / eos / pad token strings an exported model declares, and their ids: those
    the checkpoint records (a recorded token missing from the vocabulary is left out).
    `tokenizer`: the checkpoint's, if the caller already has it."""
    tokenizer = tokenizer or checkpoint_tokenizer(ckpt)  # validates the tokenizer and its specials
    specials = special_tokens(ckpt.trainer_state)
    ids = {key: tokenizer.token_to_id(token) if token is not None else None for key, token in specials.items()}
    return {key: token if ids[key] is not None else None for key, token in specials.items()}, ids


def qwen2_tokenizer_rebuilds(tokenizer_json: str) -> bool:
    """Whether transformers' Qwen2Tokenizer gives this tokenizer's ids. AutoTokenizer uses it
    for every model_type "qwen2" folder and keeps only tokenizer.json's vocab, merges and
    post-processor, imposing NFC, Qwen2's split regex, byte-level BPE and decoder."""
    tok = parse_json(tokenizer_json, CheckpointError, "tokenizer.json")
    pre, model = tok.get("pre_tokenizer") or {}, tok.get("model") or {}
    steps = (pre.get("pretokenizers") or []) if pre.get("type") == "Sequence" else []
    split = {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT_REGEX}, "behavior": "Isolated", "invert": False}
    byte_level = len(steps) == 2 and steps[1].get("type") == "ByteLevel" and steps[1].get("use_regex") is False \
        and not steps[1].get("add_prefix_space")
    plain_bpe = model.get("type") == "BPE" and model.get("dropout") is None and not any(
        model.get(key) for key in ("byte_fallback", "ignore_merges", "continuing_subword_prefix", "end_of_word_suffix"))
    return tok.get("normalizer") == {"type": "NFC"} and bool(steps) and steps[0] == split and byte_level \
        and plain_bpe and (tok.get("decoder") or {}).get("type") == "ByteLevel"


def _model_type(ckpt: Checkpoint, config: BastionConfig) -> str:
    """`hf_model_type`, keeping Qwen2 for a model imported from it only while transformers'
    Qwen2Tokenizer still reproduces its tokenizer (else AutoTokenizer's ids would differ)."""
    imported_qwen2 = ckpt.trainer_state.get("imported_from") == "qwen2"
    keep_qwen2 = imported_qwen2 and qwen2_tokenizer_rebuilds(ckpt.tokenizer_json)
    return hf_model_type(config.model, prefer="qwen2" if keep_qwen2 else None)


def _generation_config(gen: GenerateConfig, ids: dict[str, int | None], stop_ids: list[int],
                       context: int) -> dict[str, Any]:
    """generation_config.json: what `bastion generate` and `bastion serve` do with this
    checkpoint when a request sets nothing, so that a plain `model.generate()` does the same.
    That is the checkpoint's own `generate:` section - by Bastion's defaults sampling at
    temperature 0.8 with top_k 50, greedy when its temperature is 0 - and stopping at the
    chat format's end-of-turn ids (`ChatFormat.stop_ids`: eos, plus <|im_end|> and the like
    where the template uses them). Length: `max_length` is the model's context, never
    `max_new_tokens`: transformers lets a generation_config max_new_tokens override the
    max_length a caller passes (lm-eval's hf model passes context + max_gen_toks), so the
    caller's limit would be silently replaced by the checkpoint's."""
    out: dict[str, Any] = {"bos_token_id": ids["bos_token"], "pad_token_id": ids["pad_token"],
                           "eos_token_id": stop_ids if len(stop_ids) > 1 else stop_ids[0],
                           "max_length": context, "do_sample": gen.temperature > 0}
    if gen.temperature > 0:
        # Bastion's top_k None means no cut; transformers fills an unset top_k with 50 and reads 0 as no cut.
        out.update(temperature=gen.temperature, top_k=gen.top_k or 0, top_p=gen.top_p)
    return out


def _tokenizer_config(ckpt: Checkpoint, config: BastionConfig, tokenizer: BastionTokenizer,
                      specials: dict[str, str | None]) -> dict[str, Any]:
    return {
        # transformers loads tokenizer.json as written with this class, except for model_type
        # qwen2, which `_model_type` picks only when Qwen2Tokenizer rebuilds the same tokenizer.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": specials["bos_token"], "eos_token": specials["eos_token"], "pad_token": specials["pad_token"],
        "unk_token": None,  # else Qwen2Tokenizer adds "<|endoftext|>" as an unknown token when the vocabulary lacks it
        "model_max_length": config.model.max_seq_len, "clean_up_tokenization_spaces": False,
        "add_bos_token": tokenizer.adds_bos, "add_eos_token": False,
        # The template the model was trained with, Bastion's built-in one when none is recorded:
        # apply_chat_template then gives ChatFormat's ids (docs/finetuning.md says where they differ).
        "chat_template": chat_template(ckpt.trainer_state),
    }


def export_hf(ckpt_path: str | Path, out_dir: str | Path) -> Path:
    """Write a Hugging Face folder (config.json, model.safetensors, generation_config.json,
    tokenizer.json, tokenizer_config.json with the chat template) in the architecture
    `hf_model_type` picks: Llama (qkv biases as attention_bias with zero o_proj biases),
    Mistral (sliding window), SmolLM3 (sliding window and qkv biases), or Qwen2 for a model
    imported from it. A scoring model (model.score_labels: reward, classify, regress)
    becomes that family's `...ForSequenceClassification` with its pad_token_id (where
    transformers pools) and no generation_config.json; a classifier's or regressor's config
    also says its problem_type and a classifier's its class names (id2label). A model with
    modality streams (model.modalities) is refused: no transformers class computes its fusion.
    Atomic (temp folder + rename); files 0600, folder 0700. Refuses an existing non-empty out_dir."""
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, "export folder")
    ckpt, config = load_full_model(ckpt_path, reject_nonfinite=True, head="any")
    cfg = config.model
    if cfg.modalities:  # transformers has no architecture that would compute the fusion
        raise CheckpointError(f"{ckpt.directory} fuses feature streams ({', '.join(sorted(cfg.modalities))}; "
                              "bastion/model/fusion.py), which no transformers class computes: it stays a verified "
                              "Bastion checkpoint; score with `bastion predict` / `bastion eval classify` "
                              "(docs/multimodal.md)")
    tokenizer = checkpoint_tokenizer(ckpt)
    specials, ids = exported_special_tokens(ckpt, tokenizer)
    model_type = _model_type(ckpt, config)
    hf_config = hf_config_from_model_config(cfg, bos_token_id=ids["bos_token"], eos_token_id=ids["eos_token"],
                                            pad_token_id=ids["pad_token"], model_type=model_type)
    if cfg.score_labels is not None:  # classify / regress: class names and transformers' loss
        hf_config.update(hf_label_fields(config.train.objective, config.finetune.sequence.labels, cfg.score_labels))
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in ckpt.model.items()}
    hf_state = to_hf_state_dict(state, cfg, o_proj_bias=has_zero_o_proj_bias(model_type, cfg))
    files: dict[str, Any] = {
        "config.json": json.dumps(hf_config, indent=2).encode(),
        # Streamed tensor by tensor: exporting never holds a second copy of the weights.
        "model.safetensors": lambda path: write_safetensors(path, hf_state, {"format": "pt"}),
        "tokenizer.json": ckpt.tokenizer_json.encode(),
        "tokenizer_config.json": json.dumps(_tokenizer_config(ckpt, config, tokenizer, specials), indent=2).encode(),
    }
    if cfg.score_labels is None:
        stop_ids = checkpoint_chat(ckpt, tokenizer).stop_ids
        files["generation_config.json"] = json.dumps(_generation_config(config.generate, ids, stop_ids,
                                                                        cfg.max_seq_len), indent=2).encode()
    elif ids["pad_token"] is None:  # transformers finds each sequence's last token by it
        raise CheckpointError(f"{ckpt.directory}: a reward model needs a pad token to export (transformers pools at "
                              "the last token that is not padding); its tokenizer declares none")
    return write_dir_atomic(out_dir, files)


__all__ = ["SUPPORTED_ARCHITECTURES", "export_hf", "exported_special_tokens", "import_hf", "read_safetensors"]
