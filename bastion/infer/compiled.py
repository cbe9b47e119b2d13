"""serve.compile: the padded mode's decode step with its position-wise pieces compiled.

What is compiled. `Transformer.decode_rows` alternates position-wise work on the tile's P
rows (embedding, norms, projections, RoPE, MLP, head: `model/transformer.py`'s
`rows_enter`, `rows_between`, `rows_leave`) with attention, which runs row by row over each
sequence's own cached length. Only the position-wise pieces are compiled (torch.compile,
Inductor): their tensors are [P, 1, d] whatever the sequences' lengths, so neither a new KV
length nor a request joining changes a graph. Attention stays eager: its key length changes
every step, and compiling it would trace a new graph (or a dynamic one with other kernels)
per length.

Graphs. Each piece takes the layer modules as arguments, so one graph serves every layer
(their parameters are the graph's inputs). Dynamo specialises a dimension of size 1, so each
piece compiles twice: P = 1, then (at P = 2) once for every P >= 2 (an automatic dynamic
dimension): 6 graphs in all, whatever the model's depth. All of them compile while the engine
starts, in the tile probe (`invariant_tile_rows` runs P = 1 .. max rows through the compiled
pieces): the probe then measures the compiled code's own row-count families, which can differ
from eager's (Inductor fuses the norms and RoPE), so padded mode stays batch-invariant.

The engine falls back to eager (logged) if a compile fails, e.g. no C++ compiler on CPU.
"""
from __future__ import annotations

from types import FunctionType

import torch

from bastion.model.transformer import EAGER_ROW_STEPS, RowSteps


def compiled_row_steps() -> RowSteps:
    """The decode step's position-wise pieces wrapped in torch.compile (compiled on first call),
    each a private copy of the function: Dynamo keeps its graphs, and its limit of 8 graphs,
    per code object, so engines of different models in one process (tests, a trainer's
    rollouts next to an evaluation) would otherwise share that limit and fall back to eager
    once it is reached. A copy's graphs go with its engine."""
    return RowSteps(*(torch.compile(_private_copy(step), dynamic=None, fullgraph=True) for step in EAGER_ROW_STEPS))


def _private_copy(function: FunctionType) -> FunctionType:
    """The same function on a new code object (code.replace() always makes one)."""
    copy = FunctionType(function.__code__.replace(), function.__globals__, function.__name__, function.__defaults__,
                        function.__closure__)
    copy.__kwdefaults__, copy.__qualname__ = function.__kwdefaults__, function.__qualname__
    return copy


__all__ = ["compiled_row_steps"]
