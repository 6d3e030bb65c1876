"""Packed DPO (finemed_ray/train/dpo_packing.py) computes what TRL's padded DPO computes, and packed sequences stay
isolated. Fast, no Ray: the tiny model in float32, on length-varied pairs.

The oracle is TRL 1.16's own padded path (its ``DataCollatorForPreference`` and ``DPOTrainer._compute_loss`` /
``compute_ref_log_probs``, fused LM head), run on the same examples with the same weights. The negative control
shows the isolation check can fail: the same packed row with a KV cache (transformers then skips packed-sequence
detection) lets a change in an earlier sequence move a later sequence's log-probs.
"""

from __future__ import annotations

import copy

import pytest
import torch

from finemed_ray.data.dpo_prepare import tokenize_pair
from finemed_ray.toy.sample import sample_dpo_rows
from finemed_ray.data.tokenize import with_system_prompt
from finemed_ray.errors import ConfigError
from finemed_ray.toy.tiny_model import build_tiny_model, build_tiny_tokenizer
from finemed_ray.train.dpo_packing import (
    DPOPackingCollator,
    DPOPackingMixin,
    check_packable,
    examples_from_lengths,
    install_packed_forward,
    pack_layout,
    padding_stats,
)

ATTN = ["eager", "sdpa"]
TOL = 1e-5  # float32
# (prompt, chosen, rejected) token counts: sequences from 12 to 118 tokens, lengths within a batch vary ~10x
LENGTHS = [(10, 5, 30), (20, 98, 3), (7, 12, 41), (30, 2, 9), (16, 60, 61), (9, 24, 100)]


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def synthetic(tok):
    return examples_from_lengths(LENGTHS, len(tok), seed=1)


@pytest.fixture(scope="module")
def real(tok):
    """Four tokenised preference pairs from the sample data (reasoning chosen ~200-260 tokens, direct rejected ~15)."""
    out = []
    for r in sample_dpo_rows(seed=0)[:4]:
        out.append(tokenize_pair(tok, with_system_prompt(r["prompt"], "You are a helpful professional doctor."),
                                 r["chosen"], r["rejected"]))
    return out


def moved(model, seed=0, scale=0.02):
    """A copy of ``model`` with every weight moved a little: a policy that differs from its reference."""
    gen = torch.Generator().manual_seed(seed)
    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            p += scale * torch.randn(p.shape, generator=gen)
    return out


def make_trainer(tok, examples, tmp_path, *, impl="sdpa", packing=False, pack_length=None, loss_type=("sigmoid",),
                 loss_weights=None, lora=False, seed=0):
    """A TRL DPOTrainer with our mixin, a moved policy and its unmoved reference (same weights for every call)."""
    import datasets
    from trl import DPOConfig, DPOTrainer

    class Trainer(DPOPackingMixin, DPOTrainer):
        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset  # rows arrive tokenised (as in finemed_ray/train/stages/dpo.py)

    base = build_tiny_model(tok)
    base.set_attn_implementation(impl)
    ref = None if lora else base
    policy = base if lora else moved(base, seed)
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")
    args = DPOConfig(output_dir=str(tmp_path / f"out-{packing}-{pack_length}"), use_cpu=True, report_to=[],
                     bf16=False, remove_unused_columns=False, per_device_train_batch_size=len(examples),
                     max_length=512, truncation_mode="keep_start", beta=0.1, loss_type=list(loss_type),
                     loss_weights=loss_weights)
    trainer = Trainer(model=policy, ref_model=ref, args=args, train_dataset=datasets.Dataset.from_list(examples),
                      processing_class=tok, peft_config=peft_config, dpo_packing=packing, dpo_pack_length=pack_length)
    if lora:  # a trained-looking adapter, so policy != reference
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in trainer.model.named_parameters():
                if "lora_B" in n:
                    p += 0.05 * torch.randn(p.shape, generator=gen)
    return trainer


def loss_grads_metrics(trainer, batch):
    model = trainer.model
    model.train()  # TRL logs under "train" when the model trains (dropout is 0 in the tiny model and TRL's)
    model.zero_grad(set_to_none=True)
    trainer._metrics["train"].clear()
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if k != "num_tokens"}
    return loss.detach(), grads, metrics


def assert_grads_close(got, want):
    assert got.keys() == want.keys() and want
    worst = max((got[n] - want[n]).abs().max().item() for n in want)
    scale = max(g.abs().max().item() for g in want.values())
    assert worst <= TOL * max(1.0, scale), f"max |grad diff| {worst:.3g} (max |grad| {scale:.3g})"
    return worst


# ----------------------------------------------------------------------------------------------------- layout
@pytest.mark.parametrize("pack_length", [None, 64, 130])
def test_layout(tok, synthetic, pack_length):
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    padded = DataCollatorForPreference(pad_token_id=tok.pad_token_id)(synthetic)
    batch = DPOPackingCollator(pad_token_id=tok.pad_token_id, pack_length=pack_length)(synthetic)
    for key, value in padded.items():  # TRL's padded batch, untouched
        assert torch.equal(batch[key], value), key
    assert batch["use_cache"] is False
    n, width = padded["input_ids"].shape
    lengths = padded["attention_mask"].sum(1)
    index, pos = batch["packed_index"], batch["packed_position_ids"]
    # Every real token appears exactly once, at its own position; pads are -1 at position 0.
    real = index >= 0
    assert sorted(index[real].tolist()) == [b * width + c for b in range(n) for c in range(int(lengths[b]))]
    assert torch.equal(pos[real], index[real] % width)
    assert (pos[~real] == 0).all()
    if pack_length is None:
        assert index.shape == (1, int(lengths.sum())) and real.all()
        assert torch.equal(index[0], torch.cat([b * width + torch.arange(int(k)) for b, k in enumerate(lengths)]))
    else:
        per_row = real.sum(1)
        longest = int(lengths.max())
        assert (per_row <= max(pack_length, longest)).all()
        assert index.shape[0] < n  # bins actually share rows
    # Varlen kernels: the flattened rows' sequence starts (every position 0, pads included) and the last boundary.
    starts = (pos.reshape(-1) == 0).nonzero().flatten().tolist()
    assert batch["packed_cu_seq_lens"].tolist() == [*starts, pos.numel()]
    assert batch["packed_max_length"] == int(lengths.max())
    stats = padding_stats(batch)
    assert stats["padded_pad_fraction"] > 0.4 and stats["real_tokens"] == int(lengths.sum())
    if pack_length is None:
        assert stats["packed_pad_fraction"] == 0


def test_layout_refuses_left_padding():
    with pytest.raises(Exception, match="right-padded"):
        pack_layout(torch.tensor([[0, 1, 1], [1, 1, 1]]))


# ------------------------------------------------------------------------------------------------- equality
@pytest.mark.parametrize("impl", ATTN)
@pytest.mark.parametrize("pack_length", [None, 128])
def test_per_sequence_logps_equal_padded(tok, synthetic, tmp_path, impl, pack_length):
    """TRL's compute_ref_log_probs (per-sequence sums of the fused head's log-probs), packed vs padded batch."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    trainer = make_trainer(tok, synthetic, tmp_path, impl=impl, packing=True, pack_length=pack_length)
    assert isinstance(trainer.data_collator, DPOPackingCollator)
    packed = trainer.data_collator(synthetic)
    padded = DataCollatorForPreference(pad_token_id=tok.pad_token_id, max_length=512)(synthetic)
    seen = []  # what the backbone really ran on
    hook = trainer.model.model.register_forward_pre_hook(
        lambda m, a, kw: seen.append((tuple(kw["input_ids"].shape), kw.get("attention_mask") is None,
                                      kw.get("position_ids") is not None)), with_kwargs=True)
    with torch.no_grad():
        got = torch.cat(trainer.compute_ref_log_probs(trainer.model, packed))
        want = torch.cat(trainer.compute_ref_log_probs(trainer.model, padded))
    hook.remove()
    assert seen == [(tuple(packed["packed_index"].shape), True, True), (tuple(padded["input_ids"].shape), False, False)]
    assert got.shape == (2 * len(synthetic),)
    assert want.abs().min() > 1.0  # real sums over many tokens, not zeros
    diff = (got - want).abs().max().item()
    print(f"{impl} pack_length={pack_length}: max |per-sequence log-prob diff| {diff:.3g}")
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)


@pytest.mark.parametrize("impl", ATTN)
@pytest.mark.parametrize("loss", ["sigmoid", "rpo", "ipo"])
def test_dpo_loss_grads_and_metrics_equal_padded(tok, real, tmp_path, impl, loss):
    """The whole DPO step through TRL's _compute_loss: policy and reference forwards, loss, metrics, gradients."""
    kwargs = {"sigmoid": {}, "ipo": {"loss_type": ("ipo",)},
              "rpo": {"loss_type": ("sigmoid", "sft"), "loss_weights": [1.0, 0.5]}}[loss]
    padded_trainer = make_trainer(tok, real, tmp_path, impl=impl, packing=False, **kwargs)
    packed_trainer = make_trainer(tok, real, tmp_path, impl=impl, packing=True, pack_length=None, **kwargs)
    assert type(padded_trainer.data_collator).__name__ == "DataCollatorForPreference"
    padded = padded_trainer.data_collator(real)
    packed = packed_trainer.data_collator(real)
    assert padding_stats(packed)["padded_pad_fraction"] > 0.3  # the padded oracle really pads a lot
    loss_padded, g_padded, m_padded = loss_grads_metrics(padded_trainer, padded)
    loss_packed, g_packed, m_packed = loss_grads_metrics(packed_trainer, packed)
    if loss == "sigmoid":
        assert abs(loss_padded.item() - 0.6931) > 1e-3  # policy != reference: a real signal, not log 2
    torch.testing.assert_close(loss_packed, loss_padded, atol=TOL, rtol=0)
    worst = assert_grads_close(g_packed, g_padded)
    print(f"{impl} {loss}: loss {loss_padded.item():.6f} |diff| {abs(loss_packed - loss_padded).item():.3g}, "
          f"max |grad diff| {worst:.3g}")
    # TRL's metrics agree; the packed run adds its own two (the share of token slots saved, pads left in the rows)
    assert m_packed.keys() == m_padded.keys() | {"packing/slots_saved", "packing/pad_fraction"}
    assert "rewards/margins" in m_padded
    for key in m_padded:
        assert m_packed[key] == pytest.approx(m_padded[key], abs=1e-4), key
    stats = padding_stats(packed)
    assert m_packed["packing/slots_saved"] == pytest.approx(1 - stats["packed_slots"] / stats["padded_slots"])
    assert m_packed["packing/pad_fraction"] == 0  # one row, no pads


def test_lora_reference_by_disabled_adapter(tok, real, tmp_path):
    """With LoRA the reference is the policy with its adapter disabled (TRL's use_adapter): same forward, packed."""
    padded_trainer = make_trainer(tok, real, tmp_path, packing=False, lora=True)
    packed_trainer = make_trainer(tok, real, tmp_path, packing=True, lora=True)
    loss_padded, g_padded, _ = loss_grads_metrics(padded_trainer, padded_trainer.data_collator(real))
    loss_packed, g_packed, _ = loss_grads_metrics(packed_trainer, packed_trainer.data_collator(real))
    assert abs(loss_padded.item() - 0.6931) > 1e-4
    torch.testing.assert_close(loss_packed, loss_padded, atol=TOL, rtol=0)
    assert all("lora" in n for n in g_padded)
    assert_grads_close(g_packed, g_padded)


# ------------------------------------------------------------------------------------------------- isolation
def _packed_token_logps(model, batch, use_cache=False):
    """Per-token log-probs of the packed row(s) [R, W-1] from the model's plain forward (without the packed keys
    our wrapper and TRL's fused head pass the call through), with or without a KV cache."""
    index, pos = batch["packed_index"], batch["packed_position_ids"]
    ids = batch["input_ids"].reshape(-1)[index.clamp(min=0)].masked_fill(index < 0, 0)
    with torch.no_grad():
        logits = model(input_ids=ids, position_ids=pos, use_cache=use_cache).logits
    return logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]


@pytest.mark.parametrize("impl", ATTN)
def test_a_changed_earlier_sequence_does_not_move_later_ones(tok, synthetic, tmp_path, impl):
    """Change the tokens of the first sequence of the packed row: every later sequence's log-probs (packed forward
    through the trainer) stay as they were; the control with a KV cache shows the same check catches a leak."""
    trainer = make_trainer(tok, synthetic, tmp_path, impl=impl, packing=True)
    altered = copy.deepcopy(synthetic)
    altered[0]["prompt_ids"] = [(t * 7 + 3) % len(tok) for t in altered[0]["prompt_ids"]]
    altered[0]["chosen_ids"] = [(t * 5 + 1) % len(tok) for t in altered[0]["chosen_ids"]]
    batches = [trainer.data_collator(x) for x in (synthetic, altered)]
    assert torch.equal(batches[0]["packed_index"], batches[1]["packed_index"])  # same layout, sequence 0 first
    assert batches[0]["packed_index"][0, 0] == 0
    with torch.no_grad():
        chosen, rejected = zip(*(trainer.compute_ref_log_probs(trainer.model, b) for b in batches))
    assert (chosen[0][0] - chosen[1][0]).abs() > 1e-2  # the altered sequence itself changed
    # every other sequence (pair 0's rejected shares the altered prompt, so it changes too and is left out)
    torch.testing.assert_close(chosen[1][1:], chosen[0][1:], atol=TOL, rtol=0)
    torch.testing.assert_close(rejected[1][1:], rejected[0][1:], atol=TOL, rtol=0)

    # Control: the same row run with a KV cache. transformers then skips packed-sequence detection, and the later
    # sequences' log-probs move with the change to the first one: the check above would catch such a leak.
    model = trainer.model
    n, width = batches[0]["input_ids"].shape
    index, pos = batches[0]["packed_index"][:, 1:], batches[0]["packed_position_ids"][:, 1:]
    sequence = torch.where(index >= 0, index // width, -1)  # of each predicted token
    others = (pos != 0) & (sequence >= 0) & (sequence != 0) & (sequence != n // 2)  # not pair 0 (its prompt changed)
    assert others.sum() > 100
    for use_cache, leaks in ((False, False), (True, True)):
        a, b = (_packed_token_logps(model, x, use_cache=use_cache)[others] for x in batches)
        assert ((a - b).abs().max().item() > 1e-3) is leaks, f"use_cache={use_cache}"


def test_use_cache_is_forced_off(tok, synthetic, tmp_path):
    """Even if a caller asks for a cache, the packed forward runs without one (our wrapper and TRL's fused head both
    force it off) and matches the padded forward."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    trainer = make_trainer(tok, synthetic, tmp_path, packing=True)
    packed = trainer.data_collator(synthetic)
    padded = DataCollatorForPreference(pad_token_id=tok.pad_token_id)(synthetic)
    labels = padded["input_ids"].masked_fill(padded["completion_mask"] == 0, -100)
    model_kwargs = {k: v for k, v in packed.items() if k != "completion_mask"}
    model_kwargs["use_cache"] = True
    with torch.no_grad():
        got = trainer.model(**model_kwargs, labels=labels, fused_lm_head=True).log_probs.sum(1)
        want = trainer.model(**{k: padded[k] for k in ("input_ids", "attention_mask")}, labels=labels,
                             fused_lm_head=True).log_probs.sum(1)
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)


def test_flash_kernels_get_explicit_varlen_boundaries(tok, synthetic):
    """transformers derives flash varlen boundaries from position ids only for a single row; the packed forward
    passes cu_seq_lens itself (rows flattened, each pad its own sequence), so several rows stay isolated too."""
    from trl.trainer.utils import FusedCausalLMOutput

    seen = {}

    class Stub(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"_attn_implementation": "flash_attention_2", "pad_token_id": 2})()

        def forward(self, input_ids=None, labels=None, **kwargs):
            seen.update(kwargs, input_ids=input_ids, labels=labels)
            z = torch.zeros(input_ids.shape[0], input_ids.shape[1] - 1)
            return FusedCausalLMOutput(loss=z.sum(), log_probs=z + 1, label_mask=z.bool())

    stub = Stub()
    install_packed_forward(stub)
    batch = DPOPackingCollator(pad_token_id=tok.pad_token_id, pack_length=128)(synthetic)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    out = stub(**{k: v for k, v in batch.items() if k != "completion_mask"}, labels=labels, fused_lm_head=True)
    assert seen["cu_seq_lens_q"].tolist() == batch["packed_cu_seq_lens"].tolist()
    assert seen["max_length_q"] == seen["max_length_k"] == batch["packed_max_length"]
    assert seen["use_cache"] is False and "attention_mask" not in seen
    assert torch.equal(seen["position_ids"], batch["packed_position_ids"])
    assert (seen["labels"][batch["packed_position_ids"] == 0] == -100).all()  # no label across a boundary
    # Unpacked to TRL's padded layout: a value for every token after the first of each sequence, zeros elsewhere.
    n, width = batch["input_ids"].shape
    assert out.log_probs.shape == (n, width - 1)
    expected = torch.arange(width - 1)[None, :] < (batch["attention_mask"].sum(1, keepdim=True) - 1)
    assert torch.equal(out.log_probs.bool(), expected)


# --------------------------------------------------------------------------------------------------- refusals
def test_refusals(tok, synthetic, tmp_path):
    model = build_tiny_model(tok)
    model.config._attn_implementation = "my_custom_kernel"  # no transformers mask function: sequences would mix
    with pytest.raises(ConfigError, match="attend to each other"):
        check_packable(model)

    from peft import PromptTuningConfig, get_peft_model

    prompt_tuned = get_peft_model(build_tiny_model(tok), PromptTuningConfig(task_type="CAUSAL_LM",
                                                                            num_virtual_tokens=4))
    with pytest.raises(ConfigError, match="prompt learning"):
        check_packable(prompt_tuned)

    import datasets
    from trl import DPOConfig, DPOTrainer

    with pytest.raises(ConfigError, match="data_collator"):
        type("T", (DPOPackingMixin, DPOTrainer), {})(
            model=build_tiny_model(tok), ref_model=build_tiny_model(tok), processing_class=tok,
            args=DPOConfig(output_dir=str(tmp_path / "x"), use_cpu=True, report_to=[]),
            train_dataset=datasets.Dataset.from_list(synthetic), data_collator=lambda x: x, dpo_packing=True)


def test_trl_padding_free_is_still_a_no_op(tok, synthetic, tmp_path):
    """Why this module exists: TRL 1.16 warns and pads with padding_free=True. If this fails, TRL has its own
    packed DPO again: compare it with ours before keeping both."""
    import datasets
    from trl import DPOConfig, DPOTrainer

    class T(DPOTrainer):
        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset

    trainer = T(model=build_tiny_model(tok), ref_model=build_tiny_model(tok), processing_class=tok,
                args=DPOConfig(output_dir=str(tmp_path / "pf"), use_cpu=True, report_to=[], padding_free=True,
                               remove_unused_columns=False),
                train_dataset=datasets.Dataset.from_list(synthetic))
    assert trainer.padding_free is False
    batch = trainer.data_collator(synthetic)
    assert "attention_mask" in batch and "position_ids" not in batch
