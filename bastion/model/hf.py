"""Bastion <-> Hugging Face (Llama / Mistral / Qwen2 / SmolLM3) names, tensors and configs.

Our `Transformer` is the Llama architecture with different parameter names; converting is
pure renaming (no transposes: both store nn.Linear weights as [out, in]):

    tok_embeddings.weight                  model.embed_tokens.weight
    layers.N.attention.wq.{weight,bias}    model.layers.N.self_attn.q_proj.{weight,bias}
    layers.N.attention.wk / wv / wo        ... self_attn.k_proj / v_proj / o_proj
    layers.N.feed_forward.w1 / w3 / w2     ... mlp.gate_proj / up_proj / down_proj
    layers.N.attention_norm.weight         model.layers.N.input_layernorm.weight
    layers.N.ffn_norm.weight               model.layers.N.post_attention_layernorm.weight
    norm.weight                            model.norm.weight
    output.weight                          lm_head.weight   (absent in HF when tied)
    score.weight                           score.weight     (scoring models: ...ForSequenceClassification)

`hf_name` also maps module prefixes ("layers.0.attention.wq" -> "model.layers.0.self_attn.q_proj"),
which is what LoRA / PEFT target names need.
"""
from __future__ import annotations

import re
from typing import Any

import torch
from pydantic import ValidationError

from bastion.config.schema import ModelConfig, RopeScalingConfig
from bastion.errors import CheckpointError

# Module-level renames (the parameter suffix .weight / .bias is carried along unchanged).
HF_NAMES: dict[str, str] = {
    "tok_embeddings": "model.embed_tokens",
    "norm": "model.norm",
    "output": "lm_head",
    "score": "score",
}
HF_LAYER_NAMES: dict[str, str] = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
# Short module names (as in FinetuneConfig.lora.target_modules) -> HF/PEFT target names.
HF_MODULE_NAMES: dict[str, str] = {
    "wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj",
    "w1": "gate_proj", "w3": "up_proj", "w2": "down_proj",
}

_OUR_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_SUFFIXES = ("", ".weight", ".bias")
_REVERSE = {v: k for k, v in HF_NAMES.items()}
_REVERSE_LAYER = {v: k for k, v in HF_LAYER_NAMES.items()}


def _split_suffix(name: str) -> tuple[str, str]:
    for suffix in (".weight", ".bias"):
        if name.endswith(suffix):
            return name[: -len(suffix)], suffix
    return name, ""


def hf_name(ours: str) -> str:
    """Our parameter or module name -> the Hugging Face Llama name. KeyError if unknown."""
    base, suffix = _split_suffix(ours)
    if base in HF_NAMES:
        return HF_NAMES[base] + suffix
    m = _OUR_LAYER.match(base)
    if m and m.group(2) in HF_LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{HF_LAYER_NAMES[m.group(2)]}{suffix}"
    raise KeyError(f"no Hugging Face name for {ours!r}")


def bastion_name(theirs: str) -> str:
    """Hugging Face Llama parameter or module name -> ours. KeyError if unknown."""
    base, suffix = _split_suffix(theirs)
    if base in _REVERSE:
        return _REVERSE[base] + suffix
    m = _HF_LAYER.match(base)
    if m and m.group(2) in _REVERSE_LAYER:
        return f"layers.{m.group(1)}.{_REVERSE_LAYER[m.group(2)]}{suffix}"
    raise KeyError(f"no Bastion name for {theirs!r}")


# ---- state dicts --------------------------------------------------------------------------

def expected_bastion_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor our Transformer holds for `cfg` (the tied lm_head counted once, under
    tok_embeddings) with its shape, computed without building the model."""
    d, hd = cfg.d_model, cfg.head_dim
    q, kv = cfg.n_head * hd, cfg.kv_heads * hd
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (cfg.vocab_size, d), "norm.weight": (d,)}
    if cfg.score_labels is not None:
        shapes["score.weight"] = (cfg.score_labels, d)
    elif not cfg.tie_embeddings:
        shapes["output.weight"] = (cfg.vocab_size, d)
    for i in range(cfg.n_layer):
        p = f"layers.{i}."
        shapes.update({
            p + "attention.wq.weight": (q, d), p + "attention.wk.weight": (kv, d),
            p + "attention.wv.weight": (kv, d), p + "attention.wo.weight": (d, q),
            p + "feed_forward.w1.weight": (cfg.ffn_dim, d), p + "feed_forward.w3.weight": (cfg.ffn_dim, d),
            p + "feed_forward.w2.weight": (d, cfg.ffn_dim),
            p + "attention_norm.weight": (d,), p + "ffn_norm.weight": (d,),
        })
        if cfg.qkv_bias:
            shapes.update({p + "attention.wq.bias": (q,), p + "attention.wk.bias": (kv,), p + "attention.wv.bias": (kv,)})
    return shapes


def to_hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig, *,
                     o_proj_bias: bool = False) -> dict[str, torch.Tensor]:
    """Our state dict -> HF names. Tied models get no lm_head.weight (HF ties it on load).
    o_proj_bias adds zero o_proj biases (Llama / SmolLM3 with attention_bias=True: `has_zero_o_proj_bias`)."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name == "output.weight" and cfg.tie_embeddings:
            continue
        out[hf_name(name)] = tensor
    if o_proj_bias:
        for i in range(cfg.n_layer):
            ref = state[f"layers.{i}.attention.wo.weight"]
            out[f"model.layers.{i}.self_attn.o_proj.bias"] = torch.zeros(cfg.d_model, dtype=ref.dtype)
    return out


def from_hf_state_dict(hf_state: dict[str, torch.Tensor], cfg: ModelConfig, *,
                       where: str = "Hugging Face weights") -> dict[str, torch.Tensor]:
    """HF-named tensors -> our names, checked: every tensor the config implies present with
    the right shape, nothing unexpected (rotary inv_freq buffers are dropped; an all-zero
    o_proj bias is accepted and dropped; a tied lm_head equal to the embedding is dropped).
    The tied output.weight is added as an alias of tok_embeddings.weight."""
    expected = expected_bastion_shapes(cfg)
    state: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for name, tensor in hf_state.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        try:
            ours = bastion_name(name)
        except KeyError:
            unexpected.append(name)
            continue
        if ours.endswith("attention.wo.bias"):
            if torch.count_nonzero(tensor):
                raise CheckpointError(f"{where}: {name} is a non-zero o_proj bias, which Bastion's model does not have")
            continue
        if ours == "output.weight" and cfg.tie_embeddings and cfg.score_labels is None:
            emb = hf_state.get("model.embed_tokens.weight")
            if emb is not None and (emb.shape != tensor.shape or not torch.equal(emb, tensor)):
                raise CheckpointError(f"{where}: config ties embeddings but lm_head.weight differs from embed_tokens")
            continue
        if ours not in expected:
            unexpected.append(name)
            continue
        state[ours] = tensor
    problems = []
    missing = sorted(hf_name(n) for n in set(expected) - set(state))
    if missing:
        problems.append(f"missing tensor(s) {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"unexpected tensor(s) {', '.join(sorted(unexpected)[:5])}{' ...' if len(unexpected) > 5 else ''}")
    for ours, tensor in state.items():
        if tuple(tensor.shape) != expected[ours]:
            problems.append(f"{hf_name(ours)} has shape {tuple(tensor.shape)}, the config implies {expected[ours]}")
    if problems:
        raise CheckpointError(f"{where} do not match config.json: " + "; ".join(problems[:8]))
    if cfg.tie_embeddings and cfg.score_labels is None:
        state["output.weight"] = state["tok_embeddings.weight"]
    # Our checkpoints keep the Transformer's state_dict order (handy, not required).
    order = {n: i for i, n in enumerate(_our_order(cfg))}
    return dict(sorted(state.items(), key=lambda kv: order.get(kv[0], len(order))))


def _our_order(cfg: ModelConfig) -> list[str]:
    names = ["tok_embeddings.weight"]
    for i in range(cfg.n_layer):
        p = f"layers.{i}."
        names += [p + "attention_norm.weight", p + "attention.wq.weight", p + "attention.wq.bias",
                  p + "attention.wk.weight", p + "attention.wk.bias", p + "attention.wv.weight",
                  p + "attention.wv.bias", p + "attention.wo.weight", p + "ffn_norm.weight",
                  p + "feed_forward.w1.weight", p + "feed_forward.w2.weight", p + "feed_forward.w3.weight"]
    return names + ["norm.weight", "output.weight", "score.weight"]


# ---- configs ------------------------------------------------------------------------------

SUPPORTED_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "smollm3": "SmolLM3ForCausalLM",  # only with RoPE on every layer: what `export hf` writes for window + qkv bias
}
_DEFAULT_ROPE_THETA = {"smollm3": 2_000_000.0}  # transformers' default when config.json has none
# config.json keys whose other values change what the weights compute: the values Bastion
# reproduces (a missing key means transformers' default, which is the first one).
_SUPPORTED_VALUES = {
    "hidden_act": ("silu",),
    "mlp_bias": (False,),
    "pretraining_tp": (1,),
}


def _rope_params(hf: dict[str, Any]) -> tuple[float | None, dict[str, Any] | None]:
    """(rope_theta, scaling dict or None) from a v4 (`rope_theta`, `rope_scaling`) or v5
    (`rope_parameters`) config."""
    theta = hf.get("rope_theta")
    scaling = hf.get("rope_scaling")
    params = hf.get("rope_parameters")
    if isinstance(params, dict):
        theta = params.get("rope_theta", theta)
        if scaling is None:
            scaling = params
    if isinstance(scaling, dict):
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind in (None, "default"):
            scaling = None
    return theta, scaling


def _scaling_config(scaling: dict[str, Any], where: str) -> RopeScalingConfig:
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind not in ("linear", "llama3"):
        raise CheckpointError(f"{where}: rope scaling type {kind!r} is not supported (only linear and llama3)")
    fields = {"type": kind, "factor": scaling.get("factor")}
    if kind == "llama3":
        for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if scaling.get(key) is None:
                raise CheckpointError(f"{where}: llama3 rope scaling lacks {key}")
            fields[key] = scaling[key]
    try:
        return RopeScalingConfig(**fields)
    except ValidationError as exc:
        raise CheckpointError(f"{where}: invalid rope scaling parameters: {_one_line(exc)}") from None


def _rope_on_every_layer(hf: dict[str, Any], where: str) -> None:
    """SmolLM3 leaves RoPE out of some layers (no_rope_layers: 0; by default every
    no_rope_layer_interval-th layer). Bastion applies RoPE on every layer: refuse the others."""
    n_layer = hf.get("num_hidden_layers") or 0
    flags = hf.get("no_rope_layers")
    if flags is None:
        interval = hf.get("no_rope_layer_interval", 4)
        if not isinstance(interval, int) or interval < 1:
            raise CheckpointError(f"{where}: no_rope_layer_interval must be a positive integer")
        flags = [int((i + 1) % interval != 0) for i in range(n_layer)]
    if not isinstance(flags, list) or any(flag != 1 for flag in flags):
        raise CheckpointError(f"{where}: layers without RoPE (no_rope_layers) are not supported "
                              "(Bastion applies RoPE on every layer)")


def _sliding_window(hf: dict[str, Any], model_type: str, where: str) -> int | None:
    """Mistral: `sliding_window` applies to every layer. Qwen2 and SmolLM3: only with
    use_sliding_window, and then per layer (layer_types; without it, Qwen2 slides the layers
    >= max_window_layers and SmolLM3 only its layers without RoPE, which Bastion refuses);
    Bastion has one window for all layers, so a mix is refused. Llama has none."""
    if model_type == "mistral":
        if hf.get("layer_types") is not None and set(hf["layer_types"]) != {"sliding_attention"}:
            raise CheckpointError(f"{where}: per-layer attention types (layer_types) are not supported")
        return hf.get("sliding_window")
    if model_type not in ("qwen2", "smollm3") or not hf.get("use_sliding_window") or hf.get("sliding_window") is None:
        return None
    n_layer = hf.get("num_hidden_layers") or 0
    types = hf.get("layer_types")
    if types is None and model_type == "smollm3":
        return None
    if types is None:
        first = hf.get("max_window_layers", 28)
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(n_layer)]
    if not isinstance(types, list) or set(types) - {"sliding_attention", "full_attention"}:
        raise CheckpointError(f"{where}: layer_types must list 'sliding_attention' / 'full_attention'")
    if set(types) == {"full_attention"}:
        return None
    if set(types) != {"sliding_attention"}:
        raise CheckpointError(f"{where}: sliding-window attention on some layers only is not supported "
                              "(Bastion applies one window to every layer)")
    return hf["sliding_window"]


def model_config_from_hf_config(hf: dict[str, Any], where: str = "config.json") -> ModelConfig:
    """A Hugging Face config.json (as a dict) -> our ModelConfig, refusing anything the
    Bastion model cannot compute exactly (remote code, other architectures, other activations)."""
    if not isinstance(hf, dict):
        raise CheckpointError(f"{where}: not a JSON object")
    if "auto_map" in hf:
        raise CheckpointError(f"{where}: declares auto_map (custom remote code); Bastion never runs model code "
                              "shipped with weights - refusing to import it")
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(f"{where}: model_type {model_type!r} is not supported; "
                              f"supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}")
    archs = hf.get("architectures")
    if archs is not None and archs != [SUPPORTED_ARCHITECTURES[model_type]]:
        raise CheckpointError(f"{where}: architectures {archs!r} is not supported for model_type {model_type!r} "
                              f"(expected [{SUPPORTED_ARCHITECTURES[model_type]!r}])")
    for key, allowed in _SUPPORTED_VALUES.items():
        if key in hf and hf[key] not in allowed:
            raise CheckpointError(f"{where}: {key}={hf.get(key)!r} is not supported (Bastion supports {allowed[0]!r})")
    head_dim, heads, hidden = hf.get("head_dim"), hf.get("num_attention_heads"), hf.get("hidden_size")
    if head_dim is not None and heads and hidden and head_dim * heads != hidden:
        raise CheckpointError(f"{where}: head_dim * num_attention_heads != hidden_size is not supported")
    if model_type == "qwen2":
        qkv_bias = True
    else:
        qkv_bias = bool(hf.get("attention_bias", False))
    # Llama's and SmolLM3's attention_bias also adds an o_proj bias; we accept it only when
    # all zeros (from_hf_state_dict checks), which is what our own export writes.
    if model_type == "smollm3":
        _rope_on_every_layer(hf, where)

    sliding = _sliding_window(hf, model_type, where)

    theta, scaling = _rope_params(hf)
    partial = (hf.get("rope_parameters") or {}).get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        raise CheckpointError(f"{where}: partial_rotary_factor={partial!r} is not supported")
    required = ("vocab_size", "num_hidden_layers", "num_attention_heads", "hidden_size", "intermediate_size")
    missing = [k for k in required if hf.get(k) is None]
    if missing:
        raise CheckpointError(f"{where}: missing {', '.join(missing)}")
    fields = {
        "vocab_size": hf["vocab_size"],
        "n_layer": hf["num_hidden_layers"],
        "n_head": hf["num_attention_heads"],
        "n_kv_head": hf.get("num_key_value_heads") or hf["num_attention_heads"],
        "d_model": hf["hidden_size"],
        "d_ff": hf["intermediate_size"],
        "max_seq_len": hf.get("max_position_embeddings") or 2048,
        "rope_theta": theta if theta is not None else _DEFAULT_ROPE_THETA.get(model_type, 10_000.0),
        "norm_eps": hf.get("rms_norm_eps", 1e-6),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", model_type == "smollm3")),  # the classes' defaults
        "qkv_bias": qkv_bias,
        "dropout": 0.0,
        "rope_scaling": _scaling_config(scaling, where) if scaling else None,
        "sliding_window": sliding,
    }
    try:
        return ModelConfig(**fields)
    except ValidationError as exc:
        raise CheckpointError(f"{where}: cannot be expressed as a Bastion model config: {_one_line(exc)}") from None


def _one_line(exc: ValidationError) -> str:
    """pydantic's errors as one line, values left out (the schema hides inputs anyway)."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'model'}: {e['msg'].removeprefix('Value error, ')}"
                     for e in exc.errors())


def hf_model_type(cfg: ModelConfig, prefer: str | None = None) -> str:
    """Which HF architecture computes exactly what `cfg` does and loads the exported
    tokenizer.json as written:

    * "qwen2" for qkv biases (with or without Qwen2's opt-in window on every layer), only
      when `prefer="qwen2"`. transformers v5's AutoTokenizer loads every model_type "qwen2"
      folder as Qwen2Tokenizer, which rebuilds the tokenizer from its vocab and merges with
      Qwen2's own normaliser and split regex, whatever tokenizer_config.json says (qwen2 is
      in its MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS). Callers prefer it only for a model
      imported from Qwen2 whose tokenizer Qwen2Tokenizer rebuilds exactly (interop/hf.py).
    * "mistral" for a sliding window without qkv biases,
    * "smollm3" for a sliding window with qkv biases: SmolLM3 with RoPE on every layer, every
      layer sliding, `attention_bias=True` plus all-zero o_proj biases (transformers >= 4.53),
    * "llama" otherwise - with qkv biases as `attention_bias=True` plus all-zero o_proj biases.
    """
    if prefer == "qwen2" and cfg.qkv_bias:
        return "qwen2"
    if cfg.sliding_window is not None:
        return "smollm3" if cfg.qkv_bias else "mistral"
    return "llama"


def has_zero_o_proj_bias(model_type: str, cfg: ModelConfig) -> bool:
    """Whether `model_type`'s attention_bias gives HF an o_proj bias Bastion lacks (export it
    as zeros: `to_hf_state_dict(..., o_proj_bias=True)`)."""
    return model_type in ("llama", "smollm3") and cfg.qkv_bias


def hf_config_from_model_config(cfg: ModelConfig, *, bos_token_id: int | None = None,
                                eos_token_id: int | None = None, pad_token_id: int | None = None,
                                torch_dtype: str = "float32", model_type: str | None = None) -> dict[str, Any]:
    """Our ModelConfig -> a config.json dict; the architecture is `hf_model_type(cfg)` unless
    model_type is given. With "llama" or "smollm3" and qkv_bias, attention_bias=True also gives
    HF an o_proj bias: export it as zeros (`has_zero_o_proj_bias`)."""
    if cfg.vocab_size is None:
        raise CheckpointError("model.vocab_size is not set")
    model_type = model_type or hf_model_type(cfg)
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(f"unknown Hugging Face model_type {model_type!r}")
    if (model_type == "mistral" and cfg.qkv_bias) or (model_type == "llama" and cfg.sliding_window is not None) \
            or (model_type == "qwen2" and not cfg.qkv_bias):
        raise CheckpointError(f"{model_type} cannot express this model (qkv_bias={cfg.qkv_bias}, "
                              f"sliding_window={cfg.sliding_window})")
    out: dict[str, Any] = {
        "architectures": [hf_architecture(model_type, cfg)],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": 0.0,
        "initializer_range": cfg.init_std,
        "use_cache": True,
        "dtype": torch_dtype,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
    }
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rs = cfg.rope_scaling
        rope = {"rope_type": rs.type, "rope_theta": cfg.rope_theta, "factor": rs.factor}
        if rs.type == "llama3":
            rope.update(low_freq_factor=rs.low_freq_factor, high_freq_factor=rs.high_freq_factor,
                        original_max_position_embeddings=rs.original_max_position_embeddings)
        out["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    out["rope_parameters"] = rope
    if cfg.score_labels is not None:  # transformers derives num_labels from id2label
        out["id2label"] = {str(i): f"LABEL_{i}" for i in range(cfg.score_labels)}
        out["label2id"] = {f"LABEL_{i}": i for i in range(cfg.score_labels)}
    if model_type == "llama":
        out.update(attention_bias=cfg.qkv_bias, mlp_bias=False, pretraining_tp=1)
    elif model_type == "mistral":
        out["sliding_window"] = cfg.sliding_window
    elif model_type == "qwen2":
        out.update(use_sliding_window=cfg.sliding_window is not None, sliding_window=cfg.sliding_window,
                   max_window_layers=0, layer_types=_layer_types(cfg))
    elif model_type == "smollm3":
        out.update(attention_bias=cfg.qkv_bias, mlp_bias=False, no_rope_layers=[1] * cfg.n_layer,
                   use_sliding_window=cfg.sliding_window is not None, sliding_window=cfg.sliding_window,
                   layer_types=_layer_types(cfg))
    return out


def hf_architecture(model_type: str, cfg: ModelConfig) -> str:
    """The transformers class: `LlamaForCausalLM` and the like for a language model, the same
    family's `...ForSequenceClassification` for a scoring model (model.score_labels)."""
    causal = SUPPORTED_ARCHITECTURES[model_type]
    return causal if cfg.score_labels is None else causal.replace("ForCausalLM", "ForSequenceClassification")


def _layer_types(cfg: ModelConfig) -> list[str]:
    """One attention type for every layer: Bastion's window, when set, applies to all."""
    return ["sliding_attention" if cfg.sliding_window is not None else "full_attention"] * cfg.n_layer
