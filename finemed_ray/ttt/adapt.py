"""Test-time training: adapt a model briefly to each question's retrieved neighbours, answer, discard the change.

The paper (FineMedLM-o1) deep-copies the model, takes one full-parameter Adam step on the nearest neighbour,
answers, and restores the copy: twice the memory, one question at a time. Here:

* **No model copy, base weights never written.** :class:`BatchedLoRA` adds LoRA deltas through forward hooks on
  the target ``nn.Linear`` modules; the base parameters stay frozen (``requires_grad=False`` for the duration)
  and are never handed to an optimizer. Extra memory is the adapters (``2 r (d_in + d_out)`` floats per target
  module and question) plus activations.
* **Many questions in one batch, one adapter each.** The adapters of B questions are stacked (``A: [B, r, in]``,
  ``B: [B, out, r]``); every training row carries the index of the question it belongs to, and the hook applies
  row ``i``'s own adapter. One forward/backward over all neighbours of all B questions trains the B adapters
  at once: the loss is the *sum over questions* of each question's mean token loss, so adapter ``q`` receives
  exactly the gradient it would get alone (no other row touches its slice), and Adam is element-wise, so the
  stacked optimizer equals B independent ones. ``tests/test_ttt.py`` checks batched == one-by-one.
  (peft's ``adapter_names`` mixed batches are inference-only; peft refuses them in training mode.)
* **Only the top layers adapt** (``top_layers``, default the top half). The layers below carry no adapter and
  are frozen, so their output is the same at every step: :func:`reuse_frozen_prefix` computes it once per batch
  (no autograd) and later steps start at the first adapted layer. Backward stops there too (transformers'
  input-require-grads hook, needed only by reentrant checkpointing, is removed). A step costs the adapted layers
  only, and the extra memory is their adapters, Adam state and checkpointed activations.
* **Generation and scoring with the adapters** use the same hooks with a per-row adapter index; ``-1`` rows
  (plain requests) get no delta, so plain and TTT rows can share a batch and plain rows stay bit-exact.
* **Export.** :meth:`BatchedLoRA.save_peft` writes one question's adapter as a standard peft LoRA directory
  (``adapter_config.json`` + ``adapter_model.safetensors``), which peft and vLLM's ``LoRARequest`` load.
* ``method="full"`` (the paper's full-parameter update) is offered for fidelity: it backs up only the
  parameters it trains and restores them exactly (bit-for-bit ``copy_``), one question at a time.

Initialisation is seeded per question (``seed``, question key), so an adapter does not depend on which other
questions share its batch.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from finemed_ray.data.tokenize import IGNORE_INDEX, tokenize_conversation, with_system_prompt
from finemed_ray.errors import ConfigError, DataError
from finemed_ray.ttt.config import RetrievalSelection

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class TTTConfig(RetrievalSelection):
    """How each question is adapted (``ttt`` section of the evaluation and serving configs). Which rows it trains
    on (``selection``, ``sift_lambda``, ``sift_candidates``): :class:`finemed_ray.ttt.config.RetrievalSelection`."""

    k: int = Field(3, ge=1, le=64, description="Neighbours retrieved per question (paper: 1).")
    steps: int = Field(4, ge=0, le=1000, description="Optimizer steps on the neighbours (paper: 1); 0 = no-op.")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate (paper: 1e-5 for full-parameter updates).")
    method: Literal["lora", "full"] = Field(
        "lora", description="lora: a fresh adapter per question (base untouched); full: the paper's update, restored."
    )
    r: int = Field(8, ge=1, description="LoRA rank.")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha (scale = alpha / r, as peft).")
    target_modules: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TARGETS), min_length=1, description="Linear module names to adapt."
    )
    top_layers: int | float | None = Field(
        0.5, gt=0, description="Decoder layers that get adapters, counted from the top: an integer N = the top N "
        "layers, a fraction in (0, 1) = that share of the model's layers (rounded up), null = all. The layers below "
        "run once per batch without autograd (their output is reused by every step), so a step costs only the "
        "adapted layers; on the TTT proof task the top half learns the facts as well as all layers "
        "(tests/test_evaluate_ttt.py).")
    max_length: int = Field(512, ge=8, description="Longest neighbour example in tokens (longer ones are cut).")
    system_prompt: str | None = Field(
        "You are a helpful professional doctor.", description="System turn added to neighbour examples (paper's)."
    )
    batch_questions: int = Field(8, ge=1, description="Questions adapted together in one batched pass.")
    gradient_checkpointing: bool = Field(
        True, description="Recompute layer activations in the backward pass: TTT's extra memory becomes a small "
        "fraction of the model's (measured in bench/ttt.py) for some extra compute."
    )
    seed: int = Field(0, description="Seed of the adapter initialisation (per question).")
    precision: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="Matmul precision of the adaptation steps (mixed precision: adapters, gradients, Adam "
        "state and the loss stay float32). bfloat16 runs the forward/backward matmuls in bfloat16 under autocast, "
        "without keeping bfloat16 copies of the frozen weights (they are cast per use, also in backward). auto = "
        "bfloat16 for a float32 model on a CUDA device with bf16, else the model's own precision. On CPU bfloat16 "
        "is opt-in: it halves GEMM time where the CPU has AVX512-BF16/AMX, but oneDNN then keeps kernels and "
        "buffers per matrix shape, and with the varying token counts of TTT the process grows by ~15-20 MiB per new "
        "shape (bench/ttt_shape_creep.py). Generation, and method=full (it trains the base weights), keep the "
        "model's precision.")

    @field_validator("top_layers")
    @classmethod
    def _whole_or_fraction(cls, v: int | float | None) -> int | float | None:
        if isinstance(v, float) and v >= 1:
            if not v.is_integer():
                raise ValueError(f"{v}: a whole number of layers, or a fraction below 1")
            return int(v)
        return v


# ------------------------------------------------------------------------------------------------ examples
@dataclass
class Example:
    """One training conversation for one question's adapter."""

    question: int  # index of the question (adapter slot) in the batch
    input_ids: list[int]
    labels: list[int]


def neighbour_messages(neighbour: dict[str, Any]) -> list[dict[str, str]]:
    """A retrieved pool row -> the conversation TTT trains on.

    Accepts ``{"prompt": [messages], "completion": str}`` (the index's layout), ``{"messages": [...]}`` (SFT rows)
    or DPO rows ``{"prompt": [...], "chosen": [assistant messages]}`` (the paper's pool: prompt + chosen)."""
    if isinstance(neighbour.get("messages"), list) and neighbour["messages"]:
        return [dict(m) for m in neighbour["messages"]]
    prompt = neighbour.get("prompt")
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    completion = neighbour.get("completion")
    if completion is None and isinstance(neighbour.get("chosen"), list):
        completion = "\n".join(m["content"] for m in neighbour["chosen"] if m.get("role") == "assistant")
    if isinstance(completion, list):
        completion = "\n".join(m["content"] for m in completion if m.get("role") == "assistant")
    if not isinstance(prompt, list) or not prompt or not isinstance(completion, str) or not completion.strip():
        raise DataError(f"TTT neighbour {neighbour.get('id', '?')!r}: needs prompt + completion, messages, or "
                        f"prompt + chosen; got keys {sorted(neighbour)}")
    return [dict(m) for m in prompt] + [{"role": "assistant", "content": completion}]


def build_examples(tokenizer: Any, neighbours: Sequence[Sequence[dict]], cfg: TTTConfig) -> list[Example]:
    """``neighbours[q]`` = the rows retrieved for question q -> tokenised examples (assistant-only labels)."""
    out = []
    for q, rows in enumerate(neighbours):
        for row in rows:
            messages = with_system_prompt(neighbour_messages(row), cfg.system_prompt)
            enc = tokenize_conversation(tokenizer, messages, cfg.max_length)
            if all(l == IGNORE_INDEX for l in enc["labels"]):
                continue  # the answer was cut off entirely: nothing to learn from this row
            out.append(Example(q, enc["input_ids"], enc["labels"]))
    return out


# ------------------------------------------------------------------------------------------------ layers
_LAYER_RE = re.compile(r"\.layers\.(\d+)\.")


def _layer_index(module_name: str) -> int | None:
    m = _LAYER_RE.search(module_name)
    return int(m.group(1)) if m else None


def decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """The model's stack of decoder layers (``model.model.layers`` for Llama-style models), or None."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] == "layers" and len(module):
            return module
    return None


def adapted_layers(model: nn.Module, top_layers: int | float | None) -> list[int] | None:
    """Indices of the decoder layers TTT adapts (see ``TTTConfig.top_layers``); None = all layers."""
    if top_layers is None:
        return None
    layers = decoder_layers(model)
    if layers is None:
        raise ConfigError("ttt.top_layers: the model has no `layers` module list; set top_layers: null")
    n = len(layers)
    if isinstance(top_layers, float) and top_layers < 1:
        count = max(1, math.ceil(top_layers * n))
    elif float(top_layers).is_integer():
        count = int(top_layers)
    else:
        raise ConfigError(f"ttt.top_layers={top_layers}: use a whole number of layers or a fraction below 1")
    if count >= n:
        return None
    return list(range(n - count, n))


@contextmanager
def reuse_frozen_prefix(model: nn.Module, first_adapted: int) -> Iterator[None]:
    """While the same batch is run several times, compute the decoder layers below ``first_adapted`` once.

    Those layers carry no adapter and are frozen, so their output is the same at every step (and needs no
    autograd). The first forward records the output of layer ``first_adapted - 1``; later forwards skip the
    layers below (identity) and return the recorded tensor from that layer. Only used for layers whose forward
    returns a tensor of the input's shape (transformers' decoder layers); otherwise nothing is changed."""
    layers = decoder_layers(model)
    if layers is None or first_adapted <= 0:
        yield
        return
    prefix = list(layers)[:first_adapted]
    boundary = prefix[-1]
    state: dict[str, torch.Tensor] = {}

    def record(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        hidden = args[0] if args else kwargs.get("hidden_states")
        if isinstance(output, torch.Tensor) and isinstance(hidden, torch.Tensor) and output.shape == hidden.shape:
            state["out"] = output.detach()
            handle.remove()
            _skip_prefix()

    def _skip_prefix() -> None:
        out = state["out"]
        for layer in prefix[:-1]:
            layer.forward = lambda hidden_states, *a, **k: hidden_states  # instance attribute shadows the method
        boundary.forward = lambda hidden_states, *a, **k: out

    handle = boundary.register_forward_hook(record, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
        for layer in prefix:
            layer.__dict__.pop("forward", None)


# ------------------------------------------------------------------------------------------------ batched LoRA
def _is_identity(idx: torch.Tensor, n: int) -> bool:
    return idx.numel() == n and bool((idx.cpu() == torch.arange(n)).all())


def _init_seed(seed: int, key: str) -> int:
    return int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:12], 16)


@dataclass
class _Target:
    name: str
    module: nn.Linear
    A: torch.Tensor  # [n, r, in]
    B: torch.Tensor  # [n, out, r]


@dataclass
class BatchedLoRA:
    """``n`` LoRA adapters over the same frozen model, applied per batch row through forward hooks.

    Use ``with lora.attached(): ...`` around forwards; set :attr:`row_adapter` (a LongTensor ``[batch]`` of
    adapter indices, -1 = none) before each forward."""

    model: nn.Module
    keys: list[str]  # one per adapter (e.g. a hash of the question): seeds its initialisation
    r: int = 8
    alpha: float = 16.0
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    seed: int = 0
    layers: list[int] | None = None  # decoder layer indices to adapt; None = every layer
    targets: list[_Target] = field(init=False)
    row_adapter: torch.Tensor | None = field(init=False, default=None)
    _cache_for: Any = field(init=False, default=None, repr=False)  # the row_adapter the gathered cache is for
    _cache: dict = field(init=False, default_factory=dict, repr=False)
    _flags_for: Any = field(init=False, default=None, repr=False)  # the row_adapter _flags are for
    _flags: tuple[bool, bool] = field(init=False, default=(False, False), repr=False)

    def __post_init__(self) -> None:
        if not self.keys:
            raise ValueError("BatchedLoRA needs at least one adapter")
        param = next(self.model.parameters())
        wanted = set(self.target_modules)
        found = [(n, m) for n, m in self.model.named_modules()
                 if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in wanted]
        if not found:
            raise ConfigError(f"ttt.target_modules={sorted(wanted)}: no nn.Linear module of the model has these names")
        if self.layers is not None:
            keep = set(self.layers)
            found = [(n, m) for n, m in found if _layer_index(n) in keep]
            if not found:
                raise ConfigError(f"ttt: no target module in decoder layers {sorted(keep)}")
        self.scale = self.alpha / self.r
        n = len(self.keys)
        self.targets = []
        for name, module in found:
            A = torch.empty(n, self.r, module.in_features, dtype=torch.float32, device=param.device)
            for i, key in enumerate(self.keys):
                g = torch.Generator().manual_seed(_init_seed(self.seed, f"{key}:{name}"))
                # peft's default: kaiming_uniform(a=sqrt(5)) on A, zeros on B (the adapter starts as a no-op)
                bound = 1.0 / math.sqrt(module.in_features)
                A[i] = (torch.rand(self.r, module.in_features, generator=g) * 2 - 1).mul_(bound).to(A.device)
            B = torch.zeros(n, module.out_features, self.r, dtype=torch.float32, device=param.device)
            self.targets.append(_Target(name, module, A.requires_grad_(), B.requires_grad_()))

    def parameters(self) -> list[torch.Tensor]:
        return [t for tg in self.targets for t in (tg.A, tg.B)]

    def _hook(self, target: _Target):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            idx = self.row_adapter
            if idx is None:
                return output
            x = inputs[0]
            if not torch.is_grad_enabled():  # generation/scoring: the same rows for every step of this batch
                a_t, b_t, on = self._gathered(target, idx, x.shape[0], x.device)
                if a_t is None:
                    return output
                xa = torch.bmm(x.to(a_t.dtype), a_t)
                if on is None and output.dtype == b_t.dtype:
                    return torch.baddbmm(output, xa, b_t)  # one fused multiply-add, one [rows, tokens, out] buffer
                delta = torch.bmm(xa, b_t)
                return output + (delta if on is None else delta * on).to(output.dtype)
            self._cache_for = None  # training changes the adapters: nothing gathered earlier stays valid
            none, identity = self._row_flags(idx, target.A.shape[0])
            if none:
                return output
            if idx.numel() == 1 and x.shape[0] != 1:  # one adapter for every row of this batch
                idx = idx.reshape(1).expand(x.shape[0])
            if identity and x.shape[0] == target.A.shape[0]:
                # row i trains adapter i (the usual batched case): no gathered copy of A/B, and no scatter of
                # their gradients back (less memory and time per step)
                a, b, on = target.A, target.B, None
            else:
                sel = idx.clamp(min=0).to(x.device)
                a, b = target.A[sel], target.B[sel]  # [batch, r, in], [batch, out, r]
                on = None if bool((idx >= 0).all()) else (idx >= 0).to(a.dtype).to(x.device)[:, None, None]
            if torch.is_autocast_enabled(x.device.type):
                # mixed precision: cast the small operand (the adapter), not the activation -- autocast would save a
                # half-precision copy of x for every adapted module (q, k and v each their own); the rank-r
                # product costs nothing in x's own precision
                with torch.autocast(x.device.type, enabled=False):
                    xa = torch.bmm(x, a.transpose(1, 2).to(x.dtype))  # [batch, tokens, r]
            else:
                xa = torch.bmm(x.to(a.dtype), a.transpose(1, 2))  # [batch, tokens, r]
            if on is None and (output.dtype == b.dtype or torch.is_autocast_enabled(output.device.type)):
                # output + scale * xa @ B^T in one call: one [batch, tokens, out] buffer instead of three (product,
                # scaled product, sum), forward and backward; the base output is not saved by its own backward,
                # so autograd is unaffected
                return torch.baddbmm(output, xa, b.transpose(1, 2), alpha=self.scale)
            delta = torch.bmm(xa, b.transpose(1, 2)) * self.scale
            return output + (delta if on is None else delta * on).to(output.dtype)

        return hook

    def _row_flags(self, idx: torch.Tensor, n: int) -> tuple[bool, bool]:
        """(no row has an adapter, row i trains adapter i), worked out once per ``row_adapter`` tensor rather than in
        every hook call (each is a host sync on GPU)."""
        if self._flags_for is not idx:
            self._flags_for = idx
            self._flags = (bool((idx < 0).all()), _is_identity(idx, n))
        return self._flags

    def _gathered(self, target: _Target, idx: torch.Tensor, rows: int, device: torch.device):
        """Row ``i``'s adapter as transposed, pre-scaled matrices (``[rows, in, r]``, ``[rows, r, out]``) and the
        row mask (None when every row has an adapter), built once per ``row_adapter`` and target: a decode step
        then costs two small batched matmuls per target instead of a gather, two einsums and a mask."""
        if self._cache_for is not idx:
            self._cache_for, self._cache = idx, {}
        key = (target.name, rows)
        if key not in self._cache:
            if idx.numel() == 1 and rows != 1:
                idx = idx.reshape(1).expand(rows)
            if bool((idx < 0).all()):
                self._cache[key] = (None, None, None)
            else:
                sel = idx.clamp(min=0).to(device)
                a_t = target.A[sel].detach().transpose(1, 2).contiguous()
                b_t = (target.B[sel].detach() * self.scale).transpose(1, 2).contiguous()
                on = None if bool((idx >= 0).all()) else (idx >= 0).to(a_t.dtype).to(device)[:, None, None]
                self._cache[key] = (a_t, b_t, on)
        return self._cache[key]

    @contextmanager
    def attached(self) -> Iterator[BatchedLoRA]:
        handles = [t.module.register_forward_hook(self._hook(t)) for t in self.targets]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            self.row_adapter = None
            self._cache_for, self._cache, self._flags_for = None, {}, None

    def state_dict(self, i: int) -> dict[str, torch.Tensor]:
        """Adapter ``i`` in peft's key layout (``base_model.model.<module>.lora_A.weight``)."""
        out = {}
        for t in self.targets:
            out[f"base_model.model.{t.name}.lora_A.weight"] = t.A[i].detach().clone().contiguous()
            out[f"base_model.model.{t.name}.lora_B.weight"] = t.B[i].detach().clone().contiguous()
        return out

    def peft_config(self, base_model_name: str | None = None) -> dict[str, Any]:
        return {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": self.r, "lora_alpha": self.alpha,
            "lora_dropout": 0.0, "bias": "none",
            "target_modules": sorted({t.name.rsplit(".", 1)[-1] for t in self.targets}), "fan_in_fan_out": False,
            "use_rslora": False, "use_dora": False, "inference_mode": True, "init_lora_weights": True,
            "layers_to_transform": sorted(self.layers) if self.layers is not None else None,
            "layers_pattern": "layers" if self.layers is not None else None,
            "base_model_name_or_path": base_model_name or getattr(self.model.config, "_name_or_path", None),
            "modules_to_save": None,
        }

    def payload(self, i: int, adapter_id: str, base_model_name: str | None = None) -> dict[str, Any]:
        """Adapter ``i`` as a picklable dict (numpy tensors in peft's layout): what the TTT deployment hands to
        an engine through the Ray object store."""
        return {"id": adapter_id, "r": self.r, "alpha": self.alpha, "config": self.peft_config(base_model_name),
                "tensors": {k: v.numpy() for k, v in self.state_dict(i).items()}}

    @classmethod
    def from_tensors(cls, model: nn.Module, payloads: Sequence[dict[str, Any]]) -> BatchedLoRA:
        """A bank of given adapters (payloads from :meth:`payload`, same rank/alpha/targets) over ``model``."""
        first = payloads[0]
        for p in payloads[1:]:
            shape = (p["r"], p["alpha"], p["config"]["target_modules"], p["config"].get("layers_to_transform"))
            if shape != (first["r"], first["alpha"], first["config"]["target_modules"],
                         first["config"].get("layers_to_transform")):
                raise ConfigError("adapters in one batch must share rank, alpha, target modules and layers")
        bank = cls(model, [p["id"] for p in payloads], r=first["r"], alpha=first["alpha"],
                   target_modules=list(first["config"]["target_modules"]),
                   layers=first["config"].get("layers_to_transform"))
        with torch.no_grad():
            for t in bank.targets:
                for i, p in enumerate(payloads):
                    t.A[i].copy_(torch.as_tensor(p["tensors"][f"base_model.model.{t.name}.lora_A.weight"]))
                    t.B[i].copy_(torch.as_tensor(p["tensors"][f"base_model.model.{t.name}.lora_B.weight"]))
            for t in bank.targets:
                t.A.requires_grad_(False)
                t.B.requires_grad_(False)
        return bank

    def save_peft(self, i: int, path: str, base_model_name: str | None = None) -> str:
        """Write adapter ``i`` as a peft LoRA directory that ``PeftModel.from_pretrained`` and vLLM load."""
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "adapter_config.json"), "w") as f:
            json.dump(self.peft_config(base_model_name), f, indent=2)
        save_file(self.state_dict(i), os.path.join(path, "adapter_model.safetensors"))
        return path


# ------------------------------------------------------------------------------------------------ training
def _collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(e.input_ids) for e in examples)
    n = len(examples)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
        mask[i, : len(e.input_ids)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask,
            "question": torch.tensor([e.question for e in examples], dtype=torch.long)}


def _collate_packed(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """One row per question: its examples concatenated, position ids restarting at each (transformers then masks
    attention to each example's own tokens, as :mod:`finemed_ray.train.packing` does for SFT), the rows padded at
    the end (pads restart at position 0: a separate, label-free sequence). Pad tokens shrink from the spread of
    every example's length to the spread of the questions' totals."""
    rows: dict[int, list[Example]] = {}
    for e in examples:
        rows.setdefault(e.question, []).append(e)
    width = max(sum(len(e.input_ids) for e in r) for r in rows.values())
    n = len(rows)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    pos = torch.zeros((n, width), dtype=torch.long)
    for i, row in enumerate(rows.values()):
        at = 0
        for e in row:
            m = len(e.input_ids)
            ids[i, at: at + m] = torch.tensor(e.input_ids)
            labels[i, at: at + m] = torch.tensor(e.labels)
            labels[i, at] = IGNORE_INDEX  # never predict an example's first token from the previous example
            pos[i, at: at + m] = torch.arange(m)
            at += m
        pos[i, at:] = torch.arange(width - at)
    return {"input_ids": ids, "labels": labels, "position_ids": pos,
            "question": torch.tensor(list(rows), dtype=torch.long)}


def collate_examples(model: nn.Module, examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    from finemed_ray.models.loading import packed_sequences_isolated

    return _collate_packed(examples, pad_id) if packed_sequences_isolated(model) else _collate(examples, pad_id)


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    import inspect

    return "logits_to_keep" in inspect.signature(model.forward).parameters


def per_question_loss(model: nn.Module, batch: dict[str, torch.Tensor], n_questions: int) -> torch.Tensor:
    """Sum over questions of each question's mean next-token loss (so each adapter's gradient is its own)."""
    device = next(model.parameters()).device
    inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    target = batch["labels"][:, 1:].to(device)
    if _accepts_logits_to_keep(model):
        # the LM head only where some row has a label (position j predicts token j+1): with assistant-only labels
        # that is a fraction of the row, and [tokens, vocab] logits are the largest activation of a step on real
        # vocabularies (150k)
        keep = (target != IGNORE_INDEX).any(0).nonzero().squeeze(1)
        logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits.float()
        target = target[:, keep]
    else:
        logits = model(**inputs, use_cache=False).logits[:, :-1].float()
    tok_loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                           ignore_index=IGNORE_INDEX, reduction="none").view(target.shape)
    valid = (target != IGNORE_INDEX).float()
    q = batch["question"].to(device)
    loss_sum = torch.zeros(n_questions, device=device).index_add(0, q, (tok_loss * valid).sum(1))
    count = torch.zeros(n_questions, device=device).index_add(0, q, valid.sum(1))
    return (loss_sum / count.clamp(min=1)).sum()


@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Base parameters frozen (no grads kept) for the duration, then their flags restored."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextmanager
def checkpointing(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Gradient checkpointing for the duration (transformers only checkpoints in train mode; Llama-style models
    have no dropout at their default settings, so train mode computes the same numbers), then back as it was."""
    supported = enabled and getattr(model, "supports_gradient_checkpointing", False)
    if not supported:
        yield
        return
    was_on, was_training = getattr(model, "is_gradient_checkpointing", False), model.training
    had_input_grads = bool(getattr(model, "_require_grads_hooks", None))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not had_input_grads and hasattr(model, "disable_input_require_grads"):
        # transformers also makes the embedding output require grad (for reentrant checkpointing); non-reentrant
        # does not need it, and with it every frozen layer below the adapters would be recomputed and
        # back-propagated through for nothing
        model.disable_input_require_grads()
    # The top layer's recompute would run right after its own forward (only the final norm, the LM head at the
    # labelled positions and the loss lie between), so it is not checkpointed: one layer's forward less per step,
    # and its activations are alive then anyway for its backward.
    layers = decoder_layers(model)
    top = layers[-1] if layers is not None and len(layers) > 1 else None
    if top is not None and getattr(top, "gradient_checkpointing", False):
        top.gradient_checkpointing = False
    else:
        top = None
    model.train()
    try:
        yield
    finally:
        if not was_on:
            model.gradient_checkpointing_disable()
        elif top is not None:
            top.gradient_checkpointing = True
        model.train(was_training)


def _adam_kwargs() -> dict[str, Any]:
    # fused Adam (CPU and CUDA in torch >= 2.4) updates in place, without foreach's temporary copy of every state
    # tensor: less peak memory per adaptation
    return {"fused": True}


def adaptation_dtype(model: nn.Module, precision: str) -> torch.dtype | None:
    """The autocast dtype of the adaptation steps for ``precision`` (see ``TTTConfig.precision``); None = none."""
    param = next(model.parameters())
    if precision == "float32" or param.dtype != torch.float32:
        return None  # float32 asked for, or the model already computes in half precision
    if precision == "bfloat16":
        return torch.bfloat16
    # auto: CUDA only. On CPU, oneDNN's per-shape caches grow the process with every new token count (see the
    # precision field), which a long-running server or evaluation cannot afford by default.
    if param.device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


class _FrozenLinearFunction(torch.autograd.Function):
    """``x @ W^T + b`` with a frozen ``W`` in ``dtype``; backward casts ``W`` again instead of keeping the cast.

    Under plain autocast, every linear whose input needs a gradient saves its *cast* weight for backward: an extra
    copy of the adapted layers' weights (and the LM head's) in bfloat16 for the whole step. Here the only saved
    weight is the original float32 parameter, and a cast lives for one matmul."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        ctx.save_for_backward(weight)
        ctx.dtype = dtype
        return nn.functional.linear(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        grad_x = grad.to(ctx.dtype) @ weight.to(ctx.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None


@contextmanager
def low_precision_matmuls(model: nn.Module, dtype: torch.dtype | None) -> Iterator[None]:
    """Autocast to ``dtype`` for the duration, frozen ``nn.Linear`` layers through :class:`_FrozenLinearFunction`."""
    if dtype is None:
        yield
        return
    device = next(model.parameters()).device.type
    patched = []
    for module in model.modules():
        if isinstance(module, nn.Linear) and not module.weight.requires_grad and "forward" not in module.__dict__:
            module.forward = (lambda x, m=module: _FrozenLinearFunction.apply(x, m.weight, m.bias, dtype))
            patched.append(module)
    try:
        with torch.autocast(device_type=device, dtype=dtype):
            yield
    finally:
        for module in patched:
            module.__dict__.pop("forward", None)


@dataclass
class AdaptResult:
    lora: BatchedLoRA | None
    losses: list[float]  # summed per-question loss at each step (before the update)
    examples: int
    seconds: float


def release_free_heap() -> bool:
    """Return the C heap's free pages to the OS (glibc ``malloc_trim(0)``); False where that is not available.

    glibc keeps freed blocks below its (dynamic) mmap threshold in the heap. An adaptation frees tens of MiB of
    activations in blocks whose sizes the following generation does not reuse (the KV cache grows by other sizes),
    so without a trim they stay resident on top of everything generation allocates: +40 MiB of peak RSS for one
    question with 512-token answers on the 100M bench model (bench/README.md). A trim costs about a millisecond."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        _MALLOC_TRIM = False
        try:
            import ctypes
            import ctypes.util

            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _MALLOC_TRIM = libc.malloc_trim
            _MALLOC_TRIM.argtypes, _MALLOC_TRIM.restype = [ctypes.c_size_t], ctypes.c_int
        except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim this way
            pass
    if not _MALLOC_TRIM:
        return False
    _MALLOC_TRIM(0)
    return True


_MALLOC_TRIM: Any = None


def _train_adapters(model: nn.Module, tokenizer: Any, lora: BatchedLoRA, examples: list[Example], n_questions: int,
                    cfg: TTTConfig) -> list[float]:
    """``cfg.steps`` Adam steps on the adapters of ``lora``; the per-step losses. Every temporary of the steps
    (batch, optimizer state, activations) is freed when it returns."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    batch = collate_examples(model, examples, int(pad))
    opt = torch.optim.Adam(lora.parameters(), lr=cfg.lr, **_adam_kwargs())
    losses: list[float] = []
    was_training = model.training
    model.eval()
    first = min(_layer_index(t.name) or 0 for t in lora.targets)
    try:
        with frozen(model), lora.attached(), checkpointing(model, cfg.gradient_checkpointing), \
                reuse_frozen_prefix(model, first), \
                low_precision_matmuls(model, adaptation_dtype(model, cfg.precision)):
            for _ in range(cfg.steps):
                lora.row_adapter = batch["question"]
                loss = per_question_loss(model, batch, n_questions)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
    finally:
        model.train(was_training)
    for p in lora.parameters():
        p.grad = None
    return losses


def adapt_lora(model: nn.Module, tokenizer: Any, keys: Sequence[str], neighbours: Sequence[Sequence[dict]],
               cfg: TTTConfig) -> AdaptResult:
    """Train one fresh adapter per question (``keys[q]``, ``neighbours[q]``) in batched passes over all of them.

    Questions with no usable neighbour keep a zero adapter (they answer as the base model). The model must be in
    eval mode for dropout-free, deterministic steps; it is left as it was."""
    import time

    if len(keys) != len(neighbours):
        raise ValueError(f"{len(keys)} keys for {len(neighbours)} neighbour lists")
    t0 = time.time()
    layers = adapted_layers(model, cfg.top_layers)
    lora = BatchedLoRA(model, list(keys), r=cfg.r, alpha=cfg.alpha, target_modules=cfg.target_modules, seed=cfg.seed,
                       layers=layers)
    examples = build_examples(tokenizer, neighbours, cfg)
    losses: list[float] = []
    if examples and cfg.steps > 0:
        losses = _train_adapters(model, tokenizer, lora, examples, len(keys), cfg)
        release_free_heap()  # the steps' activations are freed now; hand their pages back before answering
    for t in lora.targets:
        t.A.requires_grad_(False)
        t.B.requires_grad_(False)
    return AdaptResult(lora, losses, len(examples), time.time() - t0)


@contextmanager
def full_update(model: nn.Module, tokenizer: Any, neighbours: Sequence[dict], cfg: TTTConfig) -> Iterator[AdaptResult]:
    """The paper's full-parameter TTT for ONE question: Adam steps on all weights, yield, then restore them exactly.

    Only the parameters are backed up (not a second model object); the backup is still one copy of the weights,
    which is why LoRA is the default."""
    import time

    t0 = time.time()
    params = [p for p in model.parameters()]
    backup = [p.detach().clone() for p in params]
    flags = [p.requires_grad for p in params]
    examples = build_examples(tokenizer, [neighbours], cfg)
    losses: list[float] = []
    was_training = model.training
    try:
        if examples and cfg.steps > 0:
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
            batch = collate_examples(model, examples, int(pad))
            for p in params:
                p.requires_grad_(True)
            opt = torch.optim.Adam(params, lr=cfg.lr)
            model.eval()
            for _ in range(cfg.steps):
                loss = per_question_loss(model, batch, 1)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
            del opt, batch, loss
            for p in params:
                p.grad = None
            release_free_heap()  # Adam's state and the activations: back to the OS before answering
        model.train(was_training)
        yield AdaptResult(None, losses, len(examples), time.time() - t0)
    finally:
        with torch.no_grad():
            for p, b, flag in zip(params, backup, flags):
                p.copy_(b)
                p.requires_grad_(flag)
        model.train(was_training)


def weights_digest(model: nn.Module) -> str:
    """SHA-256 over every parameter and buffer (names, dtypes, bytes): 'bit-identical' made checkable."""
    h = hashlib.sha256()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
