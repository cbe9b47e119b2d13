"""QLoRA's frozen base: the weight of a LoRA-wrapped Linear held quantized while the adapters
train (`finetune.lora.base_quantization`). Tensors and their linear only; which weights are
quantized, and when, is bastion/model/lora.py (`quantize_lora_base`).

    nf4   torchao's NF4Tensor, as in QLoRA (Dettmers et al. 2023) and torchtune: 4-bit
          NormalFloat values, one absmax per block of 64 values, those absmaxes themselves
          int8-quantized in blocks of 256 ("double quantization"); about 0.52 bytes a weight.
          torchao's `linear_nf4` dequantizes in forward and again in backward, so autograd
          keeps the 4-bit weight, never a full-precision copy, between the two.
    int8  per output row, symmetric: scale = amax(|row|) / 127, values round(w / scale) in
          [-127, 127] as int8; 1 byte a weight plus one float32 scale a row. `int8_linear`
          is the same idea as linear_nf4, a small autograd Function that keeps int8 values
          and scales for backward. (torchao's Int8Tensor computes the input gradient too, but
          autograd then keeps a float32 copy of every weight from forward to backward, which
          is the memory QLoRA is there to save.)

Shapes. NF4 splits the flattened weight into blocks of 64 and the block absmaxes into blocks
of 256, so a weight is quantized only when its element count is a multiple of
64 x 256 = 16,384 (`nf4_fits`); any other weight stays in the training dtype, unquantized (a
1024 x 4096 projection fits, a 64 x 64 one does not). int8 has no shape limit.

Quantized tensors live in memory only: they never go into a checkpoint (a LoRA run saves its
adapters alone; the base is `finetune.init_from`, in full precision).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

MODES = ("none", "nf4", "int8")
NF4_BLOCK_SIZE = 64
NF4_SCALER_BLOCK_SIZE = 256
NF4_MULTIPLE = NF4_BLOCK_SIZE * NF4_SCALER_BLOCK_SIZE


def nf4_fits(shape: torch.Size | tuple[int, ...]) -> bool:
    """Whether a weight of this shape can be held in NF4 (its element count is a multiple of
    64 x 256); weights that cannot stay in the training dtype."""
    numel = 1
    for size in shape:
        numel *= int(size)
    return numel > 0 and numel % NF4_MULTIPLE == 0


def to_nf4(weight: torch.Tensor) -> torch.Tensor:
    """`weight` (2-D, floating point, nf4_fits) as torchao's NF4Tensor, on its device and in
    its dtype (what the dequantized values come back as)."""
    from bastion.model.quantize import _torchao  # torchao (and its import-time noise) only when used

    if weight.dim() != 2 or not weight.is_floating_point() or not nf4_fits(weight.shape):
        raise ValueError(f"NF4 needs a 2-D floating point weight with a multiple of {NF4_MULTIPLE} elements, "
                         f"not {weight.dtype} {tuple(weight.shape)}")
    return _torchao().to_nf4(weight.detach().contiguous(), NF4_BLOCK_SIZE, NF4_SCALER_BLOCK_SIZE)


def is_nf4(tensor: torch.Tensor) -> bool:
    # By class name: torchao is imported only once a run quantizes.
    return type(tensor).__name__ == "NF4Tensor"


@torch.no_grad()
def int8_rowwise(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values [out, in], float32 scales [out, 1]) of a 2-D weight, symmetric per row:
    weight ~= values * scales, each value within scale / 2 of the original."""
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"int8 needs a 2-D floating point weight, not {weight.dtype} {tuple(weight.shape)}")
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1, keepdim=True) / 127.0).clamp(min=torch.finfo(torch.float32).tiny)
    values = torch.round(w / scale).clamp(-127, 127).to(torch.int8)
    return values, scale


def int8_dequantize(values: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return values.to(dtype) * scale.to(dtype)


class _Int8Linear(torch.autograd.Function):
    """y = x @ (values * scale)^T, computed as (x @ values^T) * scale^T; keeps only the int8
    values and the scales for backward, where grad_x = (grad_y * scale^T) @ values. The
    weight is frozen: no gradient for it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(values, scale)
        ctx.x_dtype = x.dtype
        out = F.linear(x, values.to(x.dtype))  # (autocast, when on, runs this in its dtype)
        return out * scale.reshape(-1).to(out.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        values, scale = ctx.saved_tensors
        grad_x = (grad * scale.reshape(-1).to(grad.dtype)) @ values.to(grad.dtype)
        return grad_x.to(ctx.x_dtype), None, None


def int8_linear(x: torch.Tensor, values: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    out = _Int8Linear.apply(x, values, scale)
    return out if bias is None else out + bias.to(out.dtype)


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds in memory: an NF4Tensor's inner tensors (4-bit values, int8 block
    scales, per-256-block factors, the 16-value table), else numel x element size."""
    if is_nf4(tensor):
        names, _ = tensor.__tensor_flatten__()
        return sum(getattr(tensor, n).numel() * getattr(tensor, n).element_size() for n in names)
    return tensor.numel() * tensor.element_size()


__all__ = ["MODES", "NF4_BLOCK_SIZE", "NF4_MULTIPLE", "NF4_SCALER_BLOCK_SIZE", "int8_dequantize", "int8_linear",
           "int8_rowwise", "is_nf4", "nf4_fits", "tensor_bytes", "to_nf4"]
