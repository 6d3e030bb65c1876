"""Multiple-choice accuracy from what a model *generates*: the evaluation in the mode reasoning SFT, DPO and GRPO
train. The model gets the question alone (as in training), writes its reply greedily, and the reply's final answer
is matched to one option's text. Nothing is scored under teacher forcing, so a model that learnt to reason first
("## Thought ... ## Summarization ...") is judged on the answer it actually gives, not on how likely it finds a
direct answer it was trained away from (which is what log-likelihood of direct-answer continuations measures).

Reading a reply (:func:`final_answer`):

* a reply with a ``## Summarization`` section: the answer is the text after the *last* such header (the Thought
  may name ruled-out options: only the conclusion counts);
* a reply that opens a ``## Thought`` section but never reaches a summarization: no answer (``cut_off`` when the
  token budget ran out, ``unfinished`` when the model stopped by itself);
* any other reply is a direct answer and is read whole.

Matching (:func:`match_option`): every option whose text occurs in the answer, word-bounded and normalised (case,
spacing, punctuation); an option whose text lies inside a longer matched option's text is dropped ("CT of the
abdomen" inside "non-contrast CT of the abdomen and pelvis"). One option left: that is the answer. None or several
distinct ones: no answer -- a guess would count as knowledge the model may not have.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from finemed_ray.data.tokenize import with_system_prompt
from finemed_ray.eval.loglik import mcq_gold, mcq_options, question_prompt
from finemed_ray.errors import DataError

THOUGHT_HEADER = "## Thought"
SUMMARY_HEADER = "## Summarization"

_NON_WORD = re.compile(r"[^\w]+")


def normalize(text: str) -> str:
    """Lower case, punctuation and markup to spaces, single spaces, padded with one space on each side (so a
    substring test on the result is a whole-word test)."""
    return " " + " ".join(_NON_WORD.sub(" ", text.lower()).split()) + " "


def final_answer(reply: str, cut_off: bool) -> tuple[str | None, str]:
    """``(answer text or None, form)``; form is ``reasoning``, ``direct``, ``cut_off`` or ``unfinished``."""
    if SUMMARY_HEADER in reply:
        return reply.rsplit(SUMMARY_HEADER, 1)[1].strip(), "reasoning"
    if THOUGHT_HEADER in reply:
        return None, "cut_off" if cut_off else "unfinished"
    return reply.strip(), "direct"


def match_option(answer: str | None, options: Sequence[tuple[str, str]]) -> str | None:
    """The letter of the one option whose text the answer states (see the module docstring), else None."""
    if not answer:
        return None
    text = normalize(answer)
    found = {letter: normalize(opt) for letter, opt in options if normalize(opt).strip() and normalize(opt) in text}
    kept = {k: v for k, v in found.items() if not any(v != w and v in w for w in found.values())}
    distinct = set(kept.values())
    if len(distinct) != 1:
        return None
    return next(k for k, v in kept.items())


def mcq_generation_accuracy(
    model: Any,
    tokenizer: Any,
    items: Sequence[Mapping[str, Any]],
    *,
    build_prompt: Callable[[dict], list[dict]] = question_prompt,
    system_prompt: str | None = None,
    max_new_tokens: int = 384,
    batch_size: int = 32,
) -> dict[str, Any]:
    """Greedy replies to every item, read with :func:`final_answer` and :func:`match_option`.

    Returns ``accuracy`` (no answer counts as wrong), ``n``, ``correct``, ``chance`` (mean 1/options),
    ``no_answer_rate``, ``cut_off_rate`` (replies that used the whole ``max_new_tokens`` without an end of turn),
    ``reasoning_rate`` (replies with a summarization section), ``max_new_tokens`` and ``predictions`` (id, gold,
    pred, correct, form, reply) in item order."""
    from finemed_ray.models.loading import generate_left_padded, stop_token_ids

    if not items:
        raise DataError("no MCQ items to evaluate")
    if max_new_tokens < 1:
        raise DataError(f"max_new_tokens={max_new_tokens}: must be >= 1")
    plans, prompts = [], []
    for n, item in enumerate(items):
        options, gold = mcq_options(item), mcq_gold(item)
        messages = with_system_prompt(build_prompt(dict(item)), system_prompt)
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompts.append(tokenizer(text, add_special_tokens=False)["input_ids"])
        plans.append((item.get("id", n), options, gold))
    stops = stop_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    outputs: list[list[int]] = []
    try:
        # Similar lengths batched together: less left padding to run through the model.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        by_index: dict[int, list[int]] = {}
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            for i, ids in zip(chunk, generate_left_padded(model, [prompts[i] for i in chunk], pad, max_new_tokens)):
                by_index[i] = ids
        outputs = [by_index[i] for i in range(len(prompts))]
    finally:
        model.train(was_training)
    predictions = []
    for (item_id, options, gold), ids in zip(plans, outputs):
        end = next((j for j, t in enumerate(ids) if t in stops), None)
        cut_off = end is None
        reply = tokenizer.decode(ids if cut_off else ids[:end], skip_special_tokens=True).strip()
        answer, form = final_answer(reply, cut_off)
        pred = match_option(answer, options)
        predictions.append({"id": item_id, "gold": gold, "pred": pred, "correct": pred == gold, "form": form,
                            "cut_off": cut_off, "reply": reply})
    n = len(predictions)
    correct = sum(p["correct"] for p in predictions)
    return {
        "accuracy": correct / n,
        "n": n,
        "correct": correct,
        "chance": sum(1 / len(options) for _, options, _ in plans) / n,
        "no_answer_rate": sum(p["pred"] is None for p in predictions) / n,
        "cut_off_rate": sum(p["cut_off"] for p in predictions) / n,
        "reasoning_rate": sum(p["form"] == "reasoning" for p in predictions) / n,
        "max_new_tokens": max_new_tokens,
        "predictions": predictions,
    }

