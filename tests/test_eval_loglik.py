"""Multiple-choice log-likelihood scoring: exact token accounting, padding invariance, and the CI claim that SFT
lifts the tiny model from chance to well above it on held-out question paraphrases.

The trained-model tests share one in-process training run (module fixture: plain torch AdamW, 200 steps of 32
conversations, about 25 s of one CPU core)."""

from __future__ import annotations

import time

import pytest
import torch

from finemed_ray.toy.sample import DEFAULT_SYSTEM_PROMPT, sample_mcq_items, sample_sft_rows
from finemed_ray.data.tokenize import IGNORE_INDEX, tokenize_conversation, with_system_prompt
from finemed_ray.errors import DataError
from finemed_ray.eval.loglik import (
    benchmark_continuations,
    benchmark_prompt,
    encode_choices,
    end_of_turn_ids,
    mcq_loglik_accuracy,
    question_prompt,
    score_choices,
    score_sequences,
)
from finemed_ray.toy.fact_scoring import synthetic_fact_continuations, synthetic_option_fact_continuations
from finemed_ray.toy.tiny_model import IM_END, build_tiny_model, build_tiny_tokenizer

QUESTION = [{"role": "user", "content": "What is metformin used to treat?"}]
OPTIONS = [
    "Metformin is used to treat type 2 diabetes.",
    "Metformin is used to treat high blood pressure.",
    "Metformin is used to treat chemotherapy-induced nausea.",
    "Metformin is used to treat epilepsy.",
]
BUILDERS = [synthetic_fact_continuations, synthetic_option_fact_continuations]

# Training recipe for the "training works" check (measured: held-out accuracy 1.00 / 0.73 for the two builders
# with seed 0; 0.97-1.00 / 0.73-0.88 over seeds 0-2; 100 steps give ~0.98 / ~0.66).
TRAIN_STEPS = 200
TRAIN_BATCH = 32
TRAIN_LR = 5e-3


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def untrained(tokenizer):
    return build_tiny_model(tokenizer, seed=0)


@pytest.fixture(scope="module")
def heldout_items():
    return sample_mcq_items(seed=0, paraphrases="heldout")


# ------------------------------------------------------------------------------------------- exact scoring
def test_tokens_scored_are_the_tokens_training_supervises(tokenizer):
    """Prompt ids + continuation ids (tokenised separately) equal the training tokenisation of the whole
    conversation, and the continuation is exactly its assistant-labelled tokens except the newline after the end
    of turn (formatting between turns, never generated)."""
    prompt, (cont,) = encode_choices(tokenizer, QUESTION, OPTIONS[:1])
    conv = with_system_prompt([*QUESTION, {"role": "assistant", "content": OPTIONS[0]}], DEFAULT_SYSTEM_PROMPT)
    train = tokenize_conversation(tokenizer, conv, max_length=512)
    labelled = [i for i, lab in enumerate(train["labels"]) if lab != IGNORE_INDEX]
    assert train["input_ids"][: len(prompt) + len(cont)] == prompt + cont
    assert labelled[0] == len(prompt)
    assert labelled[:-1] == list(range(len(prompt), len(prompt) + len(cont)))
    assert tokenizer.decode(train["input_ids"][labelled[-1]]) == "\n"
    assert cont[-1] == tokenizer.convert_tokens_to_ids(IM_END)
    assert end_of_turn_ids(tokenizer, QUESTION) == [tokenizer.convert_tokens_to_ids(IM_END)]
    assert tokenizer.decode(cont) == OPTIONS[0] + IM_END


def test_score_matches_hand_computation(untrained, tokenizer):
    """Sum / mean of the continuation's token log-probs, from one plain forward pass over the full sequence."""
    conv = with_system_prompt([*QUESTION, {"role": "assistant", "content": OPTIONS[0]}], DEFAULT_SYSTEM_PROMPT)
    train = tokenize_conversation(tokenizer, conv, max_length=512)
    ids = torch.tensor([train["input_ids"]])
    positions = [i for i, lab in enumerate(train["labels"]) if lab != IGNORE_INDEX][:-1]  # through <|im_end|>
    with torch.no_grad():
        logp = torch.log_softmax(untrained(input_ids=ids).logits[0].double(), dim=-1)
    expected = sum(logp[t - 1, ids[0, t]].item() for t in positions)

    (total,) = score_choices(untrained, tokenizer, QUESTION, OPTIONS[:1], normalize="sum")
    (mean,) = score_choices(untrained, tokenizer, QUESTION, OPTIONS[:1], normalize="mean")
    assert total == pytest.approx(expected, abs=1e-3)
    assert mean == pytest.approx(expected / len(positions), abs=1e-4)
    assert total < 0

    # Without the end-of-turn token, the last position is simply not scored.
    (no_eot,) = score_choices(untrained, tokenizer, QUESTION, OPTIONS[:1], normalize="sum", add_end_of_turn=False)
    assert no_eot == pytest.approx(expected - logp[positions[-1] - 1, ids[0, positions[-1]]].item(), abs=1e-3)


class _NoLogitsToKeep(torch.nn.Module):
    """A causal LM whose forward has no ``logits_to_keep``: the scorer must fall back to full logits."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask)


@pytest.mark.parametrize("wrap", [False, True], ids=["logits_to_keep", "full-logits"])
@pytest.mark.parametrize("normalize", ["sum", "mean"])
def test_batched_scores_equal_one_at_a_time(untrained, tokenizer, wrap, normalize):
    model = _NoLogitsToKeep(untrained) if wrap else untrained
    prompt, conts = encode_choices(tokenizer, QUESTION, OPTIONS)
    assert len({len(c) for c in conts}) > 1  # different lengths: the batch is padded
    one = [score_choices(model, tokenizer, QUESTION, [o], normalize=normalize)[0] for o in OPTIONS]
    batch = score_choices(model, tokenizer, QUESTION, OPTIONS, normalize=normalize)
    assert batch == pytest.approx(one, abs=1e-4)

    # Across prompts of different lengths too (how mcq_loglik_accuracy batches), in odd-sized batches.
    other_prompt, other_conts = encode_choices(
        tokenizer, [{"role": "user", "content": "A patient may have gallstones. Which test comes first?"}],
        ["The first-line test for gallstones is right upper quadrant ultrasound.", "Laryngoscopy."],
    )
    pairs = [(prompt, c) for c in conts] + [(other_prompt, c) for c in other_conts]
    singles = [score_sequences(model, tokenizer.pad_token_id, [p], normalize)[0] for p in pairs]
    for batch_size in (3, 16):
        assert score_sequences(model, tokenizer.pad_token_id, pairs, normalize, batch_size) == pytest.approx(
            singles, abs=1e-4
        )


def test_scoring_does_not_track_gradients_or_change_mode(untrained, tokenizer):
    untrained.eval()
    score_choices(untrained, tokenizer, QUESTION, OPTIONS)
    assert not untrained.training
    assert all(p.grad is None for p in untrained.parameters())


# ------------------------------------------------------------------------------------------- builders, errors
def test_synthetic_continuations_are_the_trained_answers(heldout_items):
    trained_answers = {m["content"] for row in sample_sft_rows(paraphrases="all") for m in row["messages"]
                       if m["role"] == "assistant"}
    for item in heldout_items:
        letters = list(item["options"])
        gold = letters.index(item["answer_idx"])
        by_question = synthetic_fact_continuations(item)
        by_option = synthetic_option_fact_continuations(item)
        assert len(by_question) == len(by_option) == 4
        assert by_question[gold] == by_option[gold] and by_question[gold] in trained_answers
        assert all(c in trained_answers for c in by_option)  # every option is some fact's true answer
        assert all(text in c for text, c in zip(item["options"].values(), by_question))
    item = next(i for i in heldout_items if i["id"].startswith("mcq-drug-00-"))
    assert synthetic_fact_continuations(item)[list(item["options"]).index(item["answer_idx"])] == (
        "Metformin is used to treat type 2 diabetes."
    )
    # Without an id the fact is found from the gold option.
    assert synthetic_fact_continuations({k: v for k, v in item.items() if k != "id"}) == (
        synthetic_fact_continuations(item)
    )


def test_benchmark_builder_on_raw_and_normalized_rows():
    raw = {"question": "Which vitamin is made in the skin?", "options": {"A": "Vitamin C", "B": "Vitamin D"},
           "answer_idx": "B"}
    normalized = {"id": "q1", "question": raw["question"],
                  "options": [{"key": "A", "text": "Vitamin C"}, {"key": "B", "text": "Vitamin D"}],
                  "answer_idx": "B", "answer": None, "subject": None}
    for row in (raw, normalized):
        assert benchmark_continuations(row) == ["The answer is A. Vitamin C", "The answer is B. Vitamin D"]
        (msg,) = benchmark_prompt(row)
        assert msg["role"] == "user" and "A. Vitamin C\nB. Vitamin D" in msg["content"]


def test_accuracy_report_shape_and_chance_with_mixed_option_counts(untrained, tokenizer):
    items = [
        {"id": "two", "question": "Is the sky blue?", "options": {"A": "yes", "B": "no"}, "answer_idx": "A"},
        {"id": "five", "question": "Pick one.", "options": dict(zip("ABCDE", "vwxyz")), "answer_idx": "E"},
    ]
    out = mcq_loglik_accuracy(untrained, tokenizer, items, benchmark_continuations, build_prompt=benchmark_prompt)
    assert out["n"] == 2 and out["chance"] == pytest.approx((1 / 2 + 1 / 5) / 2)
    assert out["accuracy"] == out["correct"] / 2
    assert [p["id"] for p in out["predictions"]] == ["two", "five"]
    for p, item in zip(out["predictions"], items):
        assert list(p["scores"]) == list(item["options"]) and p["gold"] == item["answer_idx"]
        assert p["pred"] == max(p["scores"], key=p["scores"].get)
        assert p["correct"] == (p["pred"] == p["gold"])


@pytest.mark.parametrize(
    "item, match",
    [
        ({"id": "one-option", "question": "Q?", "options": {"A": "only"}, "answer_idx": "A"}, "one-option.*2"),
        ({"id": "no-options", "question": "Q?", "options": {}, "answer_idx": "A"}, "no-options.*options"),
        ({"id": "bad-gold", "question": "Q?", "options": {"A": "x", "B": "y"}, "answer_idx": "C"},
         "bad-gold.*answer_idx"),
        ({"id": "no-gold", "question": "Q?", "options": {"A": "x", "B": "y"}}, "no-gold.*answer_idx"),
    ],
)
def test_bad_items_raise_data_error_naming_the_item(untrained, tokenizer, item, match):
    good = {"id": "ok", "question": "Q?", "options": {"A": "x", "B": "y"}, "answer_idx": "A"}
    with pytest.raises(DataError, match=match):
        mcq_loglik_accuracy(untrained, tokenizer, [good, item], benchmark_continuations)


def test_other_misuse_is_reported(untrained, tokenizer, heldout_items):
    with pytest.raises(DataError, match="no MCQ items"):
        mcq_loglik_accuracy(untrained, tokenizer, [], benchmark_continuations)
    with pytest.raises(DataError, match="3 continuations for 4 options"):
        mcq_loglik_accuracy(untrained, tokenizer, heldout_items[:1], lambda item: ["a", "b", "c"])
    with pytest.raises(DataError, match="not a synthetic-facts item"):
        synthetic_fact_continuations({"question": "Q?", "options": {"A": "x", "B": "y"}, "answer_idx": "A"})
    with pytest.raises(DataError, match="empty"):
        score_choices(untrained, tokenizer, QUESTION, [""], add_end_of_turn=False)
    with pytest.raises(ValueError, match="normalize"):
        score_choices(untrained, tokenizer, QUESTION, OPTIONS, normalize="max")


# ------------------------------------------------------------------------------------------- untrained vs trained
@pytest.mark.parametrize("builder", BUILDERS)
@pytest.mark.parametrize("normalize", ["mean", "sum"])
def test_untrained_model_is_near_chance(untrained, tokenizer, heldout_items, builder, normalize):
    out = mcq_loglik_accuracy(untrained, tokenizer, heldout_items, builder, normalize=normalize)
    assert out["n"] == 64 and out["chance"] == 0.25
    assert out["accuracy"] < 0.45, out["accuracy"]


def _batches(encoded: list[dict], steps: int, batch_size: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    for _ in range(steps):
        while len(order) < batch_size:
            order += torch.randperm(len(encoded), generator=gen).tolist()
        yield [encoded[i] for i in order[:batch_size]]
        order = order[batch_size:]


def _collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id)
    labels = torch.full((len(rows), width), IGNORE_INDEX)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


@pytest.fixture(scope="module")
def trained(tokenizer):
    """The tiny model after a short SFT run on the *train* paraphrases (assistant-only labels), single-threaded
    so the numbers do not depend on the runner's core count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        model = build_tiny_model(tokenizer, seed=0)
        rows = sample_sft_rows(seed=0, paraphrases="train")
        encoded = [tokenize_conversation(tokenizer, r["messages"], max_length=256) for r in rows]
        opt = torch.optim.AdamW(model.parameters(), lr=TRAIN_LR, betas=(0.9, 0.98), weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(  # 10-step warm-up, then linear decay to 0
            opt, lambda s: min(1.0, (s + 1) / 10) * max(0.0, 1 - s / TRAIN_STEPS)
        )
        model.train()
        losses = []
        for batch in _batches(encoded, TRAIN_STEPS, TRAIN_BATCH, seed=0):
            loss = model(**_collate(batch, tokenizer.pad_token_id)).loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
        model.eval()
        seconds = time.perf_counter() - start
        print(f"\ntrained {TRAIN_STEPS} steps in {seconds:.1f}s; loss {losses[0]:.3f} -> {losses[-1]:.4f}")
        yield model, losses
    finally:
        torch.set_num_threads(threads)


def test_training_drives_the_loss_down(trained):
    _, losses = trained
    assert losses[-1] < 0.1 * losses[0]


@pytest.mark.parametrize(
    "builder, threshold",
    [(synthetic_fact_continuations, 0.8), (synthetic_option_fact_continuations, 0.6)],
)
def test_trained_model_answers_heldout_paraphrases_far_above_chance(
    trained, tokenizer, heldout_items, builder, threshold
):
    model, _ = trained
    out = mcq_loglik_accuracy(model, tokenizer, heldout_items, builder)
    print(f"\n{builder.__name__}: held-out accuracy {out['accuracy']:.3f} (chance {out['chance']:.2f})")
    assert out["accuracy"] >= threshold
    # Held-out wordings are the point: the items really use paraphrases absent from the training rows.
    train_questions = {m["content"] for r in sample_sft_rows(paraphrases="train") for m in r["messages"]}
    assert not any(item["question"] in train_questions for item in heldout_items)


def test_only_the_option_fact_builder_needs_the_question(trained, tokenizer, heldout_items):
    """Replace every question by "Hello.": the question-subject continuations still rank well (1.00 -> 0.86
    measured; they test fact recall), while choosing among the options' own facts falls to chance (0.73 -> 0.19;
    it tests the question)."""
    model, _ = trained

    def hello(item):
        return [{"role": "user", "content": "Hello."}]

    recall = mcq_loglik_accuracy(model, tokenizer, heldout_items, synthetic_fact_continuations, build_prompt=hello)
    understanding = mcq_loglik_accuracy(
        model, tokenizer, heldout_items, synthetic_option_fact_continuations, build_prompt=hello
    )
    with_question = mcq_loglik_accuracy(
        model, tokenizer, heldout_items, synthetic_option_fact_continuations, build_prompt=question_prompt
    )
    assert recall["accuracy"] >= 0.6  # measured 0.86: the question hardly matters to this builder
    assert understanding["accuracy"] < 0.45
    assert with_question["accuracy"] - understanding["accuracy"] >= 0.2
