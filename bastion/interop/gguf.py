"""Export a checkpoint as one GGUF file for llama.cpp (architecture "llama").

Tensors use llama.cpp names (token_embd, blk.N.attn_q / attn_k / attn_v / attn_output,
blk.N.ffn_gate / ffn_up / ffn_down, blk.N.attn_norm / ffn_norm, output_norm, output).
Matrices are written in the dtype asked for; 1-D tensors (norms, biases) and rope_freqs
always in f32, as llama.cpp's own converter does. The dtypes (`GGUF_DTYPES`):
- f32, f16: every matrix in that float type.
- q8_0: matrices in blocks of 32 values, one f16 scale + 32 int8 each (8.5 bits a weight).
- q4_0: blocks of 32, one f16 scale + 32 4-bit values (4.5 bits a weight), except the lm
  head (`output.weight`, or `token_embd.weight` when the embeddings are tied and it serves as
  the head), which stays q8_0: the head is the tensor most sensitive to quantization, and
  llama.cpp's own llama-quantize keeps it at higher precision (Q6_K) for every 4-bit type.
  The gguf package cannot write Q6_K, so q8_0 is the nearest higher precision it can.
Blocks run along a row (ggml's ne[0], a matrix's input dimension), so a matrix whose rows are
not a multiple of 32 long cannot be quantized and falls back to f16, as llama.cpp's
converter does. Quantizing is the gguf package's own numpy port of ggml's reference
quantizers (`gguf.quants.quantize`); nothing here writes a block format by hand.

The q/k permutation. Bastion (like HF) applies RoPE to the *half-split* layout: dimension i
pairs with i + head_dim/2. llama.cpp's "llama" RoPE pairs *adjacent* dimensions (2i, 2i+1),
the layout of Meta's original checkpoints. So, exactly like llama.cpp's convert_hf_to_gguf.py,
the rows of q_proj / k_proj (weights and biases) are permuted within each head so that
rows j and j + head_dim/2 become rows 2j and 2j + 1:
    W.reshape(n_heads, 2, head_dim // 2, d).swapaxes(1, 2).reshape(W.shape)
(k uses the kv head count). Attention scores are unchanged because q and k are permuted
alike. `unpermute_qk` undoes it (tests use it to compare tensors).

RoPE scaling: "linear" is written as rope.scaling.type/factor metadata; "llama3" as the
rope_freqs tensor (per-frequency divisors), which is how llama.cpp represents Llama 3.1.
A sliding window is written as metadata only: llama.cpp's llama architecture attends to the
whole context, so outputs agree with Bastion only for sequences up to the window.

The tokenizer must be byte-level BPE (Bastion's own, GPT-2, Llama 3, Qwen2 style): it is
stored as tokenizer.ggml.model "gpt2" with tokens, merges, token types, and the bos / eos /
pad ids. Bastion's tokenizer also NFC-normalises text, which llama.cpp does not, and nothing
in GGUF can say so for a BPE vocabulary: llama.cpp reads tokenizer.ggml.precompiled_charsmap
only for SentencePiece/UGM vocabularies, and the full tokenizer.huggingface.json key only
copies tokenizer.json for other programs (llama.cpp ignores it). So no normaliser is
declared; docs/finetuning.md tells users to NFC-normalise prompts themselves.

tokenizer.chat_template is the template the model was trained with: the recorded one, or
Bastion's built-in template (`contents.chat_template`), never left out.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch

from bastion.checkpoint.contents import chat_template, load_full_model, model_name
from bastion.config.schema import ModelConfig
from bastion.errors import BastionError, CheckpointError
from bastion.interop.hf import QWEN2_SPLIT_REGEX, exported_special_tokens
from bastion.model.transformer import rope_inv_freq
from bastion.safeio import parse_json

# Pre-tokenizer split patterns llama.cpp recognises by name (tokenizer.ggml.pre).
_KNOWN_PRE = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
    QWEN2_SPLIT_REGEX: "qwen2",
}
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5

GGUFDType = Literal["f32", "f16", "q8_0", "q4_0"]
GGUF_DTYPES: tuple[str, ...] = get_args(GGUFDType)
# general.file_type (gguf.LlamaFileType names): what llama.cpp reports as the model's type.
_FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0"}
_ROPE_FREQS = "rope_freqs.weight"


def _gguf():
    try:
        import gguf
    except ImportError:
        raise BastionError("GGUF export needs the `gguf` package (pip install gguf)") from None
    return gguf


def permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Half-split RoPE rows -> llama.cpp's interleaved layout (what convert_hf_to_gguf does)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `permute_qk`."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensor_name(ours: str) -> str:
    """Our parameter name -> llama.cpp's GGUF tensor name."""
    fixed = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
             "output.weight": "output.weight"}
    if ours in fixed:
        return fixed[ours]
    parts = ours.split(".")
    if parts[0] != "layers" or len(parts) < 4:
        raise KeyError(f"no GGUF name for {ours!r}")
    block, module, suffix = parts[1], ".".join(parts[2:-1]), parts[-1]
    names = {"attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v",
             "attention.wo": "attn_output", "feed_forward.w1": "ffn_gate", "feed_forward.w3": "ffn_up",
             "feed_forward.w2": "ffn_down", "attention_norm": "attn_norm", "ffn_norm": "ffn_norm"}
    if module not in names:
        raise KeyError(f"no GGUF name for {ours!r}")
    return f"blk.{block}.{names[module]}.{suffix}"


def _tokenizer_fields(tokenizer_json: str, vocab_size: int, where: str) -> dict[str, Any]:
    tok = parse_json(tokenizer_json, CheckpointError, "tokenizer.json")
    model = tok.get("model") or {}
    if model.get("type") != "BPE":
        raise CheckpointError(f"{where}: GGUF export supports byte-level BPE tokenizers; this one is "
                              f"{model.get('type')!r}")
    pre = tok.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    if not any(s.get("type") == "ByteLevel" for s in steps) or (tok.get("decoder") or {}).get("type") != "ByteLevel":
        raise CheckpointError(f"{where}: GGUF export supports byte-level BPE tokenizers (GPT-2 style: ByteLevel "
                              "pre-tokenizer and decoder); this one is not byte-level")
    if len(steps) == 1 and steps[0].get("use_regex", True):
        pre_name = "gpt-2"
    else:
        splits = [s.get("pattern", {}).get("Regex") for s in steps if s.get("type") == "Split"]
        pre_name = _KNOWN_PRE.get(splits[0], "default") if len(splits) == 1 else "default"

    tokens: dict[int, str] = {int(i): t for t, i in model.get("vocab", {}).items()}
    types: dict[int, int] = {}
    for added in tok.get("added_tokens") or []:
        tokens[int(added["id"])] = added["content"]
        types[int(added["id"])] = TOKEN_CONTROL if added.get("special") else TOKEN_USER_DEFINED
    if tokens and max(tokens) >= vocab_size:
        raise CheckpointError(f"{where}: token id {max(tokens)} is outside the model's vocab_size {vocab_size}")
    token_list, type_list = [], []
    for i in range(vocab_size):  # gaps and the model's padded rows become unused placeholders
        if i in tokens:
            token_list.append(tokens[i])
            type_list.append(types.get(i, TOKEN_NORMAL))
        else:
            token_list.append(f"[PAD{i}]")
            type_list.append(TOKEN_UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    post = tok.get("post_processor") or {}
    return {"tokens": token_list, "types": type_list, "merges": merges, "pre": pre_name, "post": post}


def _adds_bos(post: dict[str, Any], bos: str | None) -> bool:
    """Whether the tokenizer's post-processor puts `bos` first (Llama 3 style)."""
    if bos is None:
        return False
    steps = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
    for step in steps:
        if step.get("type") == "TemplateProcessing":
            single = step.get("single") or []
            first = single[0] if single else {}
            return (first.get("SpecialToken") or {}).get("id") == bos
    return False


def _metadata(writer: Any, gguf: Any, cfg: ModelConfig, dtype: str, name: str) -> None:
    writer.add_name(name)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.d_model)
    writer.add_block_count(cfg.n_layer)
    writer.add_feed_forward_length(cfg.ffn_dim)
    writer.add_head_count(cfg.n_head)
    writer.add_head_count_kv(cfg.kv_heads)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType[_FILE_TYPES[dtype]])
    if cfg.rope_scaling is not None and cfg.rope_scaling.type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(cfg.rope_scaling.factor)
    if cfg.sliding_window is not None:
        writer.add_sliding_window(cfg.sliding_window)


def _qtype(gguf: Any, kind: str) -> Any:
    return gguf.GGMLQuantizationType[kind.upper()]  # "q8_0" -> Q8_0, "f16" -> F16


def tensor_type(gguf_name: str, shape: tuple[int, ...], dtype: str, *, tied: bool) -> str:
    """The storage type ("f32", "f16", "q8_0" or "q4_0") of one tensor in a `dtype` export:
    1-D tensors f32; the lm head q8_0 in a q4_0 file; a matrix whose rows are not a whole
    number of quantization blocks f16."""
    if len(shape) < 2:
        return "f32"
    if dtype in ("f32", "f16"):
        return dtype
    lm_head = gguf_name == "output.weight" or (tied and gguf_name == "token_embd.weight")
    kind = "q8_0" if lm_head else dtype
    gguf = _gguf()
    block_size, _ = gguf.GGML_QUANT_SIZES[_qtype(gguf, kind)]
    return kind if shape[-1] % block_size == 0 else "f16"


def _plan(state: dict[str, torch.Tensor], cfg: ModelConfig, dtype: str) -> list[tuple[str, str, tuple[int, ...], str]]:
    """(our name, GGUF name, shape, storage type) of every tensor the file holds, in file order."""
    plan = []
    for name, tensor in state.items():
        if name == "output.weight" and cfg.tie_embeddings:
            continue  # llama.cpp uses token_embd when output is absent
        gguf_name, shape = gguf_tensor_name(name), tuple(tensor.shape)
        plan.append((name, gguf_name, shape, tensor_type(gguf_name, shape, dtype, tied=cfg.tie_embeddings)))
    if cfg.rope_scaling is not None and cfg.rope_scaling.type == "llama3":
        plan.append((_ROPE_FREQS, _ROPE_FREQS, (cfg.head_dim // 2,), "f32"))
    return plan


def _float32(name: str, state: dict[str, torch.Tensor], cfg: ModelConfig) -> np.ndarray:
    """One tensor as llama.cpp wants its values (q/k rows permuted), float32."""
    if name == _ROPE_FREQS:
        base = rope_inv_freq(cfg.head_dim, cfg.rope_theta)
        scaled = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        return (base / scaled).numpy().astype(np.float32)  # llama.cpp divides theta by these
    t = state[name].detach().to(torch.float32)
    if ".attention.wq." in name:
        t = permute_qk(t, cfg.n_head)
    elif ".attention.wk." in name:
        t = permute_qk(t, cfg.kv_heads)
    return t.contiguous().numpy()


def _encode(gguf: Any, array: np.ndarray, kind: str) -> np.ndarray:
    """float32 values -> the bytes stored for `kind` (f32 / f16 arrays, or quantized blocks as uint8)."""
    return gguf.quants.quantize(array, _qtype(gguf, kind))


def _nbytes(gguf: Any, shape: tuple[int, ...], kind: str) -> int:
    block_size, type_size = gguf.GGML_QUANT_SIZES[_qtype(gguf, kind)]
    return int(np.prod(shape)) // block_size * type_size


def _write_tensors(writer: Any, gguf: Any, plan: list[tuple[str, str, tuple[int, ...], str]],
                   state: dict[str, torch.Tensor], cfg: ModelConfig) -> None:
    """Declare every tensor, write the header, then convert and write one tensor at a time, so
    that beside the loaded checkpoint only one converted tensor is in memory at once."""
    for _, gguf_name, shape, kind in plan:
        writer.add_tensor_info(gguf_name, shape, np.dtype(np.float32), _nbytes(gguf, shape, kind),
                               raw_dtype=_qtype(gguf, kind))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name, _, _, kind in plan:
        writer.write_tensor_data(_encode(gguf, _float32(name, state, cfg), kind))


def stored_values(state: dict[str, torch.Tensor], cfg: ModelConfig, dtype: GGUFDType) -> dict[str, torch.Tensor]:
    """`state` (a full-precision Transformer state dict) with every tensor replaced by the
    float32 values a `dtype` export stores for it: quantized with the same plan and the gguf
    package's quantizer as `export_gguf`, then dequantized by gguf's own dequantizer. What
    `bastion eval perplexity` measures a GGUF format with (llama.cpp's arithmetic on top of
    these values -- its dot products round activations to 8 bits -- is not reproduced)."""
    if dtype not in GGUF_DTYPES:
        raise CheckpointError(f"GGUF dtype must be one of {', '.join(GGUF_DTYPES)}, not {dtype!r}")
    gguf = _gguf()
    out = dict(state)
    for name, _, _, kind in _plan(state, cfg, dtype):
        if name == _ROPE_FREQS:
            continue
        tensor = state[name]
        # No q/k permutation: it reorders whole rows, and blocks lie within a row.
        values = tensor.detach().to(torch.float32).contiguous().numpy()
        back = gguf.quants.dequantize(_encode(gguf, values, kind), _qtype(gguf, kind))
        out[name] = torch.from_numpy(np.ascontiguousarray(back, dtype=np.float32)).reshape(tensor.shape).to(tensor.device)
    if cfg.tie_embeddings and "output.weight" in out:
        out["output.weight"] = out["tok_embeddings.weight"]  # one tensor in the file
    return out


def export_gguf(ckpt_path: str | Path, out_path: str | Path, dtype: GGUFDType = "f16",
                *, overwrite: bool = False) -> Path:
    """Write `out_path` (a .gguf file, mode 0600) atomically: temp file beside it + rename.
    `dtype`: one of GGUF_DTYPES (see the module docstring for what each stores where).
    Refuses an existing file unless overwrite."""
    if dtype not in GGUF_DTYPES:
        raise CheckpointError(f"GGUF dtype must be one of {', '.join(GGUF_DTYPES)}, not {dtype!r}")
    gguf = _gguf()
    out_path = Path(out_path)
    if out_path.is_symlink() or out_path.is_dir() or (out_path.exists() and not overwrite):
        raise CheckpointError(f"{out_path} already exists; choose a new file name")
    ckpt, config = load_full_model(ckpt_path, reject_nonfinite=True)
    cfg = config.model
    where = str(ckpt.directory)
    specials, ids = exported_special_tokens(ckpt)
    vocab = _tokenizer_fields(ckpt.tokenizer_json, cfg.vocab_size, where)
    plan = _plan(ckpt.model, cfg, dtype)

    out_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out_path.name}.tmp-", dir=out_path.parent)  # 0600, O_EXCL
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer = gguf.GGUFWriter(tmp, "llama")
        _metadata(writer, gguf, cfg, dtype, name=model_name(ckpt.directory, config))
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(vocab["pre"])
        writer.add_token_list(vocab["tokens"])
        writer.add_token_types(vocab["types"])
        writer.add_token_merges(vocab["merges"])
        if ids["bos_token"] is not None:
            writer.add_bos_token_id(ids["bos_token"])
        if ids["eos_token"] is not None:
            writer.add_eos_token_id(ids["eos_token"])
        if ids["pad_token"] is not None:
            writer.add_pad_token_id(ids["pad_token"])
        writer.add_add_bos_token(_adds_bos(vocab["post"], specials["bos_token"]))
        writer.add_chat_template(chat_template(ckpt.trainer_state))
        _write_tensors(writer, gguf, plan, ckpt.model, cfg)
        writer.close()
        os.chmod(tmp, 0o600)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out_path
