"""Faster float32 ``nn.Linear`` for small-batch inference on CPU (token-by-token decoding), through oneDNN.

Why: PyTorch's CPU float32 ``F.linear`` calls MKL's sgemm, which handles few rows badly on the measured CPU (AMD
EPYC, MKL 2024.2): 8 rows x [1024 -> 2816] took 0.92 ms against 0.22 ms for one row, while oneDNN's matmul
(``torch.ops.mkldnn._linear_pointwise``, the op torch.compile/inductor emits for CPU linears) took 0.43 ms on the
same plain (unpacked) weight. Decoding is such a matmul per layer and token, so greedy generation of 64 tokens
went from 1.95 to 1.30 s (one prompt) and 3.63 to 2.64 s (8 prompts) on a 100M model, with identical text
(``python -m bench.cpu_linear``, bench/results/cpu_linear_cpu.json).

Two limits keep it safe:
- Only without autograd (no input, weight or bias that needs a gradient while grad mode is on); training, TTT's
  adaptation steps and anything else differentiable keep ``F.linear``.
- Only up to ``MAX_ROWS`` rows, padded to a power of two. oneDNN creates and keeps kernels per shape: 300
  distinct row counts grew a process by ~450 MiB, and neither ``LRU_CACHE_CAPACITY`` nor
  ``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` bounded it; with six row buckets per weight shape it stays flat. Prefill
  (many rows) gains little (~10%) and stays on MKL.
Nothing is copied: the weight is used in its own layout, so memory is unchanged.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

MAX_ROWS = 32  # above this, MKL's sgemm is within ~10-30% of oneDNN here, and row counts vary with prompts


def onednn_linear_available() -> bool:
    """Whether this torch build has oneDNN (mkldnn) and its pointwise-linear op."""
    try:
        return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


def row_bucket(rows: int) -> int:
    """The padded row count for ``rows`` (1 <= rows <= MAX_ROWS): the next power of two."""
    return 1 << (rows - 1).bit_length()


_DISABLED: list[str] = []  # the op's failure, once: it is private, and a later torch may change it


def _fast_path(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    if _DISABLED:
        return False
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)):
        return False
    return 0 < x.numel() // max(1, x.shape[-1]) <= MAX_ROWS and weight.layout == torch.strided


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def small_batch_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; through oneDNN when the conditions in the module docstring hold."""
    if not _fast_path(x, weight, bias):
        return F.linear(x, weight, bias)
    flat = x.reshape(-1, x.shape[-1])
    rows = flat.shape[0]
    padded = row_bucket(rows)
    if padded != rows:
        flat = torch.cat([flat, flat.new_zeros(padded - rows, flat.shape[1])])
    try:
        out = _onednn_linear(flat.contiguous(), weight.contiguous(), bias)
    except (RuntimeError, TypeError) as exc:  # a torch whose private op changed: warn once, use F.linear from now on
        import warnings

        _DISABLED.append(f"{type(exc).__name__}: {exc}")
        warnings.warn(f"oneDNN small-batch linear disabled, falling back to F.linear: {_DISABLED[0]}", stacklevel=2)
        return F.linear(x, weight, bias)
    return out[:rows].reshape(*x.shape[:-1], weight.shape[0])


class SmallBatchLinear(nn.Linear):
    """An ``nn.Linear`` whose forward is :func:`small_batch_linear`; same parameters, state dict and hooks."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return small_batch_linear(x, self.weight, self.bias)


def use_small_batch_linears(model: nn.Module) -> int:
    """Switch every plain ``nn.Linear`` of ``model`` to :class:`SmallBatchLinear` (in place; the class only, no
    copy) when this torch has oneDNN. Returns how many were switched; 0 when unavailable or already done.

    Subclasses of ``nn.Linear`` (quantised, peft's LoRA layers) are left alone. Call it on inference models;
    it is harmless on a model that is later trained (grad mode falls back to ``F.linear``)."""
    if not onednn_linear_available():
        return 0
    switched = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = SmallBatchLinear
            switched += 1
    return switched


def use_plain_linears(model: nn.Module) -> int:
    """Undo :func:`use_small_batch_linears`; returns how many were switched back."""
    switched = 0
    for module in model.modules():
        if type(module) is SmallBatchLinear:
            module.__class__ = nn.Linear
            switched += 1
    return switched
