"""Log-likelihood continuations for the toy medical-facts task (:func:`finemed_ray.toy.sample.sample_mcq_items`):
builders for :func:`finemed_ray.eval.loglik.mcq_loglik_accuracy` that render each option in the answer templates
the toy SFT rows train on. Used by the demo and the tests; real benchmarks use
:func:`finemed_ray.eval.loglik.benchmark_continuations`."""

from __future__ import annotations

import re

from finemed_ray.errors import DataError
from finemed_ray.eval.loglik import _item_name, mcq_gold, mcq_options

__all__ = ["synthetic_fact_continuations", "synthetic_option_fact_continuations"]


_SYNTHETIC_ID = re.compile(r"^mcq-(?P<kind>[a-z]+)-(?P<index>\d+)-p\d+$")


def _synthetic_fact(item: dict) -> tuple[str, tuple[str, str, str, str]]:
    """(fact type, fact) of a :func:`sample_mcq_items` item: from its id when it parses (checked against the gold
    option), else by looking the gold option up in the fact tables."""
    from finemed_ray.toy.sample import _FACT_TYPES

    gold_text = dict(mcq_options(item))[mcq_gold(item)]
    m = _SYNTHETIC_ID.match(str(item.get("id", "")))
    if m and m["kind"] in _FACT_TYPES:
        table = _FACT_TYPES[m["kind"]][0]
        i = int(m["index"])
        if i < len(table) and table[i][1] == gold_text:
            return m["kind"], table[i]
    found = [(kind, f) for kind, spec in _FACT_TYPES.items() for f in spec[0] if f[1] == gold_text]
    if len(found) != 1:
        raise DataError(
            f"MCQ item {_item_name(item)}: not a synthetic-facts item (gold option {gold_text!r} matches "
            f"{len(found)} facts); synthetic_fact_continuations needs items from sample_mcq_items()"
        )
    return found[0]


def synthetic_fact_continuations(item: dict) -> list[str]:
    """Each option in the answer template the synthetic SFT rows were trained on, with the *question's* subject:
    ``"Metformin is used to treat <option>."`` for every option of a metformin item. Built with
    :func:`finemed_ray.toy.sample._answer`, so it can never drift from the training answers.

    Measures fact recall. The subject is the same in every continuation, so the question barely matters: the
    ranking is ``P(option | "Metformin is used to treat")``, and a trained model ranks nearly as well when the
    prompt is an unrelated "Hello." (see :func:`synthetic_option_fact_continuations` for a check that needs it)."""
    from finemed_ray.toy.sample import _answer

    kind, fact = _synthetic_fact(item)
    return [_answer(kind, (fact[0], text, fact[2], fact[3])) for _, text in mcq_options(item)]


def synthetic_option_fact_continuations(item: dict) -> list[str]:
    """Each option as the full training answer of *its own* fact (the distractors are answers of other facts in
    the same table): ``"Amlodipine is used to treat high blood pressure."`` for the distractor of a metformin
    item. Every continuation is a true statement the model was trained to say, so what separates them is whether
    the model can tell from the (possibly held-out) question which fact is asked about: this is the check that
    a model *understands the question*, and it falls to chance when the question is removed."""
    from finemed_ray.toy.sample import _FACT_TYPES, _answer

    kind, _ = _synthetic_fact(item)
    by_object = {fact[1]: fact for fact in _FACT_TYPES[kind][0]}
    out = []
    for key, text in mcq_options(item):
        if text not in by_object:
            raise DataError(f"MCQ item {_item_name(item)}: option {key} {text!r} is not a {kind!r} fact's answer")
        out.append(_answer(kind, by_object[text]))
    return out
