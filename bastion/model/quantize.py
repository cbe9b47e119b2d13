"""Weight-only int8 / int4 quantization of a Transformer (torchao), and the plain tensors a
quantized model is saved as.

What is quantized: the seven Linear weights of every transformer block (attention wq / wk /
wv / wo, feed-forward w1 / w2 / w3). The token embedding, the lm head, the norms and biases
stay in float32: the head is the tensor most sensitive to quantization (llama.cpp keeps it at
a higher precision in its 4-bit types too) and an embedding lookup reads one row per token,
so quantizing it saves memory but no compute (docs/quantization.md has the measurements).

    int8  torchao Int8WeightOnlyConfig: one float32 scale per output row, symmetric
          (`Int8Tensor`)
    int4  torchao IntxWeightOnlyConfig(int4, PerGroup(32)): one float32 scale per 32 inputs
          of a row, symmetric (`IntxUnpackedToInt8Tensor`: values in [-8, 7], held one per
          int8 byte in memory); a matrix whose rows are not a multiple of 32 long stays
          float32, as in GGUF q4_0

Checkpoints never pickle torchao's tensor subclasses: `flatten_quantized` turns each into
its plain inner tensors (NAME.qdata, NAME.scale, NAME.zero_point; int4 values packed two per
byte) plus a JSON description, and `restore_quantized` rebuilds the subclasses from them
after checking the description against what the model config implies, entry by entry: a
checkpoint is outside input, so nothing in it chooses a class, a shape or a dtype.

On CPU, `use_cpu_kernels` then swaps each quantized Linear for one that runs PyTorch's own
fused weight-only kernels (`aten._weight_int8pack_mm`, `aten._weight_int4pack_mm_for_cpu`:
the int8 / int4 values are read as they are, never dequantized to a float32 matrix). Those
kernels take bfloat16 activations and scales, so a CPU-quantized model's Linear inputs are
rounded to bfloat16 (a relative error of ~0.3%, a third of int8's own; the measurements are in
docs/quantization.md). torchao's own CPU linears dequantize the whole weight on every call:
correct, but slower than float32 itself (bench/quantize.py). On CUDA torchao's tensors are
used as they are.

torchao is imported only when quantization is used (its import is slow and logs warnings
about optional CUDA extensions on CPU-only machines).
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.nn as nn

from bastion.config.schema import ModelConfig
from bastion.errors import CheckpointError, ConfigError
from bastion.model.transformer import Transformer

MODES = ("int8", "int4")
INT4_GROUP_SIZE = 32
FORMAT_VERSION = 1
PARTS = ("qdata", "scale", "zero_point")
BLOCK_LINEARS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                 "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
TORCHAO_SPEC = "torchao>=0.18,<0.19"
# Loggers that print on torchao's import: its optional .so files missing on CPU builds, and a
# torch deprecation about an Enum it registers. Neither concerns Bastion's user.
_NOISY_LOGGERS = ("torchao", "torch.utils._pytree")


@contextmanager
def _quiet_import() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _torchao() -> Any:
    """torchao.quantization, imported quietly; ConfigError with the install line if missing."""
    try:
        with _quiet_import():
            import torchao.quantization as quantization
    except ImportError as exc:
        raise ConfigError(f"quantization needs torchao, which cannot be imported ({exc}); install it with "
                          f"pip install '{TORCHAO_SPEC}'") from None
    return quantization


def check_mode(mode: str, what: str = "--quantize") -> str:
    """`mode` if it is a known quantization mode, else a ConfigError naming the valid ones."""
    if mode not in MODES:
        raise ConfigError(f"{what}: unknown quantization {str(mode)[:40]!r}; choose one of {', '.join(MODES)}")
    return mode


def quantized_shapes(cfg: ModelConfig, mode: str) -> dict[str, tuple[int, int]]:
    """{weight name: (out, in)} of the weights `mode` quantizes in a model of this config."""
    with torch.device("meta"):
        model = Transformer(cfg)
    shapes = {}
    for i, block in enumerate(model.layers):
        for name in BLOCK_LINEARS:
            out_features, in_features = block.get_submodule(name).weight.shape
            if mode == "int4" and in_features % INT4_GROUP_SIZE:
                continue  # no whole group of 32 per row: stays float32
            shapes[f"layers.{i}.{name}.weight"] = (out_features, in_features)
    return shapes


def quantize_model(model: nn.Module, mode: str) -> list[str]:
    """Quantize `model`'s block Linear weights in place (weight-only, on the device they are
    on); returns the quantized weight names. The model must be float32 (as
    `load_for_inference` makes it)."""
    check_mode(mode)
    names = quantized_shapes(model.cfg, mode)
    if model.tok_embeddings.weight.dtype != torch.float32:
        raise ConfigError(f"quantization needs a float32 model, not {model.tok_embeddings.weight.dtype}")
    if already := quantization_mode(model):
        raise ConfigError(f"the model is already quantized ({already})")
    q = _torchao()
    if mode == "int8":
        config = q.Int8WeightOnlyConfig()
    else:
        from torchao.quantization.granularity import PerGroup

        config = q.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(INT4_GROUP_SIZE))
    modules = {name.removesuffix(".weight") for name in names}
    q.quantize_(model, config, filter_fn=lambda module, fqn: fqn in modules)
    for name in names:
        model.get_parameter(name).requires_grad_(False)
    return sorted(names)


def quantization_mode(model: nn.Module) -> str | None:
    """"int8" / "int4" if the model holds quantized weights (of one mode), else None."""
    found = {_mode_of(p) for p in model.parameters()} - {None}
    found |= {m.mode for m in model.modules() if isinstance(m, _CpuKernelLinear)}
    if len(found) > 1:
        raise ConfigError(f"the model mixes quantization modes {sorted(found)}")
    return found.pop() if found else None


def _mode_of(tensor: torch.Tensor) -> str | None:
    # By class name: torchao is not imported for a model that was never quantized.
    kind = type(tensor).__name__
    if kind == "Int8Tensor":
        return "int8"
    if kind == "IntxUnpackedToInt8Tensor" and tensor.target_dtype == torch.int4:
        return "int4"
    return None


def _entry(mode: str, shape: tuple[int, int]) -> dict[str, Any]:
    """The JSON description of one quantized weight: what torchao's __tensor_flatten__ says
    about it (its class and attributes), plus how its values are stored in the file."""
    if mode == "int8":
        return {"type": "Int8Tensor", "block_size": [1, shape[1]], "dtype": "float32", "storage": "int8"}
    return {"type": "IntxUnpackedToInt8Tensor", "target_dtype": "int4", "block_size": [1, INT4_GROUP_SIZE],
            "dtype": "float32", "storage": "int4_pairs"}


def _describe(tensor: torch.Tensor) -> dict[str, Any]:
    """A quantized weight's own attributes, in _entry's form (to check what torchao made)."""
    _, meta = tensor.__tensor_flatten__()
    entry = {"type": type(tensor).__name__, "block_size": [int(b) for b in meta["block_size"]],
             "dtype": str(meta["dtype"]).removeprefix("torch.")}
    if "target_dtype" in meta:
        entry["target_dtype"] = str(meta["target_dtype"]).removeprefix("torch.")
    if meta.get("act_quant_kwargs") is not None or meta.get("activation_quantization") is not None:
        entry["activation_quantization"] = "set"  # weight-only never sets it: _entry then differs
    return entry


def _pack_int4(qdata: torch.Tensor) -> torch.Tensor:
    """[n, k] int8 values in [-8, 7] -> [n, k / 2] uint8: column 2j in the low nibble, 2j + 1
    in the high one (two's complement nibbles)."""
    nibbles = qdata.to(torch.int16) & 0xF
    return (nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)).to(torch.uint8)


def _unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """_pack_int4's inverse: every byte gives two values in [-8, 7]."""
    wide = packed.to(torch.int16)
    low, high = wide & 0xF, wide >> 4
    values = torch.stack((low, high), dim=-1).reshape(packed.shape[0], -1)
    return ((values ^ 8) - 8).to(torch.int8)


def flatten_quantized(state: dict[str, torch.Tensor], cfg: ModelConfig) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A quantized model's state_dict as plain tensors (safetensors-ready) and the JSON
    description `restore_quantized` checks them against. Refuses a state that is not exactly
    what `quantize_model` makes (other classes, attributes or dtypes)."""
    modes = {_mode_of(t) for t in state.values()} - {None}
    if len(modes) != 1:
        raise ConfigError("flatten_quantized needs a model quantized by quantize_model (one mode)")
    mode = modes.pop()
    shapes = quantized_shapes(cfg, mode)
    plain: dict[str, torch.Tensor] = {}
    weights: dict[str, Any] = {}
    for name, tensor in state.items():
        if name not in shapes:
            if _mode_of(tensor) is not None:
                raise ConfigError(f"{name}: quantized, but {mode} leaves it in full precision")
            plain[name] = tensor
            continue
        entry = _entry(mode, shapes[name])
        described = {k: v for k, v in entry.items() if k != "storage"}
        if _describe(tensor) != described:
            raise ConfigError(f"{name}: torchao made {_describe(tensor)}, Bastion's {mode} format is {described}")
        parts = {part: getattr(tensor, part).detach() for part in PARTS}
        if mode == "int4":
            parts["qdata"] = _pack_int4(parts["qdata"])
        plain.update({f"{name}.{part}": value for part, value in parts.items()})
        weights[name] = entry
    missing = sorted(set(shapes) - set(weights))
    if missing:
        raise ConfigError(f"{missing[0]}: not quantized, but {mode} quantizes it")
    meta = {"format": FORMAT_VERSION, "mode": mode, "library": "torchao", "library_version": _torchao_version(),
            "weights": weights}
    return plain, meta


def _torchao_version() -> str:
    from importlib.metadata import version

    return version("torchao")


def _expected_parts(entry: dict[str, Any], shape: tuple[int, int]) -> dict[str, tuple[torch.dtype, tuple[int, int]]]:
    out_features, in_features = shape
    block = entry["block_size"][1]
    qdata = (torch.uint8, (out_features, in_features // 2)) if entry["storage"] == "int4_pairs" else \
        (torch.int8, (out_features, in_features))
    return {"qdata": qdata, "scale": (torch.float32, (out_features, in_features // block)),
            "zero_point": (torch.int8, (out_features, in_features // block))}


def check_metadata(meta: Any, cfg: ModelConfig, where: str) -> tuple[str, dict[str, tuple[int, int]]]:
    """Refuse a stored quantization description unless it is exactly what Bastion writes for
    this model config; returns (mode, {weight name: shape})."""
    keys = {"format", "mode", "library", "library_version", "weights"}
    if not isinstance(meta, dict) or set(meta) != keys:
        raise CheckpointError(f"{where}: 'quantization' must be an object with exactly the keys {sorted(keys)}")
    if meta["format"] != FORMAT_VERSION or meta["library"] != "torchao":
        raise CheckpointError(f"{where}: quantization format {str(meta['format'])[:20]} / library "
                              f"{str(meta['library'])[:40]!r} unknown (this Bastion reads format {FORMAT_VERSION}, torchao)")
    version = meta["library_version"]
    if not isinstance(version, str) or not 0 < len(version) <= 64:
        raise CheckpointError(f"{where}: quantization library_version must be a short string")
    mode = meta["mode"]
    if mode not in MODES:
        raise CheckpointError(f"{where}: unknown quantization mode {str(mode)[:40]!r} (known: {', '.join(MODES)})")
    shapes = quantized_shapes(cfg, mode)
    weights = meta["weights"]
    if not isinstance(weights, dict) or set(weights) != set(shapes):
        listed = len(weights) if isinstance(weights, dict) else "no"
        raise CheckpointError(f"{where}: quantization lists {listed} weights; {mode} quantizes {len(shapes)} in "
                              "this model (the block Linear weights)")
    for name, shape in shapes.items():
        if weights[name] != _entry(mode, shape):
            raise CheckpointError(f"{where}: quantization entry of {name} is {str(weights[name])[:200]}, "
                                  f"expected {_entry(mode, shape)}")
    return mode, shapes


def restore_quantized(tensors: dict[str, torch.Tensor], meta: Any, cfg: ModelConfig, where: str,
                      device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], str]:
    """What a quantized checkpoint's tensors stand for: (the other tensors, as stored; the
    quantized weights, each rebuilt from NAME.qdata / .scale / .zero_point into torchao's
    tensor subclass on `device`, nothing re-quantized; the mode). `meta` (the stored
    description) and the inner tensors' dtypes and shapes must be exactly what Bastion writes
    for this config; the other tensors are the caller's to check against the model."""
    mode, shapes = check_metadata(meta, cfg, where)
    q = _torchao()
    inner = {f"{name}.{part}" for name in shapes for part in PARTS}
    plain = {name: t for name, t in tensors.items() if name not in inner}  # the caller checks these
    quantized = {}
    for name, shape in shapes.items():
        if name in tensors:
            raise CheckpointError(f"{where}: {name} is stored in full precision, but the checkpoint says {mode}")
        entry = _entry(mode, shape)
        parts = {}
        for part, (dtype, part_shape) in _expected_parts(entry, shape).items():
            tensor = tensors.get(f"{name}.{part}")
            if tensor is None:
                raise CheckpointError(f"{where}: {name}.{part} is missing (quantized {mode} weight)")
            if tensor.dtype != dtype or tuple(tensor.shape) != part_shape:
                raise CheckpointError(f"{where}: {name}.{part} is {tensor.dtype}{list(tensor.shape)}, "
                                      f"{mode} needs {dtype}{list(part_shape)}")
            parts[part] = tensor.to(device)
        if parts["zero_point"].any():  # both modes are symmetric
            raise CheckpointError(f"{where}: {name}.zero_point is not all zeros (symmetric quantization)")
        quantized[name] = _rebuild(q, mode, parts, entry)
    return plain, quantized, mode


def _rebuild(q: Any, mode: str, parts: dict[str, torch.Tensor], entry: dict[str, Any]) -> torch.Tensor:
    if mode == "int8":
        return q.Int8Tensor(parts["qdata"], parts["scale"], list(entry["block_size"]), torch.float32,
                            zero_point=parts["zero_point"])
    return q.IntxUnpackedToInt8Tensor(_unpack_int4(parts["qdata"]), parts["scale"], parts["zero_point"], torch.int4,
                                      tuple(entry["block_size"]), torch.float32, None)


# ---- CPU kernels ---------------------------------------------------------------------------

class _CpuKernelLinear(nn.Module):
    """A quantized Linear run by one of PyTorch's fused CPU weight-only kernels. Inputs and
    scales go in as bfloat16 (what the kernels take), the output comes back in the input's
    dtype. Row-independent: a row's output does not depend on the other rows of the batch,
    so the engine's batch invariance holds (tests/infer/test_engine.py)."""

    mode = ""

    def __init__(self, out_features: int, in_features: int, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
        y = self._matmul(rows).to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def _matmul(self, rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.mode} (CPU kernel)"


class CpuInt8Linear(_CpuKernelLinear):
    """y = x @ (qdata * scale)^T by aten._weight_int8pack_mm: int8 [out, in] values, one
    scale per output row."""

    mode = "int8"

    def __init__(self, qdata: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__(qdata.shape[0], qdata.shape[1], bias)
        self.register_buffer("qdata", qdata.contiguous())
        self.register_buffer("scale", scale.reshape(-1).to(torch.bfloat16))

    def _matmul(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(rows, self.qdata, self.scale)


class CpuInt4Linear(_CpuKernelLinear):
    """y = x @ (qdata * scale)^T by aten._weight_int4pack_mm_for_cpu ("tinygemm"): values in
    [-8, 7] stored as unsigned nibbles q + 8 in the kernel's packed layout, one scale per 32
    inputs of a row; the kernel's w = (q_u - 8) * scale + zero, with zero 0 (symmetric)."""

    mode = "int4"

    def __init__(self, qdata: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__(qdata.shape[0], qdata.shape[1], bias)
        unsigned = (qdata.to(torch.int32) + 8).contiguous()
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(unsigned, 1))
        scale = scale.t().to(torch.bfloat16)  # [groups, out]
        self.register_buffer("scale_and_zero", torch.stack((scale, torch.zeros_like(scale)), dim=-1).contiguous())

    def _matmul(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.packed, INT4_GROUP_SIZE, self.scale_and_zero)


# Shapes the kernels are known to handle. Measured on torch 2.13 (AVX-512 CPU):
# _weight_int8pack_mm crashes (SIGSEGV) for 24 or 40 inputs and returns NaN for 8, and
# _convert_weight_to_int4pack_for_cpu refuses outputs not divisible by 16. Other shapes keep
# torchao's linear (correct, slower); every block matrix of a usual model qualifies.
KERNEL_IN_MULTIPLE, KERNEL_OUT_MULTIPLE = 32, 16


def use_cpu_kernels(model: nn.Module) -> int:
    """Swap every torchao-quantized Linear of a CPU model (quantize_model / restore_quantized)
    whose shape the kernels handle (KERNEL_*_MULTIPLE) for the CpuInt8Linear / CpuInt4Linear
    holding the same values; returns how many were swapped. The model is for inference from
    then on: its state_dict holds the kernels' layouts, not Bastion's checkpoint format (save
    the torchao form, before this call)."""
    swapped = 0
    for name, module in list(model.named_modules()):
        weight = getattr(module, "weight", None)
        if not isinstance(module, nn.Linear) or weight is None or _mode_of(weight) is None:
            continue
        if module.in_features % KERNEL_IN_MULTIPLE or module.out_features % KERNEL_OUT_MULTIPLE:
            continue
        if weight.device.type != "cpu":
            raise ConfigError(f"{name}: CPU kernels need a CPU model, this weight is on {weight.device}")
        mode = _mode_of(weight)
        if torch.any(weight.zero_point != 0):
            raise ConfigError(f"{name}: the CPU kernels take symmetric weights (zero_point 0)")
        kind = CpuInt8Linear if mode == "int8" else CpuInt4Linear
        replacement = kind(weight.qdata.detach(), weight.scale.detach(), module.bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, replacement)
        swapped += 1
    return swapped


__all__ = ["CpuInt4Linear", "CpuInt8Linear", "INT4_GROUP_SIZE", "MODES", "check_metadata", "check_mode", "flatten_quantized", "quantization_mode",
           "quantize_model", "quantized_shapes", "restore_quantized", "use_cpu_kernels"]
