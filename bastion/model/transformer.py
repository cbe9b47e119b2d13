"""A decoder-only transformer in one file: the Llama architecture, GPT-2 style init.

Token embedding -> N x [pre-RMSNorm -> grouped-query attention with RoPE -> residual,
pre-RMSNorm -> SwiGLU MLP -> residual] -> final RMSNorm -> lm_head.

The math mirrors Hugging Face `LlamaForCausalLM` exactly (rotate_half RoPE on the half-split
layout, RMSNorm in float32, SiLU-gated MLP) so weights can be exported to it by renaming:

    tok_embeddings          -> model.embed_tokens
    layers.N.attention.wq   -> model.layers.N.self_attn.q_proj   (wk/wv/wo: k/v/o_proj)
    layers.N.feed_forward.w1 -> model.layers.N.mlp.gate_proj     (w3: up_proj, w2: down_proj)
    layers.N.attention_norm -> model.layers.N.input_layernorm
    layers.N.ffn_norm       -> model.layers.N.post_attention_layernorm
    norm / output           -> model.norm / lm_head

(With qkv_bias=True, HF Llama's `attention_bias` also adds an o_proj bias; export it as zeros.)
bastion/model/hf.py holds this map as code, plus config conversion both ways.

A scoring model (`model.score_labels` K: a reward model, a classifier) has `score`, a
Linear(d_model, K) head, instead of `output`: forward returns K values per position, read at
the last token as transformers' `...ForSequenceClassification` does (bastion/model/heads.py).
A fused scoring model (`model.modalities`) also has `fusion` (bastion/model/fusion.py): the
final-norm states attend to per-example feature streams (`forward(..., streams=...)`) and are
mixed through learned gates before the score head.

Optional extras, also computed exactly as transformers does: `rope_scaling` ("linear" or
Llama 3's "llama3" frequency scaling) and `sliding_window` (Mistral: a token attends to
itself and the window - 1 tokens before it).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
import torch.utils.checkpoint
import torch.nn as nn
import torch.nn.functional as F

from bastion.config.schema import ModelConfig, RopeScalingConfig
from bastion.errors import CheckpointError
from bastion.model.fusion import FrameBatch, Fusion, modality_shapes


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 (bf16 squares lose too much precision), cast back, then scale:
        # the same order of operations as LlamaRMSNorm.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScalingConfig | None = None) -> torch.Tensor:
    """RoPE inverse frequencies [head_dim / 2], float32, exactly as transformers computes them
    (`modeling_rope_utils`): default, "linear" (every frequency / factor, i.e. positions
    interpolated), or "llama3" (Llama 3.1: long wavelengths / factor, short ones kept, a smooth
    blend in between, decided against the original context length)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    if scaling is None:
        return inv_freq
    if scaling.type == "linear":
        return inv_freq / scaling.factor
    # llama3 - same operations, same order as transformers' _compute_llama3_parameters.
    factor, low, high = scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor
    old_context_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_context_len / low
    high_freq_wavelen = old_context_len / high
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth_factor = (old_context_len / wavelen - low) / (high - low)
    smoothed_inv_freq = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium_freq, smoothed_inv_freq, inv_freq_llama)


def rope_tables(head_dim: int, max_len: int, theta: float,
                scaling: RopeScalingConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [max_len, head_dim], computed in float32 as HF's RoPE does."""
    inv_freq = rope_inv_freq(head_dim, theta, scaling)
    freqs = torch.outer(torch.arange(max_len, dtype=torch.float), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)  # half-split layout: dims i and i + head_dim/2 pair up
    return emb.cos(), emb.sin()


def sliding_window_mask(start_pos: int, T: int, window: int, device: torch.device | str | None = None) -> torch.Tensor:
    """[T, start_pos + T] bool: query at position p sees keys at positions p - window < j <= p
    (Mistral / transformers' sliding_window_overlay: the window counts the query itself)."""
    q = torch.arange(start_pos, start_pos + T, device=device)[:, None]
    k = torch.arange(0, start_pos + T, device=device)[None, :]
    return (k <= q) & (k > q - window)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, head_dim]; cos/sin: [T, head_dim], or [B, 1, T, head_dim] for packed rows."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)  # "rotate_half"
    return x * cos + rotated * sin


def positions_within_segments(segment_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] segment ids -> each token's offset from the start of its segment."""
    T = segment_ids.size(1)
    index = torch.arange(T, device=segment_ids.device).expand_as(segment_ids)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    start_index = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - start_index


class KVCache:
    """Preallocated keys/values per layer, each [B, n_kv_head, max_len, head_dim].

    The cache does not track a position: callers pass `start_pos` to `Transformer.forward`,
    which writes positions [start_pos, start_pos + T) and attends to [0, start_pos + T).
    """

    def __init__(self, n_layer: int, batch_size: int, n_kv_head: int, max_len: int, head_dim: int,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        shape = (batch_size, n_kv_head, max_len, head_dim)
        self.batch_size, self.max_len = batch_size, max_len
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]

    def update(self, layer: int, start_pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = start_pos + k.size(2)
        self.k[layer][:, :, start_pos:end] = k
        self.v[layer][:, :, start_pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def rows(self, start: int, stop: int) -> "KVCache":
        """A view of sequences [start, stop) sharing this cache's memory: one sequence of a
        batch can be prefilled or decoded on its own (B=1) and its keys land in its row."""
        if not 0 <= start < stop <= self.batch_size:
            raise ValueError(f"rows [{start}, {stop}) are outside the cache's batch of {self.batch_size}")
        view = KVCache.__new__(KVCache)
        view.batch_size, view.max_len = stop - start, self.max_len
        view.k = [k[start:stop] for k in self.k]
        view.v = [v[start:stop] for v in self.v]
        return view


class _RowwiseUpdate:
    """What `Attention` sees as its cache during `Transformer.decode_step`: row b writes its
    one new key/value at its own position, and reads its cache row's first `length` positions
    (the longest row's length; the attention mask hides each row's positions past its own)."""

    def __init__(self, cache: KVCache, rows: torch.Tensor, positions: torch.Tensor, length: int,
                 contiguous_from: int | None):
        self.cache, self.rows, self.positions, self.length = cache, rows, positions, length
        # Rows r0..r0+B-1 are read through a slice (a view) instead of a gather (a copy).
        self.read = (slice(contiguous_from, contiguous_from + rows.numel()) if contiguous_from is not None
                     else rows)

    def update(self, layer: int, start_pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k_cache, v_cache = self.cache.k[layer], self.cache.v[layer]
        # k, v: [B, n_kv_head, 1, head_dim]; indexing dims 0 and 2 with [B] tensors picks
        # [B, n_kv_head, head_dim], one position per row.
        k_cache[self.rows, :, self.positions] = k[:, :, 0].to(k_cache.dtype)
        v_cache[self.rows, :, self.positions] = v[:, :, 0].to(v_cache.dtype)
        return k_cache[self.read, :, :self.length], v_cache[self.read, :, :self.length]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, self.n_head * self.head_dim, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.d_model, self.n_kv_head * self.head_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.d_model, self.n_kv_head * self.head_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(self.n_head * self.head_dim, cfg.d_model, bias=False)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | _RowwiseUpdate | None, layer: int, start_pos: int,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, start_pos, k, v)
            k, v = k.to(q.dtype), v.to(q.dtype)  # no-op unless the cache dtype differs (autocast)
        if self.n_kv_head != self.n_head:
            # GQA: query head h reads kv head h // n_rep, like HF's repeat_kv.
            n_rep = self.n_head // self.n_kv_head
            k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
        causal = mask is None
        if mask is None and k.size(2) != T:
            # Queries sit at positions start_pos.. and see every cached key up to themselves.
            # is_causal would align the mask top-left (query 0 sees key 0 only), which is wrong
            # for a chunk that follows cached tokens, so build the mask explicitly.
            causal = False
            if T > 1:
                mask = torch.ones(T, k.size(2), dtype=torch.bool, device=x.device).tril(diagonal=start_pos)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.resid_dropout(self.wo(y))

    def project_rows(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) \
            -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decode, one token per row (`Transformer.decode_rows`), x [P, 1, d], the first half,
        position-wise: the rotated queries, grouped by kv head
        [P, n_kv_head, n_rep, 1, head_dim] (GQA without copying the keys: query head h reads
        kv head h // n_rep, as repeat_kv), and the new keys and values [P, n_kv_head, 1, head_dim]."""
        P = x.size(0)
        q = self.wq(x).view(P, 1, self.n_head, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(P, 1, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(P, 1, self.n_kv_head, self.head_dim).transpose(1, 2)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q.view(P, 1, self.n_kv_head, self.n_head // self.n_kv_head, self.head_dim), k, v

    def attend_rows(self, groups: torch.Tensor, k: torch.Tensor, v: torch.Tensor, caches: list[KVCache], layer: int,
                    positions: list[int], window: int | None) -> torch.Tensor:
        """Decode's attention, before the output projection: the first len(caches) rows are
        sequences (row b's keys/values live in caches[b], a batch-1 cache, its new token at
        positions[b]), the rest padding. Each sequence's new key and value go into its cache,
        then its queries attend to exactly its own keys [0, positions[b]] (the window's, with
        sliding_window), so the result depends on that row alone, never on the other rows'
        lengths -> [P, 1, n_head * head_dim]."""
        P = groups.size(0)
        out = []
        for b, (cache, pos) in enumerate(zip(caches, positions)):
            k_cache, v_cache = cache.k[layer], cache.v[layer]
            k_cache[0, :, pos] = k[b, :, 0]
            v_cache[0, :, pos] = v[b, :, 0]
            first = 0 if window is None else max(0, pos - window + 1)
            keys, values = k_cache[:1, :, first:pos + 1], v_cache[:1, :, first:pos + 1]
            if k_cache.dtype != groups.dtype:  # only when the cache's dtype differs (autocast)
                keys, values = keys.to(groups.dtype), values.to(groups.dtype)
            out.append(F.scaled_dot_product_attention(groups[b], keys, values))
        if P > len(caches):  # padding rows attend to nothing
            out.append(groups.new_zeros(P - len(caches), self.n_kv_head, groups.size(3), self.head_dim))
        return torch.cat(out).view(P, 1, self.n_head * self.head_dim)


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)  # gate
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=False)  # down
        self.w3 = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)  # up
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | _RowwiseUpdate | None, layer: int, start_pos: int,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, cache, layer, start_pos, mask)
        return x + self.feed_forward(self.ffn_norm(x))

    def rows_in(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) \
            -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decode (`Transformer.decode_rows`): the block's position-wise work before attention."""
        return self.attention.project_rows(self.attention_norm(x), cos, sin)

    def rows_out(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """Decode: the block's position-wise work after attention (output projection, MLP)."""
        x = x + self.attention.wo(attended)
        return x + self.feed_forward(self.ffn_norm(x))


# `Transformer.decode_rows` in position-wise pieces between the per-row attentions, each a
# function of [P, 1, d] rows alone: what a compiled decode step compiles (bastion/infer/compiled.py),
# one graph per piece shared by every layer, whatever the sequences' lengths.
def rows_enter(model: "Transformer", idx: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) \
        -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Embedding, then the first block's work before attention: (x, queries, keys, values)."""
    x = model.tok_embeddings(idx)
    return (x, *model.layers[0].rows_in(x, cos, sin))


def rows_between(block: Block, following: Block, x: torch.Tensor, attended: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One block's work after its attention and the next block's before its own."""
    x = block.rows_out(x, attended)
    return (x, *following.rows_in(x, cos, sin))


def rows_leave(block: Block, model: "Transformer", x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
    """The last block's work after its attention, the final norm and the head: logits [P, vocab]."""
    return model.output(model.norm(block.rows_out(x, attended)))[:, -1]


class RowSteps(NamedTuple):
    """The position-wise pieces `decode_rows` runs: these functions, or compiled copies."""

    enter: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]
    between: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]
    leave: Callable[..., torch.Tensor]


EAGER_ROW_STEPS = RowSteps(rows_enter, rows_between, rows_leave)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("ModelConfig.vocab_size is not set; fill it from the tokenizer before building the model")
        self.cfg = cfg
        self.activation_checkpointing = False  # set by the training loop (train.activation_checkpointing)
        self.loss_chunk_tokens: int | None = None  # set by the training loop (train.loss_chunk_tokens)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        if cfg.score_labels is None:
            self.output = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
            if cfg.tie_embeddings:
                self.output.weight = self.tok_embeddings.weight
        else:  # a scoring model: K values per position instead of next-token logits (heads.py)
            self.score = nn.Linear(cfg.d_model, cfg.score_labels, bias=False)
        # Non-persistent: derived from the config, so they stay out of checkpoints.
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

        self.apply(self._init_weights)
        # GPT-2: each residual branch's output projection is scaled down so the residual
        # stream's variance does not grow with depth (2 branches per layer).
        for name, p in self.named_parameters():
            if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
                nn.init.normal_(p, mean=0.0, std=cfg.init_std / math.sqrt(2 * cfg.n_layer))
        if cfg.modalities:  # after the init above: fusion keeps PyTorch's own initialisations (fusion.py)
            self.fusion = Fusion(modality_shapes(cfg.modalities), cfg.d_model, cfg.n_head)

    @classmethod
    def from_state_dict(cls, cfg: ModelConfig, state: dict[str, torch.Tensor],
                        device: torch.device | str | None = None) -> "Transformer":
        """A model holding `state`'s tensors, built without a random init: parameters start
        on the meta device and the given tensors are assigned, not copied, so loading costs
        one copy of the weights instead of two (and no init time). strict: names and
        shapes must match."""
        tied = cfg.tie_embeddings and cfg.score_labels is None
        if tied and not _same_weights(state.get("output.weight"), state.get("tok_embeddings.weight")):
            # Tying would silently drop this lm_head: the weights and the config disagree.
            raise CheckpointError("the config ties embeddings, but output.weight differs from tok_embeddings.weight")
        with torch.device("meta"):
            model = cls(cfg)
        model.load_state_dict(state, strict=True, assign=True)
        if tied:
            model.output.weight = model.tok_embeddings.weight
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling)
        model.rope_cos, model.rope_sin = cos, sin
        return model.to(device) if device is not None else model

    @property
    def head(self) -> nn.Linear:
        """The final projection: `output` (vocabulary logits) or, for a scoring model, `score`."""
        return self.output if self.cfg.score_labels is None else self.score

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def new_cache(self, batch_size: int, max_len: int | None = None,
                  device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> KVCache:
        """An empty KV cache; defaults: max_len = cfg.max_seq_len, the model's device and dtype."""
        max_len = self.cfg.max_seq_len if max_len is None else max_len
        if not 1 <= max_len <= self.cfg.max_seq_len:
            raise ValueError(f"cache max_len ({max_len}) must be between 1 and max_seq_len ({self.cfg.max_seq_len})")
        weight = self.tok_embeddings.weight
        return KVCache(self.cfg.n_layer, batch_size, self.cfg.kv_heads, max_len, self.cfg.head_dim,
                       device=weight.device if device is None else device,
                       dtype=weight.dtype if dtype is None else dtype)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                cache: KVCache | None = None, start_pos: int = 0,
                segment_ids: torch.Tensor | None = None,
                logits_at: torch.Tensor | None = None,
                streams: Mapping[str, FrameBatch] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx [B, T] -> (logits [B, T, vocab], mean cross-entropy over targets != -100 or None);
        a scoring model returns its head's values [B, T, K] instead of logits (no targets).

        With a cache, idx holds positions [start_pos, start_pos + T) and attends to everything
        cached before them (prefill: start_pos=0 with the whole prompt; decode: T=1).
        With segment_ids [B, T] (several documents packed into one row, each a run of equal
        ids), a token attends only to earlier tokens of its own document, and RoPE positions
        restart at 0 for each document - the row computes exactly what the documents would
        separately.
        With logits_at [B] (one position per row, no targets), only those positions go
        through the head: logits [B, 1, vocab] - a prefill needs the last prompt token's
        logits only, and the whole [B, T, vocab] would be the largest tensor it makes.
        With streams {modality: FrameBatch} (a fused model only), the final-norm states go
        through `fusion` before the score head; a modality left out is missing for every row.
        """
        B, T = idx.shape
        if T == 0:
            raise ValueError("idx has no tokens (sequence length 0)")
        if start_pos < 0 or start_pos + T > self.cfg.max_seq_len:
            raise ValueError(f"positions {start_pos}..{start_pos + T - 1} exceed max_seq_len ({self.cfg.max_seq_len}): "
                             f"sequence length {T} + start_pos {start_pos} must be <= {self.cfg.max_seq_len}")
        if targets is not None and self.cfg.score_labels is not None:
            raise ValueError("a scoring model (model.score_labels) has no next-token loss; pool its values instead")
        if streams is not None:
            names = self.cfg.modalities
            if not names or set(streams) - set(names):
                raise ValueError(f"streams {sorted(streams)} do not fit model.modalities {sorted(names)}")
        if cache is None and start_pos != 0:
            raise ValueError("start_pos > 0 needs a KV cache holding the earlier positions")
        if cache is not None:
            if B != cache.batch_size:
                raise ValueError(f"batch size {B} does not match the cache's batch size {cache.batch_size}")
            if start_pos + T > cache.max_len:
                raise ValueError(f"sequence length {T} + start_pos {start_pos} exceeds the cache's max_len ({cache.max_len})")

        x = self.tok_embeddings(idx)
        mask = None
        if segment_ids is not None:
            if cache is not None or segment_ids.shape != idx.shape:
                raise ValueError("segment_ids must have idx's shape and cannot be combined with a KV cache")
            positions = positions_within_segments(segment_ids)
            cos, sin = self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1)
            causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
            mask = ((segment_ids[:, :, None] == segment_ids[:, None, :]) & causal).unsqueeze(1)  # [B, 1, T, T]
        else:
            cos = self.rope_cos[start_pos:start_pos + T]
            sin = self.rope_sin[start_pos:start_pos + T]
        window = self.cfg.sliding_window
        if window is not None and start_pos + T > window:
            # Mistral local attention: only when some query could see past the window, so
            # shorter sequences keep the fast is_causal path. Within a packed row a document's
            # tokens are contiguous, so row distance is document distance.
            local = sliding_window_mask(start_pos, T, window, idx.device)
            mask = local if mask is None else mask & local
        recompute = self.activation_checkpointing and self.training and cache is None and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            if recompute:
                # Keep only each block's input; its activations are recomputed in backward
                # (memory for compute: ~1/3 more FLOPs, activation memory down to one block's).
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, None, i, start_pos, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, cache, i, start_pos, mask)
        if targets is not None and self.loss_chunk_tokens and self.training and torch.is_grad_enabled():
            return None, self._chunked_loss(x, targets, self.loss_chunk_tokens)
        if logits_at is not None:
            if targets is not None or logits_at.shape != (B,):
                raise ValueError("logits_at must hold one position per row [B], and cannot be combined with targets")
            x = x[torch.arange(B, device=x.device), logits_at.to(x.device)].unsqueeze(1)
        h = self.norm(x)
        if self.cfg.modalities:  # position-wise given the frames, so logits_at may select first
            h = self.fusion(h, streams or {})
        logits = self.head(h)
        loss = None
        if targets is not None:
            # float32 loss: bf16 log-softmax over a large vocab is noticeably off.
            # (All targets == -100 gives nan, as F.cross_entropy does.)
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    def _chunked_loss(self, x: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        """The same mean cross-entropy, without ever holding the [B*T, vocab] logits: the
        head and the loss run `chunk` tokens at a time, each chunk recomputed in backward
        (with a large vocabulary the logits are the biggest activation of the whole model)."""
        h, t = x.reshape(-1, x.size(-1)), targets.reshape(-1)
        total = torch.zeros((), device=x.device, dtype=torch.float32)
        for start in range(0, h.size(0), chunk):
            total = total + torch.utils.checkpoint.checkpoint(
                self._loss_sum, h[start:start + chunk], t[start:start + chunk], use_reentrant=False)
        return total / (t != -100).sum()  # all targets -100: nan, as F.cross_entropy gives

    def _loss_sum(self, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.output(self.norm(h)).float(), t, ignore_index=-100, reduction="sum")

    def decode_step(self, tokens: list[int], cache: KVCache, rows: list[int], positions: list[int],
                    key_length: int | None = None) -> torch.Tensor:
        """One new token for each of B independent sequences, each at its own position:
        -> next-token logits [B, vocab]. Continuous batching (bastion/infer/engine.py) decodes
        this way while sequences of different lengths join and leave the batch.

        Sequence b lives in row rows[b] of `cache`, which holds its positions [0, positions[b]);
        tokens[b] sits at positions[b]: RoPE rotates it by that position, and a per-row mask
        lets it attend to its own row's positions [0, positions[b]] only.

        The math is forward's (B=1, T=1 with a cache), but the matmuls run on the whole batch,
        and BLAS picks its kernel (so its summation order) by batch size: a row's logits can
        differ from decoding that sequence alone in the last float bits. For bit-identical
        results regardless of the batch, decode each row alone with forward(cache=cache.rows(r, r + 1)),
        keep the shapes fixed (all rows of the cache, `key_length` = cache.max_len), or use
        `decode_rows` (fixed row count, attention per row: Engine's "padded" mode).
        """
        if self.cfg.score_labels is not None:
            raise ValueError("a scoring model (model.score_labels) has no lm head and cannot generate")
        B = len(tokens)
        if not B or len(rows) != B or len(positions) != B:
            raise ValueError(f"tokens, rows and positions must have the same non-zero length, got "
                             f"{len(tokens)}, {len(rows)}, {len(positions)}")
        if len(set(rows)) != B or not all(0 <= r < cache.batch_size for r in rows):
            raise ValueError(f"rows must be distinct rows of the cache's batch of {cache.batch_size}, got {rows}")
        if not all(0 <= p < min(cache.max_len, self.cfg.max_seq_len) for p in positions):
            raise ValueError(f"positions must be in [0, {min(cache.max_len, self.cfg.max_seq_len)}), got {positions}")
        device = self.tok_embeddings.weight.device
        idx = torch.tensor(tokens, device=device).view(B, 1)
        row_index = torch.tensor(rows, device=device)
        pos = torch.tensor(positions, device=device)
        length = max(positions) + 1 if key_length is None else key_length
        if not max(positions) < length <= cache.max_len:
            raise ValueError(f"key_length {key_length} must cover every position and fit the cache ({cache.max_len})")
        contiguous = rows[0] if list(rows) == list(range(rows[0], rows[0] + B)) else None
        view = _RowwiseUpdate(cache, row_index, pos, length, contiguous)

        cos = self.rope_cos[pos].view(B, 1, 1, -1)  # [B, 1, T=1, head_dim]: each row's own angle
        sin = self.rope_sin[pos].view(B, 1, 1, -1)
        keys = torch.arange(length, device=device)
        mask = keys[None, :] <= pos[:, None]  # [B, length]: the row's own positions only
        if self.cfg.sliding_window is not None:
            mask &= keys[None, :] > pos[:, None] - self.cfg.sliding_window
        mask = mask[:, None, None, :]  # [B, 1 (heads), 1 (query), length]
        x = self.tok_embeddings(idx)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, view, i, 0, mask)
        return self.output(self.norm(x))[:, -1]

    def decode_rows(self, tokens: list[int], caches: list[KVCache], positions: list[int],
                    pad_to: int, steps: RowSteps | None = None) -> torch.Tensor:
        """One new token for each of n sequences (as decode_step), batch-invariant by
        construction: -> next-token logits [n, vocab]. Sequence b's keys/values live in
        caches[b] (batch 1: its own cache, or `cache.rows(r, r + 1)` of a shared one), which
        holds its positions [0, positions[b]); tokens[b] sits at positions[b].

        Everything but attention (embedding, norms, projections, MLP, head) runs on exactly
        `pad_to` rows, the n sequences first, then padding rows that touch no cache. So the
        matmuls always have the same shape (BLAS picks its kernel, hence its summation
        order, by the row count: engine.py probes which row counts give bit-identical rows).
        Attention runs per sequence over exactly its own cached length, so it depends on
        nothing but that sequence. A sequence's logits then depend only on itself and
        `pad_to`, never on the other rows: Engine's "padded" mode decodes this way.
        `steps`: the position-wise pieces to run (default: `EAGER_ROW_STEPS`; Engine passes
        torch.compile'd copies with serve.compile).
        """
        if self.cfg.score_labels is not None:
            raise ValueError("a scoring model (model.score_labels) has no lm head and cannot generate")
        n = len(tokens)
        if not n or len(caches) != n or len(positions) != n or pad_to < n:
            raise ValueError(f"tokens, caches and positions must have the same non-zero length <= pad_to ({pad_to}), "
                             f"got {len(tokens)}, {len(caches)}, {len(positions)}")
        if len({c.k[0].data_ptr() for c in caches}) != n or any(c.batch_size != 1 for c in caches):
            raise ValueError("caches must be n distinct caches of batch size 1 (one per sequence)")
        if not all(0 <= p < min(c.max_len, self.cfg.max_seq_len) for c, p in zip(caches, positions)):
            raise ValueError(f"positions must lie inside each sequence's cache and max_seq_len, got {positions}")
        device = self.tok_embeddings.weight.device
        padding = pad_to - n
        idx = torch.tensor(list(tokens) + [0] * padding, device=device).view(pad_to, 1)
        pos = torch.tensor(list(positions) + [0] * padding, device=device)
        cos = self.rope_cos[pos].view(pad_to, 1, 1, -1)  # [P, 1, T=1, head_dim]: each row's own angle
        sin = self.rope_sin[pos].view(pad_to, 1, 1, -1)
        steps = steps or EAGER_ROW_STEPS
        x, q, k, v = steps.enter(self, idx, cos, sin)
        layers, window = self.layers, self.cfg.sliding_window
        for i, layer in enumerate(layers):
            attended = layer.attention.attend_rows(q, k, v, caches, i, positions, window)
            if i + 1 < len(layers):
                x, q, k, v = steps.between(layer, layers[i + 1], x, attended, cos, sin)
        return steps.leave(layers[-1], self, x, attended)[:n]

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count (tied weights counted once). exclude_embeddings drops the token
        embedding and, when untied, the lm_head: the "non-embedding" count of scaling laws."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.tok_embeddings.weight.numel()
            if not self.cfg.tie_embeddings and self.cfg.score_labels is None:
                n -= self.output.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward), PaLM appendix B / nanoGPT convention:

            6 * N + 12 * n_layer * d_model * seq_len

        N counts weights used in matmuls: everything except the embedding lookup (a gather, no
        FLOPs) but including the lm_head even when it is tied to the embedding. The second term
        is attention's QK^T and AV matmuls, 2 * 2 * d_model * seq_len per layer forward, x3 for
        backward. Not halved for causality, matching the convention.
        """
        n = self.num_params()
        if not self.cfg.tie_embeddings or self.cfg.score_labels is not None:
            n -= self.tok_embeddings.weight.numel()
        return 6 * n + 12 * self.cfg.n_layer * self.cfg.d_model * seq_len

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Two optimizer groups with parameter names kept under "names": weight decay for
        matmul weights (>= 2-D), none for norms, biases and the token embedding (which is
        also the lm_head when tied). Extra keys are allowed in torch param groups."""
        decay, no_decay = ([], []), ([], [])
        for name, p in self.named_parameters():  # named_parameters yields a tied weight once
            if not p.requires_grad:
                continue
            group = decay if p.dim() >= 2 and not name.startswith("tok_embeddings.") else no_decay
            group[0].append(name)
            group[1].append(p)
        return [
            {"params": decay[1], "names": decay[0], "weight_decay": weight_decay},
            {"params": no_decay[1], "names": no_decay[0], "weight_decay": 0.0},
        ]


def _same_weights(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """Tied weights given as one tensor, or as two equal ones (a copy); a missing one is left
    to load_state_dict's own message."""
    plain = (torch.Tensor, nn.Parameter)
    if a is None or b is None or a is b or type(a) not in plain or type(b) not in plain:
        return True  # quantized (tensor subclass) weights are checked where they are restored
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return a.device.type == "meta" or torch.equal(a, b)
