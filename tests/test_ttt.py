"""Test-time training adapters (finemed_ray/ttt/adapt.py) on the tiny model: batched == one by one, the base model
is never modified, plain rows in a mixed batch are bit-exact, the peft export is what the hooks computed, the
full-parameter option restores the weights exactly, and the adapters learn what they are shown."""

from __future__ import annotations

import pytest
import torch

from finemed_ray.toy.sample import sample_mcq_items, sample_sft_rows
from finemed_ray.eval.loglik import mcq_loglik_accuracy
from finemed_ray.toy.fact_scoring import synthetic_fact_continuations
from finemed_ray.ttt.adapt import (
    BatchedLoRA,
    TTTConfig,
    adapt_lora,
    full_update,
    neighbour_messages,
    weights_digest,
)


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    return model, tok


def fact_key(item: dict) -> str:
    return "-".join(item["id"].split("-")[1:3])  # mcq-drug-00-p3 -> drug-00


@pytest.fixture(scope="module")
def task():
    """Held-out-paraphrase questions on facts the (random) model never saw, each with the three training
    paraphrases of its own fact as neighbours (oracle retrieval: this file tests adaptation, not the index)."""
    rows = sample_sft_rows(paraphrases="train", system_prompt=None)
    items = sample_mcq_items(paraphrases="heldout")[:8]
    neighbours = [[r for r in rows if r["id"].startswith(fact_key(it) + "-")] for it in items]
    assert all(len(n) == 3 for n in neighbours)
    return items, neighbours


# every layer (the tiny model has 2); float32 matmuls: these tests check the batching arithmetic to float32
# rounding (bfloat16 adaptation has its own tests below)
CFG = TTTConfig(top_layers=None, steps=8, lr=1e-2, r=8, precision="float32")
CFG_TOP = CFG.model_copy(update={"top_layers": 1})  # the top layer only; the one below runs once per batch


def ttt_accuracy(model, tok, items, lora) -> float:
    correct = 0
    with lora.attached():
        for q, item in enumerate(items):
            lora.row_adapter = torch.tensor([q])
            correct += mcq_loglik_accuracy(model, tok, [item], synthetic_fact_continuations)["correct"]
    return correct / len(items)


@pytest.mark.parametrize("cfg", [CFG, CFG_TOP], ids=["all-layers", "top-layer"])
def test_adapters_learn_their_own_facts_and_leave_the_base_untouched(model_and_tokenizer, task, cfg):
    model, tok = model_and_tokenizer
    items, neighbours = task
    before = weights_digest(model)
    base = mcq_loglik_accuracy(model, tok, items, synthetic_fact_continuations)["accuracy"]
    res = adapt_lora(model, tok, [it["id"] for it in items], neighbours, cfg)
    assert res.examples == 24 and res.losses[-1] < 0.9 * res.losses[0]
    assert ttt_accuracy(model, tok, items, res.lora) >= 0.75 > base + 0.3
    # Adapters of *other* questions do not help (what is learnt is each question's own neighbours):
    shifted = adapt_lora(model, tok, [it["id"] for it in items], neighbours[1:] + neighbours[:1], cfg)
    assert ttt_accuracy(model, tok, items, shifted.lora) <= base + 0.25
    # A zero-step adaptation is a no-op: same accuracy as the base model.
    noop = adapt_lora(model, tok, [it["id"] for it in items], neighbours, cfg.model_copy(update={"steps": 0}))
    assert ttt_accuracy(model, tok, items, noop.lora) == base
    assert weights_digest(model) == before
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())


@pytest.mark.parametrize("cfg", [CFG, CFG_TOP], ids=["all-layers", "top-layer"])
def test_batched_adapters_equal_one_question_at_a_time(model_and_tokenizer, task, cfg):
    model, tok = model_and_tokenizer
    items, neighbours = task
    keys = [it["id"] for it in items[:4]]
    together = adapt_lora(model, tok, keys, neighbours[:4], cfg)
    for q in range(4):
        alone = adapt_lora(model, tok, [keys[q]], [neighbours[q]], cfg)
        # Equal up to float summation order: a packed row's attention spans its padded width, which differs between
        # the batch and the single question, and Adam's normalisation (lr 1e-2 per step) can magnify the rounding
        # of a near-zero gradient. So: every element within a tenth of one step's lr, and the mean difference 100x
        # below one step's lr. A leak between questions would move most elements by about the lr (mean ~1e-2). (An
        # earlier "99% of elements within 1e-5" bound failed in CI at 2.5% on another CPU: rounding, not a leak.)
        for a, b in zip(together.lora.targets, alone.lora.targets):
            for x, y in ((a.A[q], b.A[0]), (a.B[q], b.B[0])):
                diff = (x - y).abs()
                assert diff.max() < 1e-3 and diff.mean() < 1e-4, (a.name, float(diff.max()), float(diff.mean()))


def test_packed_examples_train_as_padded_ones(model_and_tokenizer, task, monkeypatch):
    """Each question's examples are packed into one row (position ids restart per example); transformers then masks
    attention to each example. Same first-step loss and gradients as one padded row per example: no example sees
    another (a leak would change the loss at once)."""
    import finemed_ray.models.loading as loading
    import finemed_ray.ttt.adapt as adapt_mod

    model, tok = model_and_tokenizer
    items, neighbours = task
    keys = [it["id"] for it in items[:3]]
    one_step = CFG.model_copy(update={"steps": 1})
    packed = adapt_lora(model, tok, keys, neighbours[:3], one_step)
    monkeypatch.setattr(loading, "packed_sequences_isolated", lambda model: False)
    padded = adapt_lora(model, tok, keys, neighbours[:3], one_step)
    assert packed.losses == pytest.approx(padded.losses, rel=1e-5)
    for a, b in zip(packed.lora.targets, padded.lora.targets):  # one Adam step: lr * sign-like update per element
        torch.testing.assert_close(a.B, b.B, rtol=1e-3, atol=1e-4)
    batch = adapt_mod._collate_packed(adapt_mod.build_examples(tok, neighbours[:3], CFG), 0)
    assert batch["input_ids"].shape[0] == 3 and "attention_mask" not in batch  # one row per question


def test_shortcuts_compute_what_the_general_path_does(model_and_tokenizer, task, monkeypatch):
    """Two shortcuts of a training step: the LM head only at labelled positions (``logits_to_keep``), and the
    adapters used in place when row i trains adapter i (no gather). Same losses and adapters as full logits and a
    gathered copy, and each shortcut is really taken."""
    import finemed_ray.ttt.adapt as adapt_mod

    model, tok = model_and_tokenizer
    items, neighbours = task
    keys = [it["id"] for it in items[:3]]
    cfg = CFG_TOP.model_copy(update={"steps": 2})
    kept: list[int] = []
    forward = type(model).forward

    def spy(self, *a, logits_to_keep=0, **k):
        out = forward(self, *a, logits_to_keep=logits_to_keep, **k)
        kept.append(out.logits.shape[1])
        return out

    monkeypatch.setattr(type(model), "forward", spy)
    fast = adapt_lora(model, tok, keys, neighbours[:3], cfg)
    width = adapt_mod.collate_examples(model, adapt_mod.build_examples(tok, neighbours[:3], cfg), 0)["input_ids"]
    assert kept and max(kept) < width.shape[1] - 1  # fewer logits than positions
    monkeypatch.setattr(adapt_mod, "_accepts_logits_to_keep", lambda model: False)
    monkeypatch.setattr(adapt_mod, "_is_identity", lambda idx, n: False)
    slow = adapt_lora(model, tok, keys, neighbours[:3], cfg)
    assert fast.losses == pytest.approx(slow.losses, rel=1e-5)
    for a, b in zip(fast.lora.targets, slow.lora.targets):
        torch.testing.assert_close(a.A, b.A, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a.B, b.B, rtol=1e-4, atol=1e-5)


def test_plain_rows_in_a_mixed_batch_are_bit_exact(model_and_tokenizer, task):
    model, tok = model_and_tokenizer
    items, neighbours = task
    res = adapt_lora(model, tok, [it["id"] for it in items[:2]], neighbours[:2], CFG)
    ids = torch.tensor([tok(items[i]["question"])["input_ids"][:8] for i in range(4)])
    with torch.no_grad():
        base = model(input_ids=ids).logits
        with res.lora.attached():
            res.lora.row_adapter = torch.tensor([0, -1, 1, -1])
            mixed = model(input_ids=ids).logits
    assert torch.equal(mixed[1], base[1]) and torch.equal(mixed[3], base[3])
    assert not torch.allclose(mixed[0], base[0]) and not torch.allclose(mixed[2], base[2])


@pytest.mark.parametrize("cfg", [CFG, CFG_TOP], ids=["all-layers", "top-layer"])
def test_peft_export_reproduces_the_hooked_model(model_and_tokenizer, task, tmp_path, tiny_model_dir, cfg):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, tok = model_and_tokenizer
    items, neighbours = task
    res = adapt_lora(model, tok, [it["id"] for it in items[:2]], neighbours[:2], cfg)
    path = res.lora.save_peft(1, str(tmp_path / "adapter"), base_model_name=str(tiny_model_dir))
    fresh = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    peft_model = PeftModel.from_pretrained(fresh, path).eval()
    ids = torch.tensor([tok(items[1]["question"])["input_ids"]])
    with torch.no_grad():
        with res.lora.attached():
            res.lora.row_adapter = torch.tensor([1])
            hooked = model(input_ids=ids).logits
        exported = peft_model(input_ids=ids).logits
        base = model(input_ids=ids).logits
    torch.testing.assert_close(exported, hooked, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(exported, base)


def test_top_layers_adapt_only_the_top_and_run_the_layers_below_once(model_and_tokenizer, task, monkeypatch):
    import contextlib

    import finemed_ray.ttt.adapt as adapt_mod
    from finemed_ray.ttt.adapt import decoder_layers

    model, tok = model_and_tokenizer
    items, neighbours = task
    keys = [it["id"] for it in items[:3]]
    layers = decoder_layers(model)
    calls = [0] * len(layers)
    # count calls of each layer's MLP: it runs only when the layer really computes
    handles = [layer.mlp.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
               for i, layer in enumerate(layers)]
    try:
        res = adapt_lora(model, tok, keys, neighbours[:3], CFG_TOP)
    finally:
        for h in handles:
            h.remove()
    assert {t.name.split(".layers.")[1].split(".")[0] for t in res.lora.targets} == {str(len(layers) - 1)}
    # 8 steps: the top layer runs one forward every step (it is the one layer not checkpointed: its recomputation
    # would follow its forward at once); the one below runs its own forward once, and every later step reuses its
    # output (its forward is an identity/lookup, no computation).
    assert calls[-1] == CFG_TOP.steps and calls[:-1] == [1] * (len(layers) - 1)
    assert all(not hasattr(layer, "forward") or "forward" not in layer.__dict__ for layer in layers)  # restored
    # Same adapters as recomputing everything every step without checkpointing (the shortcut changes no number).
    monkeypatch.setattr(adapt_mod, "reuse_frozen_prefix", lambda m, first: contextlib.nullcontext())
    slow = adapt_lora(model, tok, keys, neighbours[:3], CFG_TOP.model_copy(update={"gradient_checkpointing": False}))
    assert slow.losses == pytest.approx(res.losses, rel=1e-5)
    for a, b in zip(res.lora.targets, slow.lora.targets):
        torch.testing.assert_close(a.A, b.A, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.B, b.B, rtol=1e-5, atol=1e-6)
    with pytest.raises(Exception, match="whole number of layers"):
        TTTConfig(top_layers=1.5)


def test_checkpointing_recomputes_every_adapted_layer_but_the_top(model_and_tokenizer, task):
    from finemed_ray.ttt.adapt import decoder_layers

    model, tok = model_and_tokenizer
    items, neighbours = task
    layers = decoder_layers(model)
    assert len(layers) >= 2
    calls = [0] * len(layers)
    handles = [layer.mlp.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
               for i, layer in enumerate(layers)]
    cfg = CFG_TOP.model_copy(update={"top_layers": None, "steps": 3})
    try:
        checkpointed = adapt_lora(model, tok, [items[0]["id"]], neighbours[:1], cfg)
    finally:
        for h in handles:
            h.remove()
    # forward + recomputation in backward for every layer below the top; the top layer only its forward
    assert calls == [2 * cfg.steps] * (len(layers) - 1) + [cfg.steps]
    # the model is left as it was: no layer checkpoints outside adaptation
    assert not any(getattr(layer, "gradient_checkpointing", False) for layer in layers)
    plain = adapt_lora(model, tok, [items[0]["id"]], neighbours[:1], cfg.model_copy(update={
        "gradient_checkpointing": False}))
    assert plain.losses == pytest.approx(checkpointed.losses, rel=1e-5)
    # a model that was checkpointing before (e.g. mid-training) gets every layer's flag back
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        adapt_lora(model, tok, [items[0]["id"]], neighbours[:1], cfg)
        assert all(layer.gradient_checkpointing for layer in layers)
    finally:
        model.gradient_checkpointing_disable()


def test_generation_with_per_row_adapters_through_the_hf_engine(tiny_model_dir, task):
    from finemed_ray.synth.teachers import TeacherSpec, make_teacher

    items, neighbours = task
    teacher = make_teacher(TeacherSpec(backend="hf", model=str(tiny_model_dir), max_tokens=10, batch_size=4))
    model, tok = teacher.load()
    res = adapt_lora(model, tok, [it["id"] for it in items[:2]], neighbours[:2], CFG.model_copy(update={"steps": 16}))
    reqs = [{"key": f"k{i}", "messages": [{"role": "user", "content": items[i % 2]["question"]}], "adapter": a}
            for i, a in enumerate([0, -1, 1, -1])]
    mixed = teacher.generate(reqs, lora=res.lora)
    plain = teacher.generate([{k: v for k, v in r.items() if k != "adapter"} for r in reqs])
    assert mixed[1]["text"] == plain[1]["text"] and mixed[3]["text"] == plain[3]["text"]
    alone = teacher.generate([reqs[0]], lora=res.lora)
    assert alone[0]["text"] == mixed[0]["text"]  # an adapted row does not depend on its batch mates
    # The adapted model says what its neighbours taught it.
    drug = neighbours[0][0]["messages"][-1]["content"].split()[0]
    assert drug in mixed[0]["text"] and mixed[0]["text"] != plain[0]["text"]


def test_full_parameter_update_is_restored_bit_for_bit(model_and_tokenizer, task):
    model, tok = model_and_tokenizer
    items, neighbours = task
    before = weights_digest(model)
    base = mcq_loglik_accuracy(model, tok, items[:1], synthetic_fact_continuations)["predictions"][0]["scores"]
    with full_update(model, tok, neighbours[0], TTTConfig(method="full", steps=3, lr=1e-3)) as res:
        assert weights_digest(model) != before and res.losses[-1] < res.losses[0]
        adapted = mcq_loglik_accuracy(model, tok, items[:1], synthetic_fact_continuations)["predictions"][0]["scores"]
        assert adapted != base
    assert weights_digest(model) == before


def test_bad_neighbours_and_targets_are_named():
    from finemed_ray.errors import ConfigError, DataError

    with pytest.raises(DataError, match="needs prompt \\+ completion"):
        neighbour_messages({"id": "x", "prompt": [{"role": "user", "content": "q"}]})
    assert neighbour_messages({"prompt": "q?", "completion": "a."})[-1] == {"role": "assistant", "content": "a."}
    dpo = {"prompt": [{"role": "user", "content": "q?"}], "chosen": [{"role": "assistant", "content": "long a."}]}
    assert neighbour_messages(dpo)[-1]["content"] == "long a."
    with pytest.raises(ConfigError, match="no nn.Linear"):
        BatchedLoRA(torch.nn.Sequential(torch.nn.Linear(2, 2)), ["a"], target_modules=["q_proj"])


# ------------------------------------------------------------------------------------------------ mixed precision
def test_precision_auto_is_bfloat16_only_for_float32_models_on_cuda(model_and_tokenizer):
    import finemed_ray.ttt.adapt as adapt_mod

    model, _ = model_and_tokenizer
    assert next(model.parameters()).device.type == "cpu"
    assert adapt_mod.adaptation_dtype(model, "float32") is None
    assert adapt_mod.adaptation_dtype(model, "bfloat16") is torch.bfloat16
    assert adapt_mod.adaptation_dtype(model, "auto") is None  # CPU: opt-in only (oneDNN's per-shape caches)
    half = torch.nn.Linear(4, 4).to(torch.bfloat16)  # a model already in half precision: nothing to autocast
    assert adapt_mod.adaptation_dtype(half, "auto") is None and adapt_mod.adaptation_dtype(half, "bfloat16") is None


def test_frozen_linear_function_matches_autocast_linear():
    from finemed_ray.ttt.adapt import _FrozenLinearFunction

    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, requires_grad=True)
    w, b = torch.randn(8, 16), torch.randn(8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = torch.nn.functional.linear(x, w, b)
    (g_ref,) = torch.autograd.grad(ref.float().square().sum(), x)
    out = _FrozenLinearFunction.apply(x, w, b, torch.bfloat16)
    (g,) = torch.autograd.grad(out.float().square().sum(), x)
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref)
    assert g.dtype == torch.float32
    torch.testing.assert_close(g, g_ref, rtol=2e-2, atol=2e-2)


def test_bfloat16_adaptation_keeps_no_cast_weights_and_learns_like_float32(model_and_tokenizer, task):
    """bfloat16 steps save no bfloat16 copy of any weight for backward (plain autocast would keep one per linear
    of the adapted layers and the LM head), leave the base weights and their dtype as they were, and train the
    same adapters as float32 up to bfloat16 rounding."""
    model, tok = model_and_tokenizer
    items, neighbours = task
    keys = [it["id"] for it in items[:3]]
    weight_shapes = {tuple(p.shape) for n, p in model.named_parameters() if p.dim() == 2}
    digest = weights_digest(model)
    saved: list[tuple[torch.dtype, tuple]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append((t.dtype, tuple(t.shape)))
        return t

    cfg = CFG.model_copy(update={"steps": 2, "precision": "bfloat16"})
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        low = adapt_lora(model, tok, keys, neighbours[:3], cfg)
    assert any(dtype == torch.bfloat16 for dtype, _ in saved)  # the steps really ran in bfloat16
    assert not [shape for dtype, shape in saved if dtype == torch.bfloat16 and shape in weight_shapes]
    assert weights_digest(model) == digest and next(model.parameters()).dtype == torch.float32
    assert all(t.A.dtype == torch.float32 and t.B.dtype == torch.float32 for t in low.lora.targets)
    ref = adapt_lora(model, tok, keys, neighbours[:3], cfg.model_copy(update={"precision": "float32"}))
    assert low.losses == pytest.approx(ref.losses, rel=2e-2)
    for a, b in zip(low.lora.targets, ref.lora.targets):
        assert (a.B - b.B).norm() <= 0.1 * b.B.norm(), a.name
    # the patched forwards are gone: the model computes in float32 again
    assert not any("forward" in m.__dict__ for m in model.modules() if isinstance(m, torch.nn.Linear))


def test_adaptation_frees_its_state_and_trims_the_heap(model_and_tokenizer, task, monkeypatch):
    """After the steps: no gradient kept on the adapters, and the C heap's free pages handed back once (glibc's
    malloc_trim; on Linux CI it must be available)."""
    import sys

    from finemed_ray.ttt import adapt

    assert adapt.release_free_heap() is (sys.platform.startswith("linux"))
    calls = []
    real = adapt.release_free_heap
    monkeypatch.setattr(adapt, "release_free_heap", lambda: calls.append(1) or real())
    model, tok = model_and_tokenizer
    items, neighbours = task
    res = adapt.adapt_lora(model, tok, [it["id"] for it in items[:2]], neighbours[:2], CFG.model_copy(update={"steps": 2}))
    assert calls == [1] and len(res.losses) == 2
    assert all(p.grad is None and not p.requires_grad for p in res.lora.parameters())
    adapt.adapt_lora(model, tok, ["q"], [neighbours[0]], CFG.model_copy(update={"steps": 0}))
    assert calls == [1]  # nothing trained, nothing to trim
