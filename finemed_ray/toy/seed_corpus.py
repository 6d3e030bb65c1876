"""A small, licence-clean seed corpus for the synthesis demo: twelve short medical texts per fact of
:mod:`finemed_ray.toy.sample` (64 facts -> 768 texts) plus one planted contaminated text.

The texts were written for this project from the fact tables (CC0); they are simplified teaching prose for a toy
task, not medical advice. Each text states its fact (drug -> indication, or disease -> first-line test) and has one
of these forms, named by its heading:

- variants 0-2 and 6-8, common texts: a reference entry (``Formulary entry:`` for drugs, ``Reference entry:`` for
  diseases), a clinic note, a patient leaflet, and three more headings with the other wording of the same forms;
- variants 3-5 and 9-11, case discussions (``Case discussion:``, ``Teaching round:``, ``Handover note:``, ...):
  the offline teacher scores their questions complex, so they become reasoning dialogues and DPO pairs.

Variant v gets train question wording :func:`paraphrase_of` (sample.py's 0-2 for variants 0-5, 5-7 for 6-11), so
every one of the six train wordings of every fact reaches both the SFT dialogues and the reasoning / DPO data. Six
wordings, not three: the tiny model then reads unseen wordings inside its Thought far better (README, "What each
stage teaches the tiny model").

No text contains a held-out question paraphrase (sample.py's indices 3 and 4) - except the single planted text
(``Exam practice item:``), which quotes one held-out multiple-choice question of
``sample_mcq_items(paraphrases="heldout")`` verbatim, the way copied exam material ends up in web corpora. The
synthesis demo configures decontamination against those MCQ items, so that text must end up in the quarantine.
"""

from __future__ import annotations

import json
from typing import Any

from finemed_ray.toy.sample import (CORPUS_TRAIN_PARAPHRASES, DISEASE_TESTS, DRUG_CLASSES, DRUG_INDICATIONS,
                                    sample_mcq_items)

__all__ = ["COMPLEX_VARIANTS", "SOURCE", "VARIANT_HEADINGS", "broken_seed_lines", "paraphrase_of", "PLANTED_HEADING", "planted_mcq_item", "seed_corpus_rows",
           "write_seed_corpus"]

SOURCE = "finemed-ray seed corpus (written for the project, CC0)"
N_VARIANTS = 12
COMPLEX_VARIANTS = (3, 4, 5, 9, 10, 11)  # case discussions: the teacher scores their questions complex

# variant -> heading, per fact type ("drug" | "test"), as in sample.py's fact-type names.
VARIANT_HEADINGS: dict[str, tuple[str, ...]] = {
    "drug": ("Formulary entry:", "Clinic note:", "Patient leaflet:", "Case discussion:", "Teaching round:",
             "Handover note:", "Drug summary:", "Outpatient letter:", "Medicine guide:", "Case review:",
             "Ward round:", "Morning report:"),
    "test": ("Reference entry:", "Clinic note:", "Patient leaflet:", "Case discussion:", "Teaching round:",
             "Handover note:", "Disease summary:", "Outpatient letter:", "Health guide:", "Case review:",
             "Ward round:", "Morning report:"),
}
PLANTED_HEADING = "Exam practice item:"

# Two wordings per variant (picked by the fact's index), so neighbouring texts do not read identically.
_DRUG_TEXTS: tuple[tuple[str, str], ...] = (
    (
        "{heading} {Drug} is {drug_class}. It is used to treat {indication}. Before prescribing, check the dose "
        "against kidney and liver function and review interactions with the patient's other medicines.",
        "{heading} {Drug} ({drug_class}). Main indication: {indication}. The prescriber should confirm the "
        "diagnosis, explain common side effects and review at follow-up whether the medicine is still needed.",
    ),
    (
        "{heading} The patient was seen today for {indication}. After discussing the options we started "
        "{drug}, {drug_class}, which is used to treat {indication}. A review is booked to check the response "
        "and any side effects.",
        "{heading} Reviewed in clinic. {Drug} was prescribed today for {indication}; {drug} is {drug_class}. "
        "The patient was told how to take it, what side effects to expect and when to come back.",
    ),
    (
        "{heading} You have been prescribed {drug}. It is {drug_class}, and it is used to treat {indication}. Take "
        "it exactly as your doctor or pharmacist told you and ask them before stopping it.",
        "{heading} About {drug}: this medicine is {drug_class}. Doctors prescribe it for {indication}. Tell your "
        "doctor about any other medicines you take and about side effects you notice.",
    ),
    (
        "{heading} On the teaching round the team looked at a medication list that included {drug}. The "
        "residents were asked why it had been prescribed. {Drug} is {drug_class}, and its indication here was "
        "{indication}; reasoning from the drug class to the indication helps when reconciling medicines.",
        "{heading} A student presenting a patient could not say why {drug} was on the chart. The consultant "
        "walked through it: {drug} is {drug_class}, and it is given for {indication}. Checking each medicine "
        "against a documented indication prevents errors at handover.",
        "{heading} An admitted patient brought a bag of medicines, among them {drug}. The junior doctor had to "
        "work out what each was for before writing the drug chart: {drug} is {drug_class}, used to treat "
        "{indication}, so the indication was documented and the medicine continued.",
    ),
)
_TEST_TEXTS: tuple[tuple[str, str], ...] = (
    (
        "{heading} {Disease}. When {disease} is suspected, the first-line test is {test}. Further "
        "investigations depend on that result and on the clinical picture.",
        "{heading} {Disease} - diagnosis. The workup of {disease} starts with {test}, the first-line test. "
        "More specialised tests are reserved for unclear or complicated cases.",
    ),
    (
        "{heading} Today's symptoms raised concern for {disease}. {Test} was ordered as the first-line test, "
        "and the patient was told how the result will guide the next steps. Review booked once the result is "
        "available.",
        "{heading} Assessment: possible {disease}. Plan: {test} first, as the first-line test, then review "
        "with the result. Safety-netting advice was given.",
    ),
    (
        "{heading} Your doctor thinks you may have {disease}. The first test you will have is {test}, the "
        "first-line test for it. Your doctor will explain the result and what happens next.",
        "{heading} Checking for {disease}: most people first have {test}, which is the first-line test. "
        "Other tests are only needed if this one does not give a clear answer.",
    ),
    (
        "{heading} The team discussed a patient in whom {disease} was one of the leading possibilities. "
        "Before any advanced imaging or referral, the registrar asked what to do first; the answer was {test}, "
        "the first-line test for {disease}. Starting with the first-line test keeps the workup quick and avoids "
        "unnecessary procedures.",
        "{heading} At the morning meeting a resident proposed several investigations for suspected {disease}. "
        "The attending pointed out that {test} is the first-line test for {disease} and should come first; "
        "the rest depends on what it shows.",
        "{heading} An overnight admission was handed over with {disease} suspected and no tests done yet. The "
        "day team weighed the options and started with {test}, the first-line test for {disease}, before "
        "deciding on anything more invasive.",
    ),
)


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _template(texts: tuple[tuple[str, ...], ...], i: int, variant: int) -> str:
    """Common variants 0-2 use texts[variant] (two wordings, by fact index), 6-8 the other wording of the same
    form; the case discussions 3-5 and 9-11 share texts[3]'s three wordings, rotated so that one fact's three case
    texts of each group all differ."""
    if variant in COMPLEX_VARIANTS:
        cases = texts[3]
        return cases[(i + variant) % len(cases)]
    return texts[variant % 6][(i + variant // 6) % 2]


def _fact_text(kind: str, i: int, variant: int) -> str:
    if kind == "drug":
        drug, indication = DRUG_INDICATIONS[i][:2]
        return _template(_DRUG_TEXTS, i, variant).format(
            heading=VARIANT_HEADINGS[kind][variant], drug=drug, Drug=_cap(drug), drug_class=DRUG_CLASSES[drug],
            indication=indication)
    disease, test = DISEASE_TESTS[i][:2]
    return _template(_TEST_TEXTS, i, variant).format(
        heading=VARIANT_HEADINGS[kind][variant], disease=disease, Disease=_cap(disease), test=test, Test=_cap(test))


def paraphrase_of(variant: int) -> int:
    """The train question wording (sample.py paraphrase 0-2 or 5-7) the offline teacher writes for a text
    variant: 0-5 -> 0, 1, 2, 0, 1, 2 and 6-11 -> 5, 6, 7, 5, 6, 7."""
    return CORPUS_TRAIN_PARAPHRASES[variant % 3 + 3 * (variant // 6)]


def planted_mcq_item() -> dict[str, Any]:
    """The held-out MCQ item (of ``sample_mcq_items(paraphrases="heldout")``) the planted text quotes."""
    return sample_mcq_items(paraphrases="heldout")[0]


def _planted_text(item: dict[str, Any]) -> str:
    options = "; ".join(f"{k}) {v}" for k, v in item["options"].items())
    return (f'{PLANTED_HEADING} A board-review booklet asks "{item["question"]}" with the options {options}. '
            f"The keyed answer is {item['answer_idx']}, {item['answer']}.")


def seed_corpus_rows() -> list[dict[str, Any]]:
    """The corpus, in a fixed order: for each fact (drugs, then diseases) its twelve variants, then the planted
    text. Keys: ``id`` (``seed-<kind>-<fact>-v<variant>`` / ``seed-planted-<mcq id>``), ``text``, ``source``,
    ``kind``, ``fact``, ``variant`` (None for the planted text) and ``planted`` (bool)."""
    rows: list[dict[str, Any]] = []
    for kind, table in (("drug", DRUG_INDICATIONS), ("test", DISEASE_TESTS)):
        for i in range(len(table)):
            for v in range(N_VARIANTS):
                rows.append({"id": f"seed-{kind}-{i:02d}-v{v}", "text": _fact_text(kind, i, v), "source": SOURCE,
                             "kind": kind, "fact": i, "variant": v, "planted": False})
    item = planted_mcq_item()
    kind, fact = item["id"].split("-")[1], int(item["id"].split("-")[2])
    rows.append({"id": f"seed-planted-{item['id']}", "text": _planted_text(item), "source": SOURCE, "kind": kind,
                 "fact": fact, "variant": None, "planted": True})
    return rows


def broken_seed_lines() -> list[str]:
    """Two deliberately broken JSONL lines (a truncated object, a row with an empty text): the demo appends them so
    a run shows bad input quarantined with a reason, never dropped silently."""
    return ['{"id": "seed-broken-json", "text": "Metformin is a bigu', json.dumps({"id": "seed-empty-text", "text": " "})]


def write_seed_corpus(uri: str, with_broken_lines: bool = False) -> str:
    """Write :func:`seed_corpus_rows` as JSONL to ``uri`` (a local path or ``s3://``), plus
    :func:`broken_seed_lines` when asked; returns ``uri``."""
    from finemed_ray import storage

    lines = [json.dumps(r, ensure_ascii=False) for r in seed_corpus_rows()]
    storage.write_text(uri, "".join(line + "\n" for line in lines + (broken_seed_lines() if with_broken_lines else [])))
    return uri
