"""Multiple-choice evaluation by log-likelihood: which option's reply does the chat model find most likely?

For every option a *continuation* (the assistant reply that would pick that option) is scored after the prompt
rendered with the tokenizer's chat template and its generation prompt; the option with the highest score wins.
Nothing is generated, so the result is deterministic, cheap, and meaningful even for a model too small or too
undertrained to follow an answer format.

Tokenisation matches training (:mod:`finemed_ray.data.tokenize`): the prompt is rendered to text and tokenised
with ``add_special_tokens=False``; the continuation is tokenised on its own and its ids are *appended* (the joined
string is never re-tokenised, so a merge across the boundary cannot move tokens between prompt and continuation),
followed by the template's end-of-turn token (``<|im_end|>`` for ChatML). Scoring the end of turn makes an option
that is merely the prefix of a longer reply pay for stopping there. The newline some templates put after the end of
turn is formatting between turns, never generated, and not scored.

With byte-level BPE tokenizers (GPT-2 / Llama-3 / Qwen style, and the tiny test tokenizer) the appended ids are
exactly what tokenising the whole rendered conversation gives, because the generation prompt ends in a newline
and the pre-tokenizer always splits there. SentencePiece tokenizers that add a prefix space to a standalone
string may differ by that space; the scores then stay comparable across options but are not byte-identical to
training.

Continuation builders (``build_continuations(item) -> list[str]``, one string per option, in option order):

* ``finemed_ray.toy.fact_scoring`` -- the toy medical-facts task of the demo and the tests: each option in the
  answer template the toy SFT rows train on ("Metformin is used to treat type 2 diabetes."; fact recall), or as
  the full training answer of its own fact (whether a model understands held-out question wordings).
* :func:`benchmark_continuations` -- generic benchmark MCQ (MedQA / MedMCQA / PubMedQA / MMLU rows, raw or
  read by :func:`finemed_ray.mcq.parse_item`): ``"The answer is B. <option text>"``. Pair it with
  :func:`benchmark_prompt`, which lists the lettered options in the question. Letter *and* text are scored
  because the letter alone is one token whose probability mostly reflects letter bias, and the text alone ignores
  the listed options; a chat model asked to pick an option naturally says both. The shared ``"The answer is "``
  prefix costs every option the same log-probability, so it cannot change the ranking under ``normalize="sum"``;
  under ``"mean"`` it slightly damps length effects.

Scores: ``normalize="sum"`` is the total log-probability of the continuation tokens (end of turn included),
``"mean"`` divides it by their number (the usual length normalisation; the default, since options differ in
length). Ties go to the earlier option.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from typing import Any, Literal

from finemed_ray.data.tokenize import DEFAULT_SYSTEM_PROMPT
from finemed_ray.data.tokenize import with_system_prompt
from finemed_ray.errors import DataError
from finemed_ray.mcq import MCQItem, parse_item, row_id

log = logging.getLogger(__name__)

Normalize = Literal["mean", "sum"]
NORMALIZE = ("mean", "sum")
_PROBE = "\u2063finemed-probe\u2063"  # text no template rewrites; locates the reply inside a rendered turn


# ----------------------------------------------------------------------------------------------- tokenisation
def _render(tokenizer: Any, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def end_of_turn_ids(tokenizer: Any, messages: list[dict]) -> list[int]:
    """The token ids the chat template closes an assistant reply to ``messages`` with, up to and including the
    first special token (``[<|im_end|>]`` for ChatML, ``[<|eot_id|>]`` for Llama 3). ``[]`` when the template
    closes the turn with no special token or cannot be split (then only the reply text is scored)."""
    before = _render(tokenizer, messages, True)
    through = _render(tokenizer, [*messages, {"role": "assistant", "content": _PROBE}], False)
    at = through.find(_PROBE, len(before)) if through.startswith(before) else -1
    if at < 0:
        log.warning("chat template is not prefix-stable; scoring continuations without an end-of-turn token")
        return []
    special = set(tokenizer.all_special_ids)
    suffix = _ids(tokenizer, through[at + len(_PROBE) :])
    for k, tid in enumerate(suffix):
        if tid in special:
            return suffix[: k + 1]
    return []


def encode_choices(
    tokenizer: Any,
    prompt_messages: list[dict],
    continuations: Sequence[str],
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    add_end_of_turn: bool = True,
) -> tuple[list[int], list[list[int]]]:
    """(prompt ids, one id list per continuation): what :func:`score_choices` scores, exposed for inspection.

    ``system_prompt`` is added as a system turn when the conversation has none (as SFT data preparation does);
    ``None`` adds nothing."""
    if not prompt_messages:
        raise DataError("prompt_messages: empty conversation; give at least the user's question")
    if prompt_messages[-1].get("role") == "assistant":
        raise DataError("prompt_messages: the last turn is the assistant's; the continuation is the reply to score")
    messages = with_system_prompt(list(prompt_messages), system_prompt)
    prompt = _ids(tokenizer, _render(tokenizer, messages, True))
    eot = end_of_turn_ids(tokenizer, messages) if add_end_of_turn else []
    conts = []
    for k, text in enumerate(continuations):
        if not isinstance(text, str):
            raise DataError(f"continuation {k}: expected a string, got {type(text).__name__}")
        ids = _ids(tokenizer, text) + eot
        if not ids:
            raise DataError(f"continuation {k}: empty (no tokens to score)")
        conts.append(ids)
    return prompt, conts


# ----------------------------------------------------------------------------------------------- scoring
def _accepts_logits_to_keep(model: Any) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def score_sequences(
    model: Any,
    pad_id: int,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    normalize: Normalize = "mean",
    batch_size: int = 16,
) -> list[float]:
    """Log-likelihood of each ``cont`` after its ``prompt`` for ``(prompt_ids, cont_ids)`` pairs.

    Sequences are right-padded (so real tokens keep positions ``0..n-1`` and attend only to real tokens: no
    position-id fix-up needed), sorted by length to limit padding, and run ``batch_size`` at a time under
    ``torch.no_grad``. Only the logits at continuation positions are materialised (via ``logits_to_keep`` when
    the model supports it) and cast to float32 before the log-softmax."""
    import torch

    if normalize not in NORMALIZE:
        raise ValueError(f"normalize={normalize!r}: expected one of {NORMALIZE}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    for k, (prompt, cont) in enumerate(pairs):
        if not prompt or not cont:
            raise DataError(f"sequence {k}: the prompt and the continuation must both have tokens")
    device = next(model.parameters()).device
    keep = _accepts_logits_to_keep(model)
    order = sorted(range(len(pairs)), key=lambda k: len(pairs[k][0]) + len(pairs[k][1]))
    scores: list[float] = [0.0] * len(pairs)
    with torch.no_grad():
        for b in range(0, len(order), batch_size):
            idx = order[b : b + batch_size]
            seqs = [list(pairs[k][0]) + list(pairs[k][1]) for k in idx]
            width = max(map(len, seqs))
            input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for r, seq in enumerate(seqs):
                input_ids[r, : len(seq)] = torch.tensor(seq, dtype=torch.long)
                attention_mask[r, : len(seq)] = 1
            # Logit at position t predicts token t+1: the continuation is predicted from positions
            # len(prompt)-1 .. len(seq)-2. Keep the logits from the earliest such position to the end.
            first = min(len(pairs[k][0]) for k in idx) - 1
            kwargs: dict[str, Any] = {"logits_to_keep": width - first} if keep else {}
            out = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **kwargs)
            logits = out.logits
            offset = width - logits.shape[1]  # absolute position of logits[:, 0]
            for r, k in enumerate(idx):
                p, c = len(pairs[k][0]), len(pairs[k][1])
                rows = logits[r, p - 1 - offset : p - 1 + c - offset].float()
                target = torch.tensor(pairs[k][1], dtype=torch.long, device=rows.device)
                logp = torch.log_softmax(rows, dim=-1).gather(-1, target[:, None]).sum().item()
                scores[k] = logp / c if normalize == "mean" else logp
    return scores


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return 0 if pad is None else int(pad)  # padded positions are masked and never scored; any id will do


def score_choices(
    model: Any,
    tokenizer: Any,
    prompt_messages: list[dict],
    continuations: Sequence[str],
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    normalize: Normalize = "mean",
    add_end_of_turn: bool = True,
    batch_size: int = 16,
) -> list[float]:
    """Log-likelihood of each continuation as the assistant's reply to ``prompt_messages`` (one float each).

    The conversation is rendered with the chat template and its generation prompt; each continuation's ids
    (tokenised on their own), plus the template's end-of-turn token when ``add_end_of_turn``, are appended and
    only those tokens are scored. ``normalize``: ``"mean"`` (per token) or ``"sum"``."""
    prompt, conts = encode_choices(tokenizer, prompt_messages, continuations, system_prompt, add_end_of_turn)
    return score_sequences(model, _pad_id(tokenizer), [(prompt, c) for c in conts], normalize, batch_size)


# ----------------------------------------------------------------------------------------------- MCQ items
def _mcq(item: Any) -> MCQItem:
    try:
        return parse_item(item)
    except ValueError as exc:
        raise DataError(f"MCQ item {_item_name(item)}: {exc}") from exc


def mcq_options(item: Any) -> list[tuple[str, str]]:
    """``[(letter, text), ...]`` of an MCQ item (options as a ``{letter: text}`` dict or a ``[{key, text}]``
    list, read by :func:`finemed_ray.mcq.parse_item`); DataError naming the item and field when it is unusable."""
    return list(_mcq(item).options.items())


def mcq_gold(item: Any) -> str:
    """The gold option letter; DataError when it is not among the item's options."""
    return _mcq(item).answer


def _item_name(item: Any) -> str:
    rid = row_id(item) if isinstance(item, dict) else None
    return "(no id)" if rid is None else repr(rid)


def question_prompt(item: dict) -> list[dict]:
    """The question alone as the user turn (the synthetic task's training format)."""
    return [{"role": "user", "content": item["question"]}]


def benchmark_prompt(item: dict) -> list[dict]:
    """Question, then one ``"A. text"`` line per option, then an instruction to answer with a letter."""
    lines = "\n".join(f"{k}. {t}" for k, t in mcq_options(item))
    text = f"{item['question']}\n\n{lines}\n\nAnswer with the letter and text of the correct option."
    return [{"role": "user", "content": text}]


def benchmark_continuations(item: dict) -> list[str]:
    """``"The answer is B. <option text>"`` for every option (see the module docstring for why)."""
    return [f"The answer is {k}. {t}" for k, t in mcq_options(item)]


def mcq_loglik_accuracy(
    model: Any,
    tokenizer: Any,
    items: Sequence[dict],
    build_continuations: Callable[[dict], list[str]],
    build_prompt: Callable[[dict], list[dict]] = question_prompt,
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    normalize: Normalize = "mean",
    add_end_of_turn: bool = True,
    batch_size: int = 16,
) -> dict[str, Any]:
    """Accuracy of picking each item's highest-scoring option.

    Returns ``{"accuracy", "n", "correct", "chance", "normalize", "predictions"}``; ``chance`` is the mean of
    ``1 / number of options`` over the items, and each prediction is ``{"id", "gold", "pred", "correct",
    "scores": {letter: score}}``. All items are validated (DataError naming the item) before the model runs;
    their (option) sequences are batched together across items."""
    if not items:
        raise DataError("no MCQ items to evaluate")
    pairs: list[tuple[list[int], list[int]]] = []
    plan: list[tuple[Any, list[str], str, int]] = []  # (id, letters, gold, first pair index)
    for n, item in enumerate(items):
        options = mcq_options(item)
        gold = mcq_gold(item)
        conts = build_continuations(item)
        if len(conts) != len(options):
            raise DataError(
                f"MCQ item {_item_name(item)}: build_continuations gave {len(conts)} continuations for "
                f"{len(options)} options"
            )
        prompt, ids = encode_choices(tokenizer, build_prompt(item), conts, system_prompt, add_end_of_turn)
        plan.append((item.get("id", n), [k for k, _ in options], gold, len(pairs)))
        pairs.extend((prompt, c) for c in ids)
    scores = score_sequences(model, _pad_id(tokenizer), pairs, normalize, batch_size)
    predictions = []
    for item_id, letters, gold, start in plan:
        item_scores = scores[start : start + len(letters)]
        pred = letters[max(range(len(letters)), key=lambda j: (item_scores[j], -j))]
        predictions.append(
            {"id": item_id, "gold": gold, "pred": pred, "correct": pred == gold,
             "scores": dict(zip(letters, item_scores))}
        )
    correct = sum(p["correct"] for p in predictions)
    return {
        "accuracy": correct / len(predictions),
        "n": len(predictions),
        "correct": correct,
        "chance": sum(1 / len(letters) for _, letters, _, _ in plan) / len(plan),
        "normalize": normalize,
        "predictions": predictions,
    }
