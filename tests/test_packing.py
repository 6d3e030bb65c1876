"""Padding-free packing: a packed batch trains exactly like the same rows padded, and sequences stay isolated.

The oracle is an independent padded batch (right padding + attention_mask). The negative controls show the checks
can fail: without position ids restarting at each boundary, or with the model's default KV cache, transformers
builds a plain causal mask over the whole pack and the numbers change.
"""

from __future__ import annotations

import pytest
import torch

from finemed_ray.toy.sample import sample_sft_rows
from finemed_ray.data.tokenize import IGNORE_INDEX, tokenize_conversation
from finemed_ray.errors import ConfigError, DataError
from finemed_ray.toy.tiny_model import build_tiny_model, build_tiny_tokenizer
from finemed_ray.train.packing import (
    check_packing_attention,
    packing_collator,
    packing_sft_config_kwargs,
    padding_stats,
)

ATTN = ["eager", "sdpa"]
MULTI_TURN = [
    {"role": "system", "content": "You are a helpful professional doctor."},
    {"role": "user", "content": "What is the first-line drug for type 2 diabetes?"},
    {"role": "assistant", "content": "Metformin is the usual first-line drug."},
    {"role": "user", "content": "And a common side effect?"},
    {"role": "assistant", "content": "Gastrointestinal upset."},
]


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def rows(tok):
    """Four rows of different lengths (one multi-turn, one without a system prompt), assistant-only labels."""
    convs = [r["messages"] for r in sample_sft_rows(2, seed=3)]
    convs += [MULTI_TURN, sample_sft_rows(1, seed=5, system_prompt=None)[0]["messages"]]
    out = []
    for messages in convs:
        t = tokenize_conversation(tok, messages, max_length=512)
        out.append({"input_ids": t["input_ids"], "labels": t["labels"]})
    assert len({len(r["input_ids"]) for r in out}) == len(out), "want distinct lengths"
    return out


@pytest.fixture(scope="module")
def models(tok):
    """One model per attention implementation, same weights (same seed)."""
    out = {}
    for impl in ATTN:
        m = build_tiny_model(tok)
        m.set_attn_implementation(impl)
        assert m.config._attn_implementation == impl
        out[impl] = m
    return out


def pad_batch(rows, pad_id):
    """The unpacked oracle: right padding, attention_mask, labels -100 on pads."""
    n = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), n), pad_id)
    labels = torch.full((len(rows), n), IGNORE_INDEX)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        k = len(r["input_ids"])
        ids[i, :k], labels[i, :k], mask[i, :k] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def test_packed_batch_layout(tok, rows):
    batch = packing_collator(tok)(rows)
    lengths = [len(r["input_ids"]) for r in rows]
    total = sum(lengths)
    for key in ("input_ids", "labels", "position_ids"):
        assert batch[key].shape == (1, total), key
    assert "attention_mask" not in batch  # a mask would make flash kernels ignore the position ids
    assert batch["use_cache"] is False
    # Positions restart at 0 at each boundary; nothing else is 0.
    expected_pos = torch.cat([torch.arange(n) for n in lengths])
    assert torch.equal(batch["position_ids"][0], expected_pos)
    starts = torch.tensor([0, *torch.tensor(lengths).cumsum(0)[:-1].tolist()])
    assert torch.equal((batch["position_ids"][0] == 0).nonzero().flatten(), starts)
    # No padding at all; the tokens are the rows, in order.
    assert not (batch["input_ids"] == tok.pad_token_id).any()
    assert batch["input_ids"][0].tolist() == [t for r in rows for t in r["input_ids"]]
    # Our assistant-only labels are kept as they are, except -100 on each sequence's first token.
    expected_labels = torch.tensor([lab for r in rows for lab in r["labels"]])
    expected_labels[starts] = IGNORE_INDEX
    assert torch.equal(batch["labels"][0], expected_labels)
    assert (batch["labels"] != IGNORE_INDEX).sum() == sum(sum(lab != IGNORE_INDEX for lab in r["labels"]) for r in rows)
    assert batch["cu_seq_lens_q"].tolist() == [*starts.tolist(), total]


@pytest.mark.parametrize("impl", ATTN)
def test_packed_loss_and_grads_match_padded(tok, rows, models, impl):
    model = models[impl]
    assert check_packing_attention(model) == impl
    packed = packing_collator(tok)(rows)
    padded = pad_batch(rows, tok.pad_token_id)
    assert padding_stats(padded)["pad_tokens"] > 0  # the oracle really is padded
    loss_packed, g_packed = loss_and_grads(model, packed)
    loss_padded, g_padded = loss_and_grads(model, padded)
    torch.testing.assert_close(loss_packed, loss_padded, atol=1e-5, rtol=0)
    worst = max((g_packed[n] - g_padded[n]).abs().max().item() for n in g_packed)
    scale = max(g.abs().max().item() for g in g_padded.values())
    assert worst <= 1e-5 * max(1.0, scale), f"max |grad diff| {worst:.3g} (max |grad| {scale:.3g})"


@pytest.mark.parametrize("impl", ATTN)
def test_packed_sequences_do_not_attend_to_each_other(tok, rows, models, impl):
    model = models[impl]
    packed = packing_collator(tok)(rows)
    lengths = [len(r["input_ids"]) for r in rows]
    with torch.no_grad():
        logits = model(**{k: v for k, v in packed.items() if k != "labels"}).logits[0]
        for i in (1, 2, 3):  # sequence 0 cannot see anything earlier anyway
            start = sum(lengths[:i])
            alone = model(input_ids=torch.tensor([rows[i]["input_ids"]]), use_cache=False).logits[0]
            torch.testing.assert_close(logits[start : start + lengths[i]], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ATTN)
@pytest.mark.parametrize("broken", ["positions_not_reset", "default_kv_cache"])
def test_negative_controls_change_the_numbers(tok, rows, models, impl, broken):
    """Proof the tests above can fail: both breakages give the plain causal mask over the whole pack."""
    model = models[impl]
    packed = packing_collator(tok)(rows)
    padded = pad_batch(rows, tok.pad_token_id)
    bad = dict(packed)
    if broken == "positions_not_reset":
        bad["position_ids"] = torch.arange(packed["input_ids"].shape[1])[None]
    else:  # the model's default use_cache=True: transformers skips packed-sequence detection under a cache
        del bad["use_cache"]
        assert model.config.use_cache
    with torch.no_grad():
        loss_bad = model(**bad).loss
        loss_padded = model(**padded).loss
    assert abs(loss_bad.item() - loss_padded.item()) > 1e-3


def test_trl_sft_trainer_accepts_the_collator_and_loss_matches(tok, rows, tmp_path):
    """Through SFTTrainer.compute_loss (fused LM head, TRL's own forward kwargs), both packing routes."""
    import datasets
    from trl import SFTConfig, SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    ds = datasets.Dataset.from_list(rows)
    common = dict(use_cpu=True, report_to=[], dataset_kwargs={"skip_prepare_dataset": True},
                  remove_unused_columns=False, per_device_train_batch_size=len(rows))
    model = build_tiny_model(tok)
    padded_loss = model(**pad_batch(rows, tok.pad_token_id)).loss.item()
    bins = max(len(r["input_ids"]) for r in rows) + min(len(r["input_ids"]) for r in rows)
    for route in ("ours", "ours-bins", "trl"):
        if route.startswith("ours"):
            args = SFTConfig(output_dir=str(tmp_path / route), max_length=512, **common, **packing_sft_config_kwargs())
            collator = packing_collator(tok, pack_length=bins if route == "ours-bins" else None)
        else:
            args = SFTConfig(output_dir=str(tmp_path / route), **common, **packing_sft_config_kwargs(True))
            collator = None
        trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, data_collator=collator)
        assert isinstance(trainer.data_collator, DataCollatorForLanguageModeling) and trainer.data_collator.padding_free
        batch = trainer.data_collator(rows)
        assert "attention_mask" not in batch
        with torch.no_grad():
            loss = trainer.compute_loss(trainer.model, dict(batch))
        assert loss.item() == pytest.approx(padded_loss, abs=1e-5), route

    # TRL refuses a custom collator when its own padding-free switch is on: the two routes are exclusive.
    with pytest.raises(ValueError, match="custom data collator"):
        SFTTrainer(model=model, processing_class=tok, train_dataset=ds, data_collator=packing_collator(tok),
                   args=SFTConfig(output_dir=str(tmp_path / "both"), **common, **packing_sft_config_kwargs(True)))


def test_bad_rows_and_config_are_rejected(tok, rows):
    collate = packing_collator(tok)
    good = rows[0]
    cases = {
        "no 'labels'": [good, {"input_ids": good["input_ids"]}],
        "input_ids but": [{"input_ids": good["input_ids"], "labels": good["labels"][:-1]}],
        "non-empty": [{"input_ids": [], "labels": []}],
        "unshifted": [{"input_ids": good["input_ids"][:-1], "labels": good["labels"][1:]}],
        "empty batch": [],
    }
    for match, batch in cases.items():
        with pytest.raises(DataError, match=match):
            collate(batch)
    with pytest.raises(DataError, match="row 1"):
        collate([good, {"input_ids": good["input_ids"]}])

    class NoPad:
        pad_token_id = None

    with pytest.raises(ConfigError, match="pad"):
        packing_collator(NoPad())
    with pytest.raises(ConfigError, match="pad_to_multiple_of"):
        packing_collator(tok, pad_to_multiple_of=0)

    class CustomKernel:
        _attn_implementation = "my_custom_kernel"

    with pytest.raises(ConfigError, match="my_custom_kernel"):
        check_packing_attention(CustomKernel())


def test_padding_stats(tok, rows):
    padded, packed = pad_batch(rows, tok.pad_token_id), packing_collator(tok)(rows)
    total = sum(len(r["input_ids"]) for r in rows)
    s_pad, s_pack = padding_stats(padded), padding_stats(packed)
    assert s_pad["real_tokens"] == s_pack["real_tokens"] == s_pack["slots"] == total
    assert s_pack["pad_tokens"] == 0 and s_pad["pad_tokens"] == s_pad["slots"] - total > 0
    assert s_pad["sequences"] == s_pack["sequences"] == len(rows)
    assert s_pad["label_tokens"] == s_pack["label_tokens"]  # the loss averages over the same tokens
    # Padded to a multiple: the tail is pad (position 0) and is counted as padding, not as sequences.
    s_mult = padding_stats(packing_collator(tok, pad_to_multiple_of=64)(rows), pad_token_id=tok.pad_token_id)
    assert s_mult["slots"] % 64 == 0 and s_mult["real_tokens"] == total and s_mult["sequences"] == len(rows)


# ------------------------------------------------------------------------------------- several packed rows (bins)
def test_first_fit_decreasing_bins():
    from finemed_ray.train.packing import first_fit_decreasing

    bins = first_fit_decreasing([5, 9, 3, 7, 2, 4], 10)
    assert sorted(i for b in bins for i in b) == list(range(6))  # every sequence exactly once
    assert all(sum([5, 9, 3, 7, 2, 4][i] for i in b) <= 10 for b in bins)
    assert bins == [[1], [3, 2], [0, 5], [4]]  # longest first, each into the first bin with room
    assert first_fit_decreasing([12, 3], 10) == [[0], [1]]  # too long for a bin: a bin of its own


def test_binned_layout(tok, rows):
    lengths = [len(r["input_ids"]) for r in rows]
    cap = max(lengths) + min(lengths)
    batch = packing_collator(tok, pack_length=cap)(rows)
    n_rows, width = batch["input_ids"].shape
    assert 1 < n_rows < len(rows) and width <= cap
    assert "attention_mask" not in batch and batch["use_cache"] is False
    seen = []
    for r in range(n_rows):
        pos, ids, labels = batch["position_ids"][r], batch["input_ids"][r], batch["labels"][r]
        starts = (pos == 0).nonzero().flatten().tolist() + [width]
        for a, b in zip(starts, starts[1:]):
            seq = ids[a:b].tolist()
            if b - a == 1 and seq == [tok.pad_token_id]:
                assert labels[a] == IGNORE_INDEX  # a pad: its own one-token segment, never trained
                continue
            (i,) = [k for k, row in enumerate(rows) if row["input_ids"] == seq]
            seen.append(i)
            assert torch.equal(pos[a:b], torch.arange(b - a))
            assert labels[a] == IGNORE_INDEX and labels[a + 1 : b].tolist() == rows[i]["labels"][1:]
    assert sorted(seen) == list(range(len(rows)))
    stats = padding_stats(batch, tok.pad_token_id)
    assert stats["real_tokens"] == sum(lengths) and stats["sequences"] == len(rows)


@pytest.mark.parametrize("impl", ATTN)
def test_binned_loss_grads_and_isolation_match_padded(tok, rows, models, impl):
    model = models[impl]
    lengths = [len(r["input_ids"]) for r in rows]
    packed = packing_collator(tok, pack_length=max(lengths) + min(lengths))(rows)
    assert packed["input_ids"].shape[0] > 1
    loss_packed, g_packed = loss_and_grads(model, packed)
    loss_padded, g_padded = loss_and_grads(model, pad_batch(rows, tok.pad_token_id))
    torch.testing.assert_close(loss_packed, loss_padded, atol=1e-5, rtol=0)
    worst = max((g_packed[n] - g_padded[n]).abs().max().item() for n in g_packed)
    scale = max(g.abs().max().item() for g in g_padded.values())
    assert worst <= 1e-5 * max(1.0, scale)
    with torch.no_grad():
        logits = model(**{k: v for k, v in packed.items() if k != "labels"}).logits
        for r in range(packed["input_ids"].shape[0]):
            pos = packed["position_ids"][r]
            starts = (pos == 0).nonzero().flatten().tolist() + [pos.numel()]
            for a, b in zip(starts, starts[1:]):
                if b - a > 1:
                    alone = model(input_ids=packed["input_ids"][r : r + 1, a:b], use_cache=False).logits[0]
                    torch.testing.assert_close(logits[r, a:b], alone, atol=1e-5, rtol=1e-5)


def test_pack_length_setting():
    from finemed_ray.train.packing import resolve_pack_length

    assert resolve_pack_length("auto", 512, "sdpa") == 512
    assert resolve_pack_length("auto", 512, "flash_attention_2") is None
    assert resolve_pack_length("single", 512, "sdpa") is None and resolve_pack_length(1024, 512, "eager") == 1024
    with pytest.raises(ConfigError, match="exclusive"):
        packing_collator(0, pad_to_multiple_of=8, pack_length=64)
