"""Padding-free sequence packing for SFT: a batch of N tokenised rows becomes one row of their concatenation, or
(``train.pack_length``, the default ``auto`` on eager/sdpa) a few rows of about ``max_length`` tokens each.

The collator is TRL's own ``DataCollatorForLanguageModeling(padding_free=True)`` (TRL 1.16), which keeps the
``labels`` it is given (our assistant-only masks) and only sets -100 on the first token of each sequence, so no
sequence is trained to predict the next one's first token. It returns ``input_ids``/``labels``/``position_ids`` of
shape ``[1, T]`` (positions restart at 0 at every boundary) plus ``cu_seq_lens_*``/``max_length_*``/``seq_idx`` for
the varlen flash kernels. We subclass it only to reject malformed rows (TRL silently trains on every token of a
row without labels) and to put ``use_cache=False`` in the batch (see below).

Why sequences do not attend to each other (transformers 5): with no ``attention_mask`` and no cache,
``masking_utils.create_causal_mask`` finds the packed sequences from the position ids
(``find_packed_sequence_indices``) and ANDs a same-sequence mask into the causal mask, for every implementation in
its mask registry (eager, sdpa, flex_attention; flash_attention_2/3/4 use the ``cu_seq_lens`` varlen path). Two
things silently break that isolation, and both are guarded here or tested in ``tests/test_packing.py``:

* a cache: the model's default ``use_cache=True`` makes ``LlamaModel`` create a ``DynamicCache``, and packed
  detection is skipped when there is one. TRL's ``compute_loss`` forces ``use_cache=False``; the batch carries it
  too, so ``model(**batch)`` elsewhere (eval loops, benchmarks) is safe as well.
* an attention implementation outside the mask registry (a custom kernel): the mask is skipped altogether.
  :func:`check_packing_attention` refuses those.

Cost: eager and sdpa materialise a ``[T, T]`` mask and compute every block of it, so attention work grows with the
square of the *packed* length; the saving is in the linear layers (no pad tokens). Only flash/flex skip the
cross-sequence blocks. For our short rows (tens to hundreds of tokens) attention is a small part of the step.

Use it from worker code (this module imports TRL):

    trainer = RaySFTTrainer(..., args=SFTConfig(..., **packing_sft_config_kwargs()),
                            data_collator=packing_collator(tokenizer))
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from finemed_ray.data.tokenize import IGNORE_INDEX
from finemed_ray.errors import ConfigError, DataError

log = logging.getLogger(__name__)


@dataclass
class PackingCollator(DataCollatorForLanguageModeling):
    """TRL's padding-free collator, with row checks and ``use_cache=False`` in every batch.

    Rows: ``{"input_ids": [...], "labels": [...]}`` of equal, non-zero length; labels unshifted (the model shifts),
    each -100 or equal to the input id at the same position. Other keys are ignored."""

    padding_free: bool = True
    pack_length: int | None = None  # None: one row per micro-batch (TRL's layout); N: bins of <= N tokens

    def __post_init__(self) -> None:
        if not self.padding_free:
            raise ConfigError("PackingCollator: padding_free must be True (use TRL's collator for padded batches)")
        if self.pack_length is not None and self.pack_length < 1:
            raise ConfigError(f"PackingCollator: pack_length={self.pack_length}: must be None or >= 1")

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        check_rows(examples)
        if self.pack_length is not None:
            batch = pack_into_rows(examples, self.pack_length, self.pad_token_id)
            batch["use_cache"] = False
            return batch
        batch = super().torch_call(examples)
        # Without this a plain model(**batch) builds a KV cache, and transformers then ignores the packed position
        # ids: sequences would silently attend to each other (TRL's compute_loss sets it too).
        batch["use_cache"] = False
        return batch


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into bins of total <= ``capacity`` (longest first, each into the first bin
    with room; ties keep input order). A length above ``capacity`` gets a bin of its own."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


def pack_into_rows(examples: Sequence[Mapping[str, Any]], pack_length: int, pad_token_id: int) -> dict[str, Any]:
    """Several packed rows instead of one: the micro-batch's sequences go into bins of at most ``pack_length``
    tokens (first-fit decreasing), each bin one row, rows right-padded to the longest bin.

    Why: eager/sdpa attention computes every [T, T] block of a row, so one row of all N sequences costs
    (sum of lengths)^2 in attention -- more than the padded batch it replaces once N is large. Bins of about
    max_length keep attention at the padded batch's cost or below and still drop almost all padding (measured:
    ``bench/packing_throughput.py``). Layout per row as TRL's: positions restart at 0 per sequence, labels -100 on
    each sequence's first token; pads get position 0 and label -100, so each pad is its own one-token "sequence"
    that no real token attends to. No attention_mask: transformers derives the block-diagonal mask from the
    position ids per row (and flash kernels flatten the rows into varlen sequences the same way)."""
    lengths = [len(ex["input_ids"]) for ex in examples]
    bins = first_fit_decreasing(lengths, pack_length)
    width = max(sum(lengths[i] for i in b) for b in bins)
    ids = torch.full((len(bins), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(bins), width), IGNORE_INDEX, dtype=torch.long)
    pos = torch.zeros((len(bins), width), dtype=torch.long)
    for r, b in enumerate(sorted(bins, key=min)):  # rows in order of their first sequence: stable, readable
        o = 0
        for i in sorted(b):
            n = lengths[i]
            ids[r, o : o + n] = torch.as_tensor(examples[i]["input_ids"])
            labels[r, o : o + n] = torch.as_tensor(examples[i]["labels"])
            labels[r, o] = IGNORE_INDEX  # never predict a sequence's first token from the previous one
            pos[r, o : o + n] = torch.arange(n)
            o += n
    return {"input_ids": ids, "labels": labels, "position_ids": pos}


def check_rows(examples: Sequence[Mapping[str, Any]]) -> None:
    """Raise :class:`DataError` naming the first row that cannot be packed as is."""
    if not examples:
        raise DataError("packing collator got an empty batch")
    for i, ex in enumerate(examples):
        if not isinstance(ex, Mapping) or "input_ids" not in ex:
            raise DataError(f"batch row {i}: expected a dict with 'input_ids' and 'labels', got {type(ex).__name__}")
        if ex.get("labels") is None:
            # TRL would fall back to labels = input_ids: training on system/user tokens, not assistant-only.
            raise DataError(f"batch row {i}: no 'labels' (assistant-only labels from finemed_ray.data.tokenize)")
        ids = torch.as_tensor(ex["input_ids"])
        labels = torch.as_tensor(ex["labels"])
        if ids.ndim != 1 or labels.ndim != 1 or ids.numel() == 0:
            raise DataError(f"batch row {i}: 'input_ids' and 'labels' must be non-empty flat lists of token ids")
        if ids.shape != labels.shape:
            raise DataError(f"batch row {i}: {ids.numel()} input_ids but {labels.numel()} labels")
        if not ((labels == IGNORE_INDEX) | (labels == ids)).all():
            raise DataError(
                f"batch row {i}: labels must be {IGNORE_INDEX} or equal to input_ids at the same position "
                "(unshifted: the model shifts them); these look shifted or come from another row"
            )


def packing_collator(tokenizer_or_pad_id: Any, pad_to_multiple_of: int | None = None,
                     pack_length: int | None = None) -> PackingCollator:
    """The padding-free collator for our pre-tokenised SFT rows.

    ``tokenizer_or_pad_id``: a tokenizer with a pad token, or the pad id itself. The pad id is only used when
    ``pad_to_multiple_of`` pads the packed row at its end (for shape-stable compilers), or to even out the rows
    of ``pack_length`` bins (see :func:`pack_into_rows`); with neither there is no pad."""
    pad_id = tokenizer_or_pad_id if isinstance(tokenizer_or_pad_id, int) else getattr(
        tokenizer_or_pad_id, "pad_token_id", None
    )
    if not isinstance(pad_id, int) or isinstance(pad_id, bool) or pad_id < 0:
        raise ConfigError(f"packing_collator: need a tokenizer with a pad token or a pad id >= 0, got {pad_id!r}")
    if pad_to_multiple_of is not None and (not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1):
        raise ConfigError(f"packing_collator: pad_to_multiple_of={pad_to_multiple_of!r}: must be None or >= 1")
    if pack_length is not None and pad_to_multiple_of is not None:
        raise ConfigError("packing_collator: pack_length and pad_to_multiple_of are exclusive")
    return PackingCollator(pad_token_id=pad_id, pad_to_multiple_of=pad_to_multiple_of, pack_length=pack_length)


def resolve_pack_length(setting: int | str | None, max_length: int, attn_implementation: str | None) -> int | None:
    """``train.pack_length`` -> the collator's ``pack_length``. ``auto``: one row per micro-batch for flash
    kernels (their varlen path skips cross-sequence blocks, so a long row costs nothing extra), bins of
    ``max_length`` tokens for eager/sdpa/flex (which compute the whole [T, T] block)."""
    if setting == "auto":
        return None if (attn_implementation or "").startswith("flash") else max_length
    if setting is None or setting == "single":
        return None
    return int(setting)


def packing_sft_config_kwargs(trl_builds_collator: bool = False) -> dict[str, Any]:
    """SFTConfig kwargs for packing, for one of two mutually exclusive routes.

    Default (we pass ``data_collator=packing_collator(tok)``): TRL's own switches must stay off, because
    ``SFTTrainer`` raises ``ValueError`` for a custom collator when ``padding_free=True`` (or ``packing=True``
    with strategy bfd/bfd_split, which turns padding-free on). Rows stay truncated by our prepare step.

    ``trl_builds_collator=True`` (no ``data_collator``): ``padding_free=True`` makes TRL build the same collator
    without our row checks; it needs ``max_length=None`` because TRL refuses padding-free without packing while
    ``max_length`` is set (it would not be enforced; our rows are truncated upstream). Not ``packing=True``: with
    ``skip_prepare_dataset`` no dataset-level packing happens, so the flag would only mislead."""
    if trl_builds_collator:
        return {"padding_free": True, "packing": False, "max_length": None}
    return {"padding_free": False, "packing": False}


def check_packing_attention(model_or_config: Any) -> str:
    """Return the model's attention implementation, or raise :class:`ConfigError` if packing would leak.

    transformers only builds the packed (block-diagonal) mask for implementations in its mask registry; for any
    other it passes no mask at all, and packed sequences would attend to each other."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    from finemed_ray.models.loading import attention_implementation, packed_sequences_isolated

    impl = attention_implementation(model_or_config)
    if not packed_sequences_isolated(model_or_config):
        raise ConfigError(
            f"attention implementation {impl!r} has no transformers mask function, so packed sequences would attend "
            f"to each other; use one of {sorted(ALL_MASK_ATTENTION_FUNCTIONS)} or turn packing off"
        )
    if impl == "eager":
        log.info("packing with eager attention: correct, but it materialises [T, T] scores for the whole pack")
    return impl


def padding_stats(batch: Mapping[str, Any], pad_token_id: int | None = None) -> dict[str, float]:
    """Token accounting of one collated batch, padded (has ``attention_mask``) or packed (has ``position_ids``).

    ``slots``: tokens the model computes on; ``real_tokens``: of those, not padding; ``label_tokens``: tokens the
    loss averages over (labels after the model's shift). For a packed batch, pass ``pad_token_id`` if it was
    padded to a multiple (trailing pads are recognised as pad id at position 0)."""
    ids = torch.as_tensor(batch["input_ids"])
    labels = torch.as_tensor(batch["labels"])
    if batch.get("attention_mask") is not None:
        real = torch.as_tensor(batch["attention_mask"]).bool()
        sequences = int(ids.shape[0])
    elif batch.get("position_ids") is not None:
        pos = torch.as_tensor(batch["position_ids"])
        real = torch.ones_like(ids, dtype=torch.bool)
        if pad_token_id is not None:
            real = ~((ids == pad_token_id) & (pos == 0))
        sequences = int(((pos == 0) & real).sum())
    else:
        raise DataError("padding_stats: batch has neither 'attention_mask' (padded) nor 'position_ids' (packed)")
    slots, n_real = ids.numel(), int(real.sum())
    return {
        "sequences": sequences,
        "slots": slots,
        "real_tokens": n_real,
        "pad_tokens": slots - n_real,
        "pad_fraction": (slots - n_real) / slots if slots else 0.0,
        "label_tokens": int((labels[..., 1:] != IGNORE_INDEX).sum()),
    }
