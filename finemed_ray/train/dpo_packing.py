"""Padding-free (packed) DPO on TRL 1.16: chosen and rejected sequences of a micro-batch run flat, without pads.

TRL 1.16's ``DPOConfig(padding_free=True)`` is a no-op (it warns "temporarily unavailable after a refactor" and
pads), so this module builds the packed path itself, in two parts that leave TRL's loss code untouched:

* :class:`DPOPackingCollator` is TRL's own ``DataCollatorForPreference`` (same truncation, same padded
  ``input_ids`` / ``attention_mask`` / ``completion_mask``, chosen rows first then rejected) plus a packed layout of
  the same sequences: ``packed_index`` (for each slot of the packed rows, the flat index of its token in the padded
  ``[2B, L]`` batch, -1 for a pad slot), ``packed_position_ids`` (restarting at 0 at each sequence), and
  ``packed_cu_seq_lens`` / ``packed_max_length`` for the flash-attention varlen kernels.
* :func:`install_packed_forward` wraps the model's forward (on top of TRL's fused LM head, which
  ``DPOTrainer.__init__`` installs). TRL's ``_compute_loss`` / ``compute_ref_log_probs`` hand every batch key they do
  not know to the model, so the policy *and* the reference forward receive the packed keys. With them, the wrapper
  gathers the tokens and labels into the packed rows, runs the model once with ``position_ids``, no
  ``attention_mask`` and ``use_cache=False``, and scatters every per-token output (``log_probs``, ``entropy``,
  ``mean_logits``, ``is_top1``, ``log_sum_sq_probs``, ``label_mask``) back to the padded ``[2B, L-1]`` layout TRL's
  fused head would have returned: zero where the label is -100 or on a pad. TRL's ``per_token_logps.sum(dim=1)``
  is then exactly the per-sequence (segment) sum, and every loss type, the ``sft`` (RPO) term, ``ld_alpha``, WPO
  weights, the reference log-probs and the logged metrics work unchanged. The scatter is differentiable, so the
  gradients are the packed forward's. Measured on the tiny model in float32 (tests/test_dpo_packing.py, eager and
  sdpa, length-varied pairs): per-sequence log-probs equal to the last bit (max diff 0), DPO / RPO / IPO losses
  within 4e-6, gradients within 6e-7; a 44-step 2-worker ZeRO-3 DPO job's loss curve within 4e-7 of the padded
  run's (tests/test_dpo.py).

:class:`DPOPackingMixin` puts both into a ``DPOTrainer`` subclass (``finemed_ray/train/stages/dpo.py``'s RayDPOTrainer,
``train.packing: true`` in a DPO config).

Why sequences cannot attend to each other (transformers 5.19 as installed; checked in its source and by the
tests):

* eager / sdpa / flex: with ``position_ids``, no ``attention_mask`` and no cache, ``masking_utils`` finds the packed
  sequences from the position ids (``find_packed_sequence_indices``: a new sequence wherever the position does not
  grow by 1) and ANDs a same-sequence mask into the causal mask, per row. Pad slots have position 0, so each is a
  one-token sequence no real token sees.
* flash_attention_2/3/4: the model derives ``cu_seqlens`` from position ids only for a batch of ONE row
  (``_is_packed_sequence`` checks ``batch_size == 1``); with several rows it would run plain causal flash over each
  whole row. So the wrapper always passes ``cu_seq_lens_q/k`` and ``max_length_q/k`` explicitly (the varlen path,
  rows flattened), whatever the number of rows.
* A KV cache disables packed-sequence detection (``past_key_values is not None``): the sequences then silently
  attend to each other. The wrapper forces ``use_cache=False`` (TRL does too); tests/test_dpo_packing.py keeps a
  negative control showing the leak with the cache on.
* An attention implementation outside transformers' mask registry (a custom or hub kernel) gets no mask at all:
  refused with :class:`ConfigError` (:func:`finemed_ray.train.packing.check_packing_attention`).

Cost. Per token slot the packed forward costs about what the padded one does (the gather/scatter adds little: one
hidden-512 forward+backward, min of 8, 2.02 CPU s through the wrapper vs 1.94 s calling the backbone on the same
packed rows directly), so the gain follows the token slots saved. eager and sdpa compute the whole ``[W, W]`` score
block of a packed row (the mask only zeroes the cross-sequence part), so one row of all 2B sequences costs
``(sum of lengths)^2`` in attention. ``train.pack_length`` therefore works as for SFT
(``finemed_ray/train/packing.py``): ``auto`` = one row on flash kernels (their varlen path skips the cross-sequence
blocks), else first-fit bins of ``data.max_length`` tokens per row (a row's attention costs at most
``max_length^2``). Bins save less when sequences are longer than
half of ``max_length`` (two rarely share a row): on pairs of 64-256 tokens with ``max_length`` 256, bins cut the
token slots by 13% and one row by 30% (bench/dpo_packing.py; measured on 2 loaded CPU cores: 1.18x tokens/s on the
tiny model, 1.36x at hidden 512, below the 1.5x target). On the project's own DPO pairs (reasoning chosen ~250
tokens, direct rejected ~15-50) padding is ~48% and bins of 512 save ~41% of the slots (tests/test_dpo.py's packed
run logs it as ``packing/slots_saved``).

GPU: flash attention is not installable on the CPU machines, so the flash path (``cu_seq_lens`` passed explicitly)
is covered by a unit test with a stub model only, not measured; ``python -m bench.dpo_packing --device cuda
--dtype bfloat16 --attn flash_attention_2`` measures it where flash-attn is installed.

Not supported (refused): vision datasets, prompt-learning PEFT (virtual tokens), a custom ``data_collator``.
"""

from __future__ import annotations

import functools
import logging
import types
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from trl.trainer.dpo_trainer import DataCollatorForPreference

from finemed_ray.data.tokenize import IGNORE_INDEX
from finemed_ray.errors import ConfigError, DataError

log = logging.getLogger(__name__)

# Batch keys the collator adds and the packed forward consumes (TRL passes them through to the model).
PACKED_KEYS = ("packed_index", "packed_position_ids", "packed_cu_seq_lens", "packed_max_length")
# Per-token fields of TRL's FusedCausalLMOutput (trl/trainer/utils.py), shape (rows, width - 1).
PER_TOKEN_FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask")
_MARK = "_finemed_packed_dpo_forward"


# --------------------------------------------------------------------------------------------------- layout
def pack_layout(attention_mask: torch.Tensor, pack_length: int | None = None) -> dict[str, Any]:
    """The packed layout of a right-padded batch (``attention_mask`` ``[N, L]``, each row's ones a prefix).

    ``pack_length`` None: all N sequences in one row, in batch order, no pad. An int: first-fit-decreasing bins of
    at most that many tokens (a longer sequence gets a row of its own), one row per bin, rows right-padded to the
    longest bin; pad slots get index -1 and position 0 (each its own one-token sequence)."""
    from finemed_ray.train.packing import first_fit_decreasing

    mask = torch.as_tensor(attention_mask)
    if mask.ndim != 2:
        raise DataError(f"pack_layout: attention_mask must be [sequences, length], got shape {tuple(mask.shape)}")
    n, width_padded = mask.shape
    lengths = mask.sum(dim=1).tolist()
    if not torch.equal(mask.bool(), torch.arange(width_padded)[None, :] < torch.tensor(lengths)[:, None]):
        raise DataError("pack_layout: the batch is not right-padded (attention_mask ones must be a prefix per row)")
    real = [i for i in range(n) if lengths[i] > 0]
    if not real:
        raise DataError("pack_layout: every sequence of the batch is empty")
    if pack_length is None:
        bins = [real]
    else:
        if pack_length < 1:
            raise ConfigError(f"pack_length={pack_length}: must be None or >= 1")
        bins = [[real[j] for j in b] for b in first_fit_decreasing([lengths[i] for i in real], pack_length)]
    width = max(sum(lengths[i] for i in b) for b in bins)
    index = torch.full((len(bins), width), -1, dtype=torch.long)
    pos = torch.zeros((len(bins), width), dtype=torch.long)
    for r, b in enumerate(sorted(bins, key=min)):  # rows in order of their first sequence; stable and readable
        o = 0
        for i in sorted(b):
            k = lengths[i]
            index[r, o : o + k] = i * width_padded + torch.arange(k)
            pos[r, o : o + k] = torch.arange(k)
            o += k
    # Varlen kernels see the rows flattened; every position-0 slot starts a sequence (a pad is one of its own).
    starts = (pos.reshape(-1) == 0).nonzero().flatten()
    cu = torch.cat([starts, torch.tensor([pos.numel()])]).to(torch.int32)
    return {
        "packed_index": index,
        "packed_position_ids": pos,
        "packed_cu_seq_lens": cu,
        "packed_max_length": int(cu.diff().max()),
    }


@dataclass
class DPOPackingCollator(DataCollatorForPreference):
    """TRL's ``DataCollatorForPreference`` plus the packed layout (:func:`pack_layout`) of its padded batch.

    The padded keys stay (TRL's loss code reads ``input_ids``, ``completion_mask`` and ``attention_mask``); the
    model forward installed by :func:`install_packed_forward` runs the packed layout instead of the padded one."""

    pack_length: int | None = None  # None: one row per micro-batch; N: first-fit bins of <= N tokens per row

    def __post_init__(self) -> None:
        if self.pack_length is not None and (not isinstance(self.pack_length, int) or self.pack_length < 1):
            raise ConfigError(f"DPOPackingCollator: pack_length={self.pack_length!r}: must be None or an int >= 1")

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        if not examples:
            raise DataError("DPO packing collator got an empty batch")
        batch = super().torch_call(examples)
        batch.update(pack_layout(batch["attention_mask"], self.pack_length))
        batch["use_cache"] = False  # a plain model(**batch) elsewhere must not build a KV cache either
        return batch

    @classmethod
    def like(cls, collator: DataCollatorForPreference, pack_length: int | None) -> "DPOPackingCollator":
        """The packing twin of TRL's collator (same pad id, truncation and pad multiple)."""
        return cls(pad_token_id=collator.pad_token_id, max_length=collator.max_length,
                   truncation_mode=collator.truncation_mode, pad_to_multiple_of=collator.pad_to_multiple_of,
                   return_tensors=collator.return_tensors, pack_length=pack_length)


def padding_stats(batch: dict[str, Any]) -> dict[str, Any]:
    """Token accounting of one collated DPO batch: the padded layout (TRL's) and the packed one (ours)."""
    mask = torch.as_tensor(batch["attention_mask"])
    real = int(mask.sum())
    out = {"sequences": int(mask.shape[0]), "real_tokens": real, "padded_slots": int(mask.numel()),
           "padded_pad_fraction": 1 - real / mask.numel()}
    if "packed_index" in batch:
        index = torch.as_tensor(batch["packed_index"])
        out.update(packed_rows=int(index.shape[0]), packed_slots=int(index.numel()),
                   packed_pad_fraction=1 - real / index.numel())
    return out


# --------------------------------------------------------------------------------------------------- forward
def _unpack(value: torch.Tensor, src_mask: torch.Tensor, dest: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Packed per-token values ``[R, W-1]`` -> the padded layout ``shape``, zero where nothing maps (differentiable)."""
    out = value.new_zeros(shape[0] * shape[1])
    return out.index_copy(0, dest, value[src_mask]).view(shape)


def install_packed_forward(model: Any) -> None:
    """Wrap ``model.forward`` (a causal LM; for PEFT the base model) so that a call carrying the :data:`PACKED_KEYS`
    with ``fused_lm_head=True`` (TRL's fused head, installed first) runs packed and returns the padded-layout
    per-token outputs. Calls without the keys, or without the fused head, run the original forward on the padded
    batch. Idempotent."""
    if getattr(model.forward, _MARK, False):
        return
    inner = model.forward
    impl = lambda: getattr(model.config, "_attn_implementation", None) or "eager"  # noqa: E731 (read at call time)

    @functools.wraps(type(model).forward)
    def _packed_forward(self, *args, packed_index=None, packed_position_ids=None, packed_cu_seq_lens=None,
                        packed_max_length=None, **kwargs):
        if packed_index is None:
            return inner(*args, **kwargs)
        if not kwargs.get("fused_lm_head"):
            # The logits path (TRL's deprecated return_outputs / compute_metrics): the padded batch as it is.
            return inner(*args, **kwargs)
        if args:
            raise TypeError("packed DPO forward: pass the batch as keyword arguments (as TRL does)")
        for key in ("inputs_embeds", "past_key_values", "shift_labels", "position_ids"):
            if kwargs.get(key) is not None:
                raise ConfigError(f"packed DPO forward: {key} is not supported with train.packing")
        input_ids = kwargs.pop("input_ids")
        labels = kwargs.pop("labels")
        kwargs.pop("attention_mask", None)  # no mask: transformers derives the per-sequence mask from positions
        if input_ids is None or labels is None or input_ids.shape != labels.shape:
            raise ConfigError("packed DPO forward: needs input_ids and labels of the same [sequences, length] shape")
        n, width_padded = input_ids.shape
        index = packed_index.to(input_ids.device)
        pos = packed_position_ids.to(input_ids.device)
        real = index >= 0
        src = index.clamp(min=0)
        pad_id = getattr(self.config, "pad_token_id", None)
        ids = input_ids.reshape(-1)[src].masked_fill(~real, 0 if pad_id is None else int(pad_id))
        # Never score a sequence's first token from the end of the one before it (its padded twin has no such label).
        packed_labels = labels.reshape(-1)[src].masked_fill(~real | (pos == 0), IGNORE_INDEX)
        kwargs["use_cache"] = False  # with a cache transformers skips packed-sequence detection: sequences would mix
        if impl().startswith("flash"):
            cu = packed_cu_seq_lens.to(device=input_ids.device, dtype=torch.int32)
            kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=int(packed_max_length),
                          max_length_k=int(packed_max_length))
        out = inner(input_ids=ids, position_ids=pos, labels=packed_labels, **kwargs)

        # Packed slot (r, w), w >= 1, holds token c = pos of padded row b: its log-prob sits at out[r, w - 1] and
        # belongs at padded[b, c - 1]. Pads and sequence starts map nowhere.
        src_mask = real[:, 1:] & (pos[:, 1:] != 0)
        flat = index[:, 1:][src_mask]
        dest = flat // width_padded * (width_padded - 1) + flat % width_padded - 1
        shape = (n, width_padded - 1)
        updates = {}
        for name in PER_TOKEN_FIELDS:
            value = getattr(out, name, None)
            if isinstance(value, torch.Tensor):
                updates[name] = _unpack(value, src_mask, dest, shape)
        for name, value in updates.items():
            out[name] = value  # a transformers ModelOutput: sets the key and the attribute
        return out

    setattr(_packed_forward, _MARK, True)
    model.forward = types.MethodType(_packed_forward, model)


# ------------------------------------------------------------------------------------------------- the trainer
def unwrap(model: Any) -> Any:
    """The module under DeepSpeed / DDP engines (``.module``), for patching the right forward."""
    while hasattr(model, "module") and isinstance(getattr(model, "module"), torch.nn.Module):
        model = model.module
    return model


def check_packable(model: Any) -> str:
    """Raise :class:`ConfigError` unless packed DPO is exact for ``model``; return its attention implementation."""
    from finemed_ray.train.packing import check_packing_attention

    peft_config = getattr(model, "peft_config", None)
    if isinstance(peft_config, dict):
        for name, cfg in peft_config.items():
            if getattr(cfg, "is_prompt_learning", False):
                raise ConfigError(f"train.packing: PEFT prompt learning (adapter {name!r}) adds virtual tokens per "
                                  "sequence and cannot be packed; use LoRA or turn packing off")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return check_packing_attention(base)


class DPOPackingMixin:
    """Packed chosen/rejected forward for TRL's ``DPOTrainer``; mix in before it::

        class RayDPOTrainer(RayShardDataLoaderMixin, DPOPackingMixin, DPOTrainer): ...
        RayDPOTrainer(..., dpo_packing=True, dpo_pack_length=None | N)

    With ``dpo_packing=False`` (the default) the trainer is TRL's, untouched. With it on, after TRL's ``__init__``
    (which built its padded collator and installed its fused LM head) the collator is replaced by its packing twin
    and the policy's and reference's forwards are wrapped by :func:`install_packed_forward`."""

    def __init__(self, *args: Any, dpo_packing: bool = False, dpo_pack_length: int | None = None, **kwargs: Any):
        if dpo_packing and kwargs.get("data_collator") is not None:
            raise ConfigError("train.packing: DPO packing builds its own collator; pass no data_collator")
        super().__init__(*args, **kwargs)
        self.dpo_packing = bool(dpo_packing)
        if not self.dpo_packing:
            return
        if getattr(self, "_is_vision_dataset", False):
            raise ConfigError("train.packing: not supported for vision DPO datasets")
        if not isinstance(self.data_collator, DataCollatorForPreference):
            raise ConfigError(f"train.packing: expected TRL's DataCollatorForPreference to pack, found "
                              f"{type(self.data_collator).__name__}")
        impl = check_packable(self.model)
        policy = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        install_packed_forward(policy)
        if self.ref_model is not None:
            ref = unwrap(self.ref_model)
            check_packable(ref)
            install_packed_forward(ref)
        self.data_collator = DPOPackingCollator.like(self.data_collator, dpo_pack_length)
        log.info("DPO packing on: attention %s, %s", impl,
                 "one row per micro-batch" if dpo_pack_length is None else f"rows of <= {dpo_pack_length} tokens")

    def _compute_loss(self, model, inputs, return_outputs):
        if getattr(self, "dpo_packing", False) and "packed_index" in inputs:
            # Logged with TRL's metrics (this rank's batches): token slots the packed layout saved over the padded
            # one, and the pad share left in the packed rows (bins). Also shows a run really packed.
            mode = "train" if self.model.training else "eval"
            real = float(inputs["attention_mask"].sum())
            padded_slots, packed_slots = inputs["attention_mask"].numel(), inputs["packed_index"].numel()
            self._metrics[mode]["packing/slots_saved"].append(1.0 - packed_slots / padded_slots)
            self._metrics[mode]["packing/pad_fraction"].append(1.0 - real / packed_slots)
        return super()._compute_loss(model, inputs, return_outputs)


def examples_from_lengths(lengths: Sequence[tuple[int, int, int]], vocab: int, seed: int = 0,
                          reserved: int = 8) -> list[dict[str, list[int]]]:
    """Synthetic DPO rows ``{"prompt_ids", "chosen_ids", "rejected_ids"}`` of the given (prompt, chosen, rejected)
    token counts, ids drawn from ``[reserved, vocab)`` (special tokens left out): for tests and benchmarks."""
    gen = torch.Generator().manual_seed(seed)

    def draw(k: int) -> list[int]:
        return torch.randint(reserved, vocab, (k,), generator=gen).tolist()

    return [{"prompt_ids": draw(p), "chosen_ids": draw(c), "rejected_ids": draw(r)} for p, c, r in lengths]
