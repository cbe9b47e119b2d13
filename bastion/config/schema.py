"""Typed, bounded configuration for every Bastion stage.

Every section forbids unknown keys and bounds every number, so a typo or an absurd value
fails at load time with the field's path instead of hours into a run.
"""
from __future__ import annotations

import ipaddress
import math
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator


class Section(BaseModel):
    # hide_input_in_errors: pydantic would otherwise echo the offending value (possibly a
    # secret interpolated from the environment) inside its error text.
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True, validate_assignment=True)


def _finite_positive(value: float, name: str) -> float:
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0")
    return value


class RopeScalingConfig(Section):
    """RoPE frequency scaling as in Hugging Face configs ("linear", or Llama 3's "llama3")."""

    type: Literal["linear", "llama3"]
    factor: float = Field(gt=0.0, le=1024.0)
    low_freq_factor: float = Field(default=1.0, gt=0.0, le=1024.0)
    high_freq_factor: float = Field(default=4.0, gt=0.0, le=1024.0)
    original_max_position_embeddings: int = Field(default=8192, ge=8, le=1_048_576)


MODALITY_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
MAX_MODALITIES = 8
MAX_FEATURE_SIZE = 8192  # per frame: above COVAREP (74), FACET / OpenFace (35-713), wav2vec 2 / CLIP (768-1024)
MAX_FRAMES = 10_000  # per example: a 100 Hz stream of 100 s


class ModalityConfig(Section):
    """One named feature stream (bastion/data/features.py): per example a [frames, features]
    float tensor in `<split>.<name>.safetensors` beside the split's JSONL file."""

    features: int = Field(ge=1, le=MAX_FEATURE_SIZE, description="values per frame (e.g. 74 for COVAREP, 35 for "
                          "OpenFace action units, 768 for wav2vec 2 base); a tensor of another width is an error")
    max_frames: int = Field(ge=1, le=MAX_FRAMES, description="most frames one example may hold; a longer tensor is "
                            "an error (cut or pool frames when extracting features)")


def check_modality_names(value: dict[str, "ModalityConfig"]) -> dict[str, "ModalityConfig"]:
    for name in value:
        if not MODALITY_NAME.fullmatch(name):
            raise ValueError(f"modality name {name[:40]!r}: lower-case letters, digits and _, starting with a "
                             "letter, at most 32 characters (it becomes part of a file name)")
    return value


class ModelConfig(Section):
    """Decoder-only transformer shape. `vocab_size` is filled from the tokenizer when null."""

    vocab_size: int | None = Field(default=None, ge=16, le=1_048_576)
    n_layer: int = Field(default=4, ge=1, le=256)
    n_head: int = Field(default=4, ge=1, le=256)
    n_kv_head: int | None = Field(default=None, ge=1, le=256, description="None = n_head (MHA)")
    d_model: int = Field(default=256, ge=8, le=32_768)
    d_ff: int | None = Field(default=None, ge=8, le=262_144, description="None = SwiGLU 8/3 d rounded to 64")
    max_seq_len: int = Field(default=512, ge=8, le=1_048_576)
    rope_theta: float = Field(default=10_000.0, gt=0, le=1e9)
    norm_eps: float = Field(default=1e-5, gt=0, le=1e-1)
    tie_embeddings: bool = True
    qkv_bias: bool = False
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    init_std: float = Field(default=0.02, gt=0, le=1.0)
    rope_scaling: RopeScalingConfig | None = None
    sliding_window: int | None = Field(default=None, ge=1, le=1_048_576, description="Mistral-style local attention window")
    score_labels: int | None = Field(default=None, ge=1, le=4096, description="None = a language model (lm head); K = a "
                                     "sequence-scoring model: K values read at the last token (1: a reward model)")
    modalities: dict[str, ModalityConfig] = Field(default_factory=dict, max_length=MAX_MODALITIES, description=(
        "a fused scoring model's feature streams (bastion/model/fusion.py); set by train.objective classify / regress "
        "from finetune.sequence.modalities, empty for a text model"))

    _modality_names = field_validator("modalities")(check_modality_names)

    @model_validator(mode="after")
    def _shapes_fit(self) -> "ModelConfig":
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        if (self.d_model // self.n_head) % 2:
            raise ValueError(f"head dimension d_model/n_head ({self.d_model // self.n_head}) must be even for RoPE")
        kv = self.n_kv_head or self.n_head
        if self.n_head % kv:
            raise ValueError(f"n_head ({self.n_head}) must be divisible by n_kv_head ({kv})")
        if self.modalities and self.score_labels is None:
            raise ValueError("modalities need a scoring model (score_labels): fusion feeds the score head")
        return self

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def ffn_dim(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        return 64 * math.ceil(8 * self.d_model / 3 / 64)


class TokenizerConfig(Section):
    path: str | None = Field(default=None, description="existing tokenizer.json to load instead of training")
    vocab_size: int = Field(default=8192, ge=260, le=1_048_576)
    min_frequency: int = Field(default=2, ge=1, le=1_000_000)
    train_sample_bytes: int = Field(
        default=1 << 30, ge=1024, le=1 << 40,
        description="train the tokenizer on a seeded sample of at most this many bytes of the train split (held in memory)",
    )


class SanitizeConfig(Section):
    """PII and secret redaction, on by default; each category can be turned off."""

    enabled: bool = True
    emails: bool = True
    phones: bool = True
    ip_addresses: bool = True
    keep_private_ips: bool = Field(default=True, description="leave 10.x, 192.168.x, 127.x ... unredacted")
    credit_cards: bool = True
    ibans: bool = True
    national_ids: bool = True
    secrets: bool = Field(default=True, description="API keys, tokens, JWTs, PEM private keys, URL passwords, high-entropy assignments")
    names: bool = Field(default=False, description="person names via Microsoft Presidio (install the 'presidio' extra)")


class QualityConfig(Section):
    """Document filters; each drop is counted in the data report."""

    min_chars: int = Field(default=1, ge=0, le=10_000_000)
    max_chars: int = Field(default=10_000_000, ge=1, le=2**31)
    max_non_text_fraction: float = Field(default=0.3, ge=0.0, le=1.0, description="share of characters that are control, format, private-use, unassigned, U+FFFD, box-drawing or Braille")
    max_repeated_line_fraction: float = Field(default=0.5, ge=0.0, le=1.0, description="share of non-empty lines that repeat an earlier line")


class DedupConfig(Section):
    exact: bool = True
    near: bool = True
    threshold: float = Field(default=0.8, ge=0.5, le=1.0, description="Jaccard similarity above which documents are near-duplicates")
    num_perm: int = Field(default=128, ge=16, le=1024)
    shingle_words: int = Field(default=5, ge=1, le=32)


class DataConfig(Section):
    sources: list[str] = Field(default_factory=list, description="files, folders or glob patterns")
    output_dir: str = "data/prepared"
    text_field: str = Field(default="text", min_length=1, max_length=128)
    text_suffixes: list[str] = Field(
        default_factory=lambda: [".txt", ".md"], max_length=64,
        description="file suffixes read as plain text, one document per file (e.g. add .py for code)",
    )
    max_file_bytes: int = Field(default=256 * 2**20, ge=1, le=64 * 2**30)
    max_total_bytes: int = Field(default=64 * 2**30, ge=1, le=16 * 2**40)
    val_fraction: float = Field(default=0.05, ge=0.0, le=0.5)
    shard_tokens: int = Field(default=50_000_000, ge=1024, le=2**31)
    batch_documents: int = Field(default=512, ge=1, le=1_000_000)
    workers: int = Field(
        default=1, ge=1, le=256,
        description="processes for the per-document steps (hygiene, tokenization); the output is the same for any number",
    )
    engine: Literal["local", "datatrove"] = Field(
        default="local", description="where the per-document steps run: 'local' processes, or datatrove tasks (the 'datatrove' extra)",
    )
    tasks: int = Field(default=4, ge=1, le=1_000_000, description="datatrove engine only: tasks per stage (blocks of files, then of documents)")
    seed: int = Field(default=1234, ge=0, le=2**31 - 1)
    allowed_roots: list[str] = Field(
        default_factory=lambda: ["."], max_length=64,
        description="sources, tokenizer and output must resolve inside one of these folders (symlinks included)",
    )
    max_decompressed_bytes: int = Field(default=4 * 2**30, ge=1, le=1024 * 2**30, description="limit per archive member (.gz/.zst/.zip)")
    max_document_bytes: int = Field(default=64 * 2**20, ge=1, le=4 * 2**30, description="largest document (a text file or member, a JSONL line, a parquet cell); a longer one is refused while it is read")
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    sanitize: SanitizeConfig = Field(default_factory=SanitizeConfig)
    quality: QualityConfig = Field(default_factory=QualityConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)


    @field_validator("text_suffixes")
    @classmethod
    def _suffixes(cls, value: list[str]) -> list[str]:
        for suffix in value:  # checked as given, so a message quotes the value that was written
            if not re.fullmatch(r"\.[A-Za-z0-9_]{1,16}", suffix):
                raise ValueError(f"{suffix!r} is not a file suffix like '.txt'")
            if suffix.lower() in (".jsonl", ".parquet"):
                raise ValueError(f"{suffix!r} files hold records, not plain text; they are always read as records")
        return [s.lower() for s in value]


class DPConfig(Section):
    """Differential privacy (DP-SGD with Opacus): per-example clipping + Gaussian noise."""

    enabled: bool = False
    target_epsilon: float = Field(default=8.0, gt=0.0, le=1000.0)
    delta: float | None = Field(default=None, gt=0.0, lt=1.0, description="None = 1 / (number of training examples)")
    max_grad_norm: float = Field(default=1.0, gt=0.0, le=1e4, description="per-example gradient clipping bound")
    noise_multiplier: float | None = Field(default=None, gt=0.0, le=1000.0, description="None = derived from target_epsilon")
    poisson_sampling: bool = Field(default=True, description="what the privacy accountant assumes; keep on")


class TrainConfig(Section):
    objective: str = Field(default="clm", pattern=r"^[a-z][a-z0-9_]{0,31}$",
                           description="clm (pretraining), sft, dpo, simpo, orpo, kto, reward, grpo, classify, regress: "
                                       "the registered tasks, bastion/train/tasks/")
    data_dir: str = "data/prepared"
    out_dir: str = "runs/default"
    run_name: str = Field(default="run", min_length=1, max_length=128)
    seq_len: int = Field(default=256, ge=8, le=1_048_576)
    batch_size: int = Field(default=8, ge=1, le=1024)
    grad_accum: int = Field(default=1, ge=1, le=1024)
    epochs: float | None = Field(default=None, gt=0, le=100, description="used when max_steps is null")
    max_steps: int | None = Field(default=200, ge=1, le=100_000_000)
    lr: float = 3e-4
    min_lr_ratio: float = Field(default=0.1, ge=0.0, le=1.0)
    warmup_steps: int = Field(default=20, ge=0, le=10_000_000)
    weight_decay: float = Field(default=0.1, ge=0.0, le=10.0)
    beta1: float = Field(default=0.9, ge=0.0, lt=1.0)
    beta2: float = Field(default=0.95, ge=0.0, lt=1.0)
    adam_eps: float = Field(default=1e-8, gt=0.0, le=1.0)
    grad_clip: float | None = Field(default=1.0, gt=0.0, le=1e6)
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    compile: bool = Field(default=False, description="torch.compile the training step (the first step pays the compile)")
    compile_cache: str | None = Field(
        default=None, max_length=1024,
        description="with compile: reuse compiled code across runs from this local folder (kept 0700) or store URL "
                    "(s3://bucket/prefix, file:///abs/path; S3 endpoint from checkpoint.endpoint_url); entries are "
                    "HMAC-sealed with a local key and refused unless the seal verifies")
    compile_cache_key: str | None = Field(
        default=None, max_length=4096,
        description="path of the compile cache's HMAC key (0600, created on first use); null = "
                    "$XDG_CONFIG_HOME/bastion/compile-cache.key. The key itself never goes in a config")
    tf32: bool = Field(default=True, description="CUDA: float32 matmuls and convolutions on TensorFloat-32 tensor "
                                                 "cores (Ampere and newer); false for full float32 precision")
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    eval_every: int = Field(default=100, ge=1, le=100_000_000)
    eval_batches: int = Field(default=10, ge=1, le=100_000)
    log_every: int = Field(default=10, ge=1, le=100_000_000)
    seed: int = Field(default=1337, ge=0, le=2**31 - 1)
    threads: int | None = Field(default=None, ge=1, le=1024)
    dp: DPConfig = Field(default_factory=DPConfig)
    activation_checkpointing: bool = Field(default=False, description="recompute each block's activations in backward")
    loss_chunk_tokens: int | None = Field(default=None, ge=64, le=1_048_576,
                                          description="chunked cross-entropy: never materialise all logits at once")
    parallel: Literal["ddp", "fsdp"] = Field(
        default="ddp", description="under torchrun: ddp replicates the model, fsdp (FSDP2) shards it")

    @field_validator("compile_cache")
    @classmethod
    def _cache_location(cls, value: str | None) -> str | None:
        return _compile_cache_location(value)

    @field_validator("lr")
    @classmethod
    def _lr_finite(cls, value: float) -> float:
        _finite_positive(value, "lr")
        if value > 10:
            raise ValueError("lr must be <= 10")
        return value

    @model_validator(mode="after")
    def _has_length(self) -> "TrainConfig":
        if self.max_steps is None and self.epochs is None:
            raise ValueError("set train.max_steps or train.epochs")
        if self.compile_cache and not self.compile:
            raise ValueError("train.compile_cache caches torch.compile's work: set train.compile: true as well")
        if self.dp.enabled and (self.activation_checkpointing or self.loss_chunk_tokens):
            # Opacus computes per-example gradients from hooks on each layer's forward.
            raise ValueError("train.dp cannot be combined with activation_checkpointing or loss_chunk_tokens")
        return self


class LoraConfig(Section):
    enabled: bool = False
    rank: int = Field(default=8, ge=1, le=1024)
    alpha: float = Field(default=16.0, gt=0.0, le=1e4)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(
        default_factory=lambda: ["wq", "wk", "wv", "wo"], min_length=1, max_length=16,
        description="attention: wq wk wv wo; MLP: w1 (gate) w2 (down) w3 (up)",
    )
    base_quantization: Literal["none", "nf4", "int8"] = Field(
        default="none", description="QLoRA: hold the frozen base weights of the wrapped layers in nf4 (4-bit "
                                    "NormalFloat, torchao) or int8 (per-row) while the adapters train; none = plain LoRA")

    @field_validator("target_modules")
    @classmethod
    def _known_modules(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - {"wq", "wk", "wv", "wo", "w1", "w2", "w3"})
        if unknown:
            raise ValueError(f"unknown LoRA target module(s) {unknown}; choose from wq wk wv wo w1 w2 w3")
        return value


class PreferenceConfig(Section):
    beta: float = Field(default=0.1, gt=0.0, le=100.0, description="DPO/SimPO/KTO inverse temperature")
    simpo_gamma: float = Field(default=0.5, ge=0.0, le=100.0, description="SimPO target reward margin")
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=0.5, description="dpo, simpo: conservative variant")
    orpo_lambda: float = Field(default=0.1, gt=0.0, le=100.0, description="ORPO weight of the odds-ratio term (TRL's beta)")
    kto_desirable_weight: float = Field(default=1.0, gt=0.0, le=100.0, description="KTO lambda_D: weight of label-true examples")
    kto_undesirable_weight: float = Field(default=1.0, gt=0.0, le=100.0, description="KTO lambda_U: weight of label-false examples")
    reward_center_coef: float = Field(default=0.0, ge=0.0, le=100.0, description="reward: weight of mean((r_chosen + "
                                      "r_rejected)^2), which keeps the rewards centred on 0 (TRL's center_rewards_coefficient)")


class SequenceTaskConfig(Section):
    """Sequence-level objectives (train.objective classify | regress): one label per text,
    read by the score head at the text's last token (bastion/train/tasks/classify.py)."""

    labels: list[str] | None = Field(default=None, min_length=2, max_length=1024, description="classify: the "
                                     "class names, in score-head order; a record's label is one of them or its index")
    label_range: tuple[float, float] | None = Field(default=None, description="regress: [low, high]; a label outside "
                                                    "it is an error (e.g. [-3, 3] for CMU-MOSI sentiment)")
    regress_loss: Literal["mse", "l1", "huber"] = Field(default="mse", description="regress: mse (the default; MOSI "
                                                        "papers mostly report L1-trained models, try l1), l1 or huber")
    huber_delta: float = Field(default=1.0, gt=0.0, le=1e4, description="regress_loss huber: where it turns linear")
    modalities: dict[str, ModalityConfig] = Field(default_factory=dict, max_length=MAX_MODALITIES, description=(
        "named feature streams per example, e.g. {audio: {features: 74, max_frames: 500}} (docs/multimodal.md); "
        "each file validated by bastion.data.features; the model gains gated cross-modal fusion (model/fusion.py)"))
    modality_dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="chance that a training example loses "
                                    "each modality, so the model learns to answer without it")
    max_feature_file_bytes: int = Field(default=4 * 2**30, ge=1, le=64 * 2**30, description="largest feature file "
                                        "(one split, one modality) read")

    _modality_names = field_validator("modalities")(check_modality_names)

    @field_validator("labels")
    @classmethod
    def _label_names(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return value
        for name in value:
            if not name or len(name) > 128 or not name.isprintable():
                raise ValueError("each label is a printable name of 1 to 128 characters")
        if len(set(value)) != len(value):
            raise ValueError("label names must be distinct")
        return value

    @field_validator("label_range")
    @classmethod
    def _range(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and not (math.isfinite(value[0]) and math.isfinite(value[1]) and value[0] < value[1]):
            raise ValueError("label_range is [low, high] with finite low < high")
        return value


class FinetuneConfig(Section):
    """Supervised fine-tuning (objective sft) and preference alignment (dpo, simpo, orpo, kto)."""

    init_from: str | None = Field(default=None, max_length=4096, description="checkpoint whose weights start the run (e.g. from `bastion import hf`)")
    train_file: str | None = Field(default=None, max_length=4096, description="chat JSONL (sft), preference JSONL (dpo, simpo, orpo) or labelled completions (kto)")
    val_file: str | None = Field(default=None, max_length=4096)
    max_length: int = Field(default=1024, ge=8, le=1_048_576, description="tokens per example; longer examples are dropped and counted")
    max_examples: int = Field(default=1_000_000, ge=1, le=100_000_000)
    max_file_bytes: int = Field(default=1 * 2**30, ge=1, le=64 * 2**30)
    pack: bool = Field(default=True, description="sft: pack several examples per row (attention never crosses examples)")
    assistant_only_loss: bool = Field(default=True, description="sft: loss on assistant tokens only")
    lora: LoraConfig = Field(default_factory=LoraConfig)
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig)
    sequence: SequenceTaskConfig = Field(default_factory=SequenceTaskConfig)


class CheckpointConfig(Section):
    every_steps: int = Field(default=100, ge=1, le=100_000_000)
    keep_last: int = Field(default=3, ge=1, le=10_000, description="always keep the newest N")
    keep_best: int = Field(default=0, ge=0, le=10_000, description="also keep the N with the lowest validation loss")
    keep_every: int | None = Field(default=None, ge=1, le=100_000_000, description="also keep every checkpoint whose step is a multiple of this")
    save_optimizer: bool = True
    max_shard_bytes: int = Field(default=2 * 2**30, ge=2**20, le=64 * 2**30, description="model.safetensors is split into shards above this size")
    reject_nonfinite: bool = Field(default=False, description="refuse to load weights holding NaN or Inf")
    push_to: str | None = Field(default=None, max_length=1024, description="store URL to push each checkpoint to in the background: s3://bucket/prefix or file:///path")
    endpoint_url: str | None = Field(default=None, max_length=1024, description="S3-compatible endpoint (https; http only for loopback with allow_http)")
    allow_http: bool = Field(default=False, description="permit a plain-http endpoint_url, only on a loopback address")
    signing_key: str | None = Field(default=None, max_length=4096, description="EC private key (PEM, mode 0600) that signs every checkpoint this run saves")
    trusted_keys: list[str] = Field(default_factory=list, max_length=64, description="public keys (PEM) whose checkpoint signatures are trusted")
    require_signature: bool = Field(default=False, description="refuse any checkpoint not signed by one of trusted_keys (finetune.init_from, --resume, serve)")

    @field_validator("trusted_keys")
    @classmethod
    def _key_paths(cls, value: list[str]) -> list[str]:
        if any(not path or len(path) > 4096 for path in value):
            raise ValueError("each trusted key is a path of 1 to 4096 characters")
        return value


class GenerateConfig(Section):
    max_new_tokens: int = Field(default=64, ge=1, le=1_000_000)
    max_new_tokens_ceiling: int = Field(default=1024, ge=1, le=1_000_000)
    max_prompt_tokens: int | None = Field(default=None, ge=1, le=1_048_576, description="None = context size")
    temperature: float = Field(default=0.8, ge=0.0, le=100.0)
    top_k: int | None = Field(default=50, ge=1, le=1_048_576)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    max_stop_strings: int = Field(default=8, ge=0, le=64)

    @model_validator(mode="after")
    def _default_under_ceiling(self) -> "GenerateConfig":
        if self.max_new_tokens > self.max_new_tokens_ceiling:
            raise ValueError(
                f"max_new_tokens ({self.max_new_tokens}) exceeds max_new_tokens_ceiling ({self.max_new_tokens_ceiling})"
            )
        return self


class RewardSpec(BaseModel):
    """One entry of `rewards:`: a registered reward's name, its weight in the sum, and its own
    parameters beside them (checked against that reward's typed parameters when the rewards
    are built, and by `bastion config validate`). Names only: never code or import paths."""

    model_config = ConfigDict(extra="allow", hide_input_in_errors=True, frozen=True)
    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,63}$", description="a reward from `bastion eval rewards`")
    weight: float = Field(default=1.0, ge=-100.0, le=100.0)

    @model_validator(mode="after")
    def _few_params(self) -> "RewardSpec":
        if len(self.model_extra or {}) > 32:
            raise ValueError("a reward takes at most 32 parameters")
        return self

    def as_mapping(self) -> dict:
        return {"name": self.name, "weight": self.weight, **(self.model_extra or {})}


class GRPOConfig(Section):
    """Online RL with verifiable rewards (train.objective grpo): G completions per prompt,
    group-normalised advantages, a clipped policy-ratio loss. docs/alignment.md."""

    group_size: int = Field(default=8, ge=2, le=256, description="completions sampled per prompt (G)")
    loss: Literal["grpo", "dr_grpo", "dapo", "gspo"] = Field(default="grpo", description="loss variant (docs/alignment.md)")
    epsilon: float = Field(default=0.2, gt=0.0, le=10.0, description="clip range below 1 (and above, unless epsilon_high)")
    epsilon_high: float | None = Field(default=None, gt=0.0, le=10.0, description="clip-higher upper range (DAPO: 0.28)")
    kl_coef: float = Field(default=0.0, ge=0.0, le=100.0, description="weight of the KL to the starting policy (0: no reference; LoRA: the base with adapters off; full fine-tuning: a frozen copy)")
    num_iterations: int = Field(default=1, ge=1, le=64, description="optimizer steps on each batch of rollouts")
    scale_rewards: bool | None = Field(default=None, description="divide advantages by the group's std (default: off for dr_grpo)")
    dynamic_sampling: bool | None = Field(default=None, description="drop groups whose rewards are all equal (default: on for dapo)")
    max_new_tokens: int = Field(default=128, ge=1, le=1_000_000, description="per completion; at most generate.max_new_tokens_ceiling")
    temperature: float = Field(default=1.0, gt=0.0, le=100.0)
    top_k: int | None = Field(default=None, ge=1, le=1_048_576)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    rollout_mode: Literal["dynamic", "rowwise"] = Field(default="dynamic", description="engine mode for rollouts: dynamic = batched, fastest; rowwise = each completion alone, bit-identical whatever the batch (e.g. across rank counts)")
    eval_samples: int = Field(default=1, ge=1, le=256, description="completions per validation prompt: 1 = greedy; more = sampled, pass@k")
    pass_threshold: float = Field(default=1.0, ge=-1e6, le=1e6, description="a completion passes when its total reward reaches this")


class RateLimitConfig(Section):
    """Per API key token buckets; a request over either limit gets 429 with Retry-After."""

    requests_per_minute: int | None = Field(default=60, ge=1, le=10_000_000, description="None = unlimited")
    tokens_per_minute: int | None = Field(default=20_000, ge=1, le=10_000_000_000,
                                          description="prompt + max completion tokens; None = unlimited")


# A host name: dot-separated labels of letters, digits, inner hyphens and the underscores
# Docker and /etc/hosts names use; 253 characters at most ("0" is one: the name resolves to
# 0.0.0.0, all interfaces).
_HOST_NAME = re.compile(r"(?=.{1,253}$)(?!-)[A-Za-z0-9_-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9_-]{1,63}(?<!-))*")


def is_ip_address(text: str) -> bool:
    """Whether `text` is an IPv4 or IPv6 address (a zone such as %eth0 allowed)."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


# A served adapter's model name (bastion/adapters/serving.py): no spaces, slashes or quotes.
ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


def _compile_cache_location(value: str | None) -> str | None:
    """train.compile_cache / serve.compile_cache: a folder, or a store URL without credentials."""
    if value is None or "://" not in value:
        return value
    scheme, rest = value.split("://", 1)
    if scheme.lower() not in ("s3", "file"):
        raise ValueError(f"{scheme[:20]!r}:// is not a store; use a folder, s3://bucket/prefix or file:///abs/path")
    if "@" in rest.split("/", 1)[0]:
        raise ValueError("store URLs must not contain credentials; use the environment or an AWS profile")
    return value


class ServeConfig(Section):
    """`bastion serve`: an OpenAI-compatible HTTP API, locked down by default."""

    host: str = Field(default="127.0.0.1", max_length=255, description="any other address requires API keys")
    port: int = Field(default=8000, ge=0, le=65535)
    model_name: str | None = Field(default=None, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$",
                                   description="the id /v1/models reports (default: the run's train.run_name if set, else its folder's name)")
    api_keys_env: str = Field(default="BASTION_API_KEYS", pattern=r"^[A-Z_][A-Z0-9_]{0,63}$",
                              description="environment variable with comma-separated API keys")
    key_file: str | None = Field(default=None, max_length=4096,
                                 description="JSON file of hashed keys (`bastion serve keys add`)")
    metrics_key_env: str | None = Field(default=None, pattern=r"^[A-Z_][A-Z0-9_]{0,63}$",
                                        description="if set, /metrics needs this variable's key instead of an API key")
    require_keys_on_loopback: bool = Field(default=False, description="also require keys when bound to 127.0.0.1/::1")
    rate_limit: RateLimitConfig = Field(default_factory=RateLimitConfig)
    max_body_bytes: int = Field(default=1 * 2**20, ge=1024, le=64 * 2**20, description="larger requests get 413")
    max_concurrency: int = Field(default=16, ge=1, le=4096, description="sequences decoded together (batch size)")
    threads: int | None = Field(default=None, ge=1, le=1024, description="CPU threads of the decoding thread (default: "
                                "torch's); 1 is often fastest for small models on few cores")
    max_queue: int = Field(default=64, ge=0, le=100_000, description="waiting requests beyond the batch; more get 503")
    max_n: int = Field(default=1, ge=1, le=16, description="completions per request (OpenAI's n)")
    dtype: Literal["float32", "bfloat16"] = Field(
        default="float32", description="weights, KV cache and compute; bfloat16 halves memory and multiplies batched "
                                       "throughput on CPUs with bf16 units (docs/serving.md); not with --quantize")
    max_prompts: int = Field(default=16, ge=1, le=128, description="prompts per /v1/completions request (a batched "
                             "list of strings or of token-id lists), each with its n completions")
    max_logit_bias: int = Field(default=300, ge=0, le=1024, description="token ids one request's logit_bias may name "
                                "(OpenAI's limit is 300)")
    max_logprobs: int = Field(default=5, ge=0, le=20, description="top alternatives per token a request may ask for "
                              "(completions `logprobs`, chat `top_logprobs`)")
    max_schema_bytes: int = Field(default=32_768, ge=64, le=65_536, description="structured output: bytes of JSON "
                                  "schema one request may send (response_format's schema and every tool's parameters, "
                                  "together)")
    max_schema_depth: int = Field(default=32, ge=2, le=64, description="structured output: nesting depth of a JSON "
                                  "schema")
    max_tools: int = Field(default=64, ge=0, le=128, description="functions one chat request may list in `tools` "
                           "(0: tool calling off)")
    batch_mode: Literal["padded", "rowwise", "dynamic"] = Field(
        default="padded", description="padded: batched and batch-invariant; rowwise: bit-equal to `bastion generate`, "
                                      "no batching speed-up; dynamic: fastest, last-bit batch effects")
    prefill_chunk_tokens: int = Field(
        default=64, ge=8, le=4096, description="padded mode: prompts are prefilled in aligned chunks of this many "
                                               "tokens (also the prefix cache's block size)")
    prefill_step_tokens: int = Field(
        default=128, ge=8, le=65_536, description="padded mode: prompt tokens prefilled between two decode steps (at "
                                                  "least one chunk): lower keeps running streams smoother while long "
                                                  "prompts join, higher starts them sooner")
    prefix_cache_blocks: int = Field(
        default=256, ge=0, le=1_000_000, description="padded mode: prompt blocks (prefill_chunk_tokens tokens each) "
                                                     "whose keys/values are kept for reuse by later prompts with the "
                                                     "same prefix, LRU; 0 turns prefix caching off (memory: docs/serving.md)")
    prefix_cache_scope: Literal["per_key", "shared"] = Field(
        default="per_key", description="per_key: a request reuses only blocks of its own API key's prompts (a cache hit "
                                       "is visible in latency, so sharing would let one key probe another's prompts); "
                                       "shared: across keys")
    request_timeout_s: float = Field(default=120.0, gt=0.0, le=86_400.0)
    shutdown_grace_s: float = Field(default=30.0, ge=0.0, le=3600.0, description="SIGTERM: time to finish in-flight requests")
    output_filter: bool = Field(default=False, description="redact secrets / PII patterns from completions")
    log_prompts: bool = Field(default=False, description="write prompt and completion text to the access log")
    chat_page: bool = Field(default=True, description="serve the web chat page at / (static files, no data; its API "
                            "calls need a key like any client's); false: / is an unknown route")
    access_log: str | None = Field(default=None, max_length=4096, description="JSON-lines access log file (default: stderr)")
    ssl_certfile: str | None = Field(default=None, max_length=4096)
    ssl_keyfile: str | None = Field(default=None, max_length=4096)
    adapters: dict[str, str] = Field(
        default_factory=dict, max_length=64, description="multi-LoRA: {model name: adapter folder} served beside the "
        "base, chosen per request by `model` (docs/serving.md); folders confined to data.allowed_roots")
    max_adapters: int = Field(default=8, ge=1, le=64, description="most adapters one server may load")
    compile: bool = Field(default=False, description="padded mode: torch.compile the decode step's position-wise "
                          "pieces, all compiled before the server is ready (docs/serving.md: measure it; on small "
                          "models on CPU it may not pay)")
    compile_cache: str | None = Field(
        default=None, max_length=1024,
        description="with compile: reuse compiled code across starts from this local folder (kept 0700) or store URL "
                    "(s3://bucket/prefix, file:///abs/path; S3 endpoint from checkpoint.endpoint_url); entries are "
                    "HMAC-sealed with a local key and refused unless the seal verifies (docs/compile-cache.md)")
    compile_cache_key: str | None = Field(
        default=None, max_length=4096,
        description="path of the compile cache's HMAC key (0600, created on first use); null = "
                    "$XDG_CONFIG_HOME/bastion/compile-cache.key. The key itself never goes in a config")

    @field_validator("compile_cache")
    @classmethod
    def _cache_location(cls, value: str | None) -> str | None:
        return _compile_cache_location(value)

    @model_validator(mode="after")
    def _compile_fits(self) -> "ServeConfig":
        if self.compile_cache and not self.compile:
            raise ValueError("serve.compile_cache caches torch.compile's work: set serve.compile: true as well")
        if self.compile and self.batch_mode != "padded":
            raise ValueError(f"serve.compile compiles the padded batch mode's decode step; serve.batch_mode is "
                             f"{self.batch_mode} (its steps run eager): use padded or turn compile off")
        if self.compile and self.adapters:
            raise ValueError("serve.compile cannot serve serve.adapters: a multi-LoRA layer picks each row's adapter "
                             "from per-step state a compiled graph would be specialised on; turn compile off")
        return self

    @field_validator("adapters")
    @classmethod
    def _adapter_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name, path in value.items():
            if not re.fullmatch(ADAPTER_NAME_PATTERN, name):
                raise ValueError(f"adapter name {name[:80]!r} is not allowed: use 1-64 letters, digits, '.', '_' "
                                 "or '-', starting with a letter or digit")
            if not path or len(path) > 4096:
                raise ValueError(f"adapter {name!r}: the path must be 1-4096 characters")
        return value

    @field_validator("host")
    @classmethod
    def _address_or_name(cls, value: str) -> str:
        if is_ip_address(value) or _HOST_NAME.fullmatch(value.removesuffix(".")):
            return value
        hint = " (write an IPv6 address without brackets)" if value.startswith("[") else ""
        raise ValueError(f"{value!r} is not an IP address or a host name{hint}")

    @model_validator(mode="after")
    def _adapter_count(self) -> "ServeConfig":
        if len(self.adapters) > self.max_adapters:
            raise ValueError(f"serve.adapters names {len(self.adapters)} adapters, over serve.max_adapters "
                             f"({self.max_adapters})")
        if self.model_name is not None and self.model_name in self.adapters:
            raise ValueError(f"serve.adapters: {self.model_name!r} is the base model's name (serve.model_name)")
        return self

    @model_validator(mode="after")
    def _tls_pair(self) -> "ServeConfig":
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("set both serve.ssl_certfile and serve.ssl_keyfile, or neither")
        return self


class PublishConfig(Section):
    """`bastion publish`: what the model card declares and what the pre-publish gate allows."""

    license: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9.+-]{0,63}$",
                                description="the model's license as an SPDX id (apache-2.0, mit, cc-by-4.0, ...); "
                                            "a card without one is refused")
    max_exposure: float = Field(default=10.0, gt=0.0, le=64.0,
                                description="refuse to publish when a planted canary's exposure (bits) is above this")


class BastionConfig(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    grpo: GRPOConfig = Field(default_factory=GRPOConfig)
    publish: PublishConfig = Field(default_factory=PublishConfig)
    rewards: list[RewardSpec] = Field(default_factory=list, max_length=16, description="weighted rewards for grpo and eval generate")
    # The values that came from ${VAR} interpolation (config.load.EnvValue: path and
    # variables): never shown in errors, redacted when printed if the variable looks secret.
    _from_env: list = PrivateAttr(default_factory=list)

    @model_validator(mode="after")
    def _objective_has_inputs(self) -> "BastionConfig":
        objective, ft = self.train.objective, self.finetune
        # clm pretrains from the prepared token shards; every other objective fine-tunes.
        if objective == "clm":
            if ft.lora.enabled:
                raise ValueError("finetune.lora.enabled needs train.objective sft, dpo, simpo or another fine-tuning objective")
            return self
        if ft.init_from is None:
            raise ValueError(f"train.objective ({objective}) needs finetune.init_from: a checkpoint from "
                             "`bastion train` or `bastion import hf`")
        if ft.train_file is None:
            raise ValueError(f"train.objective ({objective}) needs finetune.train_file (its training JSONL)")
        if self.train.dp.enabled:
            raise ValueError("train.dp (DP-SGD) is available for train.objective clm only")
        if objective == "classify" and ft.sequence.labels is None:
            raise ValueError("train.objective classify needs finetune.sequence.labels: the class names, e.g. [neg, pos]")
        if objective != "classify" and ft.sequence.labels is not None:
            raise ValueError(f"finetune.sequence.labels is for train.objective classify, not {objective}")
        if objective != "regress" and ft.sequence.label_range is not None:
            raise ValueError(f"finetune.sequence.label_range is for train.objective regress, not {objective}")
        return self

    @model_validator(mode="after")
    def _qlora_fits(self) -> "BastionConfig":
        quant = self.finetune.lora.base_quantization
        if quant == "none":
            return self
        if not self.finetune.lora.enabled:
            raise ValueError(f"finetune.lora.base_quantization ({quant}) needs finetune.lora.enabled: true (QLoRA "
                             "trains LoRA adapters over a frozen quantized base); set it to none otherwise")
        if self.train.parallel == "fsdp":
            raise ValueError(f"finetune.lora.base_quantization ({quant}) cannot be combined with train.parallel fsdp "
                             "(FSDP2 would shard the quantized weights); use ddp, or base_quantization none")
        return self

    @model_validator(mode="after")
    def _seq_fits_model(self) -> "BastionConfig":
        # Fine-tuning takes its model from finetune.init_from; the loop checks it there.
        if self.train.objective == "clm" and self.train.seq_len > self.model.max_seq_len:
            raise ValueError(
                f"train.seq_len ({self.train.seq_len}) exceeds model.max_seq_len ({self.model.max_seq_len})"
            )
        return self
