"""Synthetic medical-facts SFT data: offline, deterministic, small enough for CPU demos and tests.

Two fixed fact tables (drug -> indication, disease -> first-line test). Every fact carries a primary department
(one of :data:`DEPARTMENTS`) and a secondary one. Each fact type has five question paraphrases: the first three
are the ``train`` paraphrases, the last two are ``heldout``, so a model trained on ``train`` rows can be asked the
same facts in words it never saw (:func:`sample_mcq_items` defaults to those). Answers use one fixed template per
fact type and always contain the fact verbatim.

The facts are simplified teaching facts for a toy task, not medical advice.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable
from typing import Any, Literal

DEPARTMENTS = (
    "Internal Medicine",
    "Surgery",
    "Obstetrics & Gynecology",
    "Pediatrics",
    "Otorhinolaryngology",
    "Other",
)
from finemed_ray.data.tokenize import DEFAULT_SYSTEM_PROMPT  # noqa: E402  (re-exported)
SOURCE = "synthetic-facts"

IM, SURG, OBGYN, PED, ENT, OTHER = DEPARTMENTS

# (drug, indication, primary department, secondary department). Indications are distinct, so a question has one
# right answer and the other rows make unambiguous distractors.
DRUG_INDICATIONS: tuple[tuple[str, str, str, str], ...] = (
    ("metformin", "type 2 diabetes", IM, "Endocrinology"),
    ("levothyroxine", "hypothyroidism", IM, "Endocrinology"),
    ("amlodipine", "high blood pressure", IM, "Cardiology"),
    ("atorvastatin", "high cholesterol", IM, "Cardiology"),
    ("furosemide", "fluid overload in heart failure", IM, "Cardiology"),
    ("warfarin", "prevention of blood clots", IM, "Hematology"),
    ("omeprazole", "gastroesophageal reflux disease", IM, "Gastroenterology"),
    ("albuterol", "acute asthma symptoms", IM, "Pulmonology"),
    ("allopurinol", "prevention of gout attacks", IM, "Rheumatology"),
    ("levetiracetam", "epilepsy", IM, "Neurology"),
    ("sumatriptan", "migraine attacks", IM, "Neurology"),
    ("oseltamivir", "influenza", IM, "Infectious Diseases"),
    ("nitrofurantoin", "uncomplicated urinary tract infection", IM, "Infectious Diseases"),
    ("tamsulosin", "benign prostatic hyperplasia", SURG, "Urology"),
    ("cefazolin", "surgical site infection prophylaxis", SURG, "General Surgery"),
    ("alendronate", "osteoporosis", SURG, "Orthopedics"),
    ("heparin", "deep vein thrombosis after surgery", SURG, "Vascular Surgery"),
    ("oxytocin", "induction of labor", OBGYN, "Obstetrics"),
    ("magnesium sulfate", "seizure prevention in preeclampsia", OBGYN, "Obstetrics"),
    ("clomiphene", "ovulation induction in infertility", OBGYN, "Gynecology"),
    ("metronidazole", "bacterial vaginosis", OBGYN, "Gynecology"),
    ("palivizumab", "RSV prevention in high-risk infants", PED, "Neonatology"),
    ("caffeine citrate", "apnea of prematurity", PED, "Neonatology"),
    ("methylphenidate", "attention deficit hyperactivity disorder", PED, "Developmental Pediatrics"),
    ("amoxicillin", "acute otitis media", ENT, "Otology"),
    ("betahistine", "Meniere's disease", ENT, "Otology"),
    ("fluticasone nasal spray", "allergic rhinitis", ENT, "Rhinology"),
    ("penicillin V", "streptococcal pharyngitis", ENT, "Head and Neck"),
    ("sertraline", "major depressive disorder", OTHER, "Psychiatry"),
    ("isotretinoin", "severe acne", OTHER, "Dermatology"),
    ("latanoprost", "open-angle glaucoma", OTHER, "Ophthalmology"),
    ("ondansetron", "chemotherapy-induced nausea", OTHER, "Oncology"),
)

# (disease, first-line test, primary department, secondary department). Tests are distinct strings.
DISEASE_TESTS: tuple[tuple[str, str, str, str], ...] = (
    ("type 2 diabetes", "hemoglobin A1c", IM, "Endocrinology"),
    ("hypothyroidism", "serum TSH", IM, "Endocrinology"),
    ("acute myocardial infarction", "12-lead electrocardiogram", IM, "Cardiology"),
    ("heart failure", "echocardiography", IM, "Cardiology"),
    ("pulmonary embolism", "CT pulmonary angiography", IM, "Pulmonology"),
    ("community-acquired pneumonia", "chest X-ray", IM, "Pulmonology"),
    ("pulmonary tuberculosis", "sputum acid-fast bacilli smear", IM, "Infectious Diseases"),
    ("iron deficiency anemia", "serum ferritin", IM, "Hematology"),
    ("celiac disease", "tissue transglutaminase IgA antibodies", IM, "Gastroenterology"),
    ("Helicobacter pylori infection", "urea breath test", IM, "Gastroenterology"),
    ("chronic kidney disease", "serum creatinine with eGFR", IM, "Nephrology"),
    ("rheumatoid arthritis", "anti-CCP antibodies", IM, "Rheumatology"),
    ("acute stroke", "non-contrast head CT", IM, "Neurology"),
    ("acute appendicitis", "CT of the abdomen", SURG, "General Surgery"),
    ("gallstones", "right upper quadrant ultrasound", SURG, "General Surgery"),
    ("deep vein thrombosis", "compression ultrasound of the leg", SURG, "Vascular Surgery"),
    ("kidney stones", "non-contrast CT of the abdomen and pelvis", SURG, "Urology"),
    ("scaphoid fracture", "wrist X-ray with scaphoid views", SURG, "Orthopedics"),
    ("ectopic pregnancy", "transvaginal ultrasound", OBGYN, "Obstetrics"),
    ("gestational diabetes", "oral glucose tolerance test", OBGYN, "Obstetrics"),
    ("cervical cancer", "Pap smear with HPV testing", OBGYN, "Gynecology"),
    ("polycystic ovary syndrome", "pelvic ultrasound", OBGYN, "Gynecology"),
    ("neonatal jaundice", "total serum bilirubin", PED, "Neonatology"),
    ("developmental dysplasia of the hip", "hip ultrasound", PED, "Pediatric Orthopedics"),
    ("cystic fibrosis", "sweat chloride test", PED, "Pediatric Pulmonology"),
    ("pyloric stenosis", "abdominal ultrasound of the pylorus", PED, "Pediatric Surgery"),
    ("sensorineural hearing loss", "pure-tone audiometry", ENT, "Otology"),
    ("chronic rhinosinusitis", "nasal endoscopy", ENT, "Rhinology"),
    ("obstructive sleep apnea", "polysomnography", ENT, "Sleep Medicine"),
    ("vocal cord nodules", "laryngoscopy", ENT, "Laryngology"),
    ("open-angle glaucoma", "tonometry", OTHER, "Ophthalmology"),
    ("melanoma", "excisional skin biopsy", OTHER, "Dermatology"),
)

# Question paraphrases per fact type: 0-2 "train", 3-4 "heldout", 5-7 train wordings of the seed corpus only.
DRUG_QUESTIONS = (
    "What is {drug} used to treat?",
    "What condition is {drug} prescribed for?",
    "Which condition is {drug} indicated for?",
    "A patient was started on {drug}. What is it most likely treating?",
    "For which condition would a doctor typically prescribe {drug}?",
    # 5-7: three more train wordings. Only the demo's seed corpus asks them (finemed_ray.toy.seed_corpus): with six
    # train wordings per fact, the tiny model reads unseen wordings far better inside its Thought (README, "What
    # each stage teaches the tiny model"). One is case-style and opens "A patient ...", as real questions often
    # do and both held-out wordings do: with no train question containing "patient", the model read the held-out
    # "A patient was started on X ..." as a test question. The sample rows, MCQ items and tokenizer corpus keep
    # paraphrases 0-4.
    "Name the condition that {drug} treats.",
    "A patient takes {drug} every day. Which condition do they have?",
    "{drug} is given for which disease?",
)
DISEASE_QUESTIONS = (
    "What is the first-line test for {disease}?",
    "Which test should be ordered first when {disease} is suspected?",
    "What initial test is used to evaluate {disease}?",
    "A patient may have {disease}. Which test comes first in the workup?",
    "What is the usual first diagnostic test for suspected {disease}?",
    "Name the test done first for {disease}.",  # 5-7: the seed corpus's further train wordings (above)
    "A patient is thought to have {disease}. What is checked first?",
    "Which investigation is done first in {disease}?",
)
N_TRAIN_PARAPHRASES = 3
HELDOUT_PARAPHRASES = (3, 4)
CORPUS_TRAIN_PARAPHRASES = (0, 1, 2, 5, 6, 7)  # the train wordings the demo's seed corpus asks
DRUG_ANSWER = "{Drug} is used to treat {indication}."
DISEASE_ANSWER = "The first-line test for {disease} is {test}."

# fact type -> (fact table, question paraphrases, answer template)
_FACT_TYPES: dict[str, tuple[tuple[tuple[str, str, str, str], ...], tuple[str, ...], str]] = {
    "drug": (DRUG_INDICATIONS, DRUG_QUESTIONS, DRUG_ANSWER),
    "test": (DISEASE_TESTS, DISEASE_QUESTIONS, DISEASE_ANSWER),
}

Paraphrases = Literal["train", "heldout", "all"]


def _paraphrase_ids(paraphrases: str) -> list[int]:
    if paraphrases == "train":
        return list(range(N_TRAIN_PARAPHRASES))
    if paraphrases == "heldout":
        return list(HELDOUT_PARAPHRASES)
    if paraphrases == "all":
        return list(range(5))
    raise ValueError(f"paraphrases={paraphrases!r}: expected 'train', 'heldout' or 'all'")


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _question(kind: str, fact: tuple[str, str, str, str], p: int) -> str:
    if kind == "drug":
        return _cap(DRUG_QUESTIONS[p].format(drug=fact[0]))  # a wording may open with the name
    return _cap(DISEASE_QUESTIONS[p].format(disease=fact[0]))


def _answer(kind: str, fact: tuple[str, str, str, str]) -> str:
    if kind == "drug":
        return DRUG_ANSWER.format(Drug=_cap(fact[0]), indication=fact[1])
    return DISEASE_ANSWER.format(disease=fact[0], test=fact[1])


def _all_items(paraphrases: str) -> list[tuple[str, int, int]]:
    """(fact type, fact index, paraphrase index) in a fixed order."""
    pids = _paraphrase_ids(paraphrases)
    return [(kind, i, p) for kind, spec in _FACT_TYPES.items() for i in range(len(spec[0])) for p in pids]


def sample_sft_rows(
    n: int | None = None,
    seed: int = 0,
    paraphrases: Paraphrases = "train",
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
) -> list[dict[str, Any]]:
    """Conversations asking one fact each, shuffled by ``seed``.

    ``n=None`` returns every (fact, paraphrase) pair of the split once (64 facts x 3 train / 2 heldout
    paraphrases). A larger ``n`` repeats the set in fresh shuffles (ids get a ``-r<k>`` suffix so they stay
    unique); a smaller one takes the first ``n``. ``system_prompt=None`` leaves the system turn out.
    """
    items = _all_items(paraphrases)
    if n is not None and n < 0:
        raise ValueError(f"n={n}: must be >= 0")
    rng = random.Random(seed)
    target = len(items) if n is None else n
    rows: list[dict[str, Any]] = []
    rep = 0
    while len(rows) < target:
        order = list(items)
        rng.shuffle(order)
        for kind, i, p in order[: target - len(rows)]:
            fact = _FACT_TYPES[kind][0][i]
            messages = [] if not system_prompt else [{"role": "system", "content": system_prompt}]
            messages += [
                {"role": "user", "content": _question(kind, fact, p)},
                {"role": "assistant", "content": _answer(kind, fact)},
            ]
            rows.append(
                {
                    "id": f"{kind}-{i:02d}-p{p}" + (f"-r{rep}" if rep else ""),
                    "messages": messages,
                    "department": fact[2],
                    "subdepartment": fact[3],
                    "source": SOURCE,
                }
            )
        rep += 1
    return rows


def sample_mcq_items(seed: int = 0, paraphrases: Paraphrases = "heldout",
                     every_paraphrase: bool = False) -> list[dict[str, Any]]:
    """One four-option multiple-choice item per fact (chance = 25%), or with ``every_paraphrase`` one per fact and
    paraphrase of the split (128 held-out items: more questions, tighter intervals).

    The question uses a paraphrase from the chosen split (picked by ``seed``); the three distractors are other
    answers from the same table, and the gold option's letter is random.
    """
    pids = _paraphrase_ids(paraphrases)
    rng = random.Random(seed)
    items = []
    for kind, (table, _, _) in _FACT_TYPES.items():
        answers = [fact[1] for fact in table]
        for i, fact, p in ((i, f, q) for i, f in enumerate(table) for q in (pids if every_paraphrase else [None])):
            p = rng.choice(pids) if p is None else p
            distractors = rng.sample([a for a in answers if a != fact[1]], 3)
            options = [fact[1], *distractors]
            rng.shuffle(options)
            letters = "ABCD"
            gold = letters[options.index(fact[1])]
            items.append(
                {
                    "id": f"mcq-{kind}-{i:02d}-p{p}",
                    "question": _question(kind, fact, p),
                    "options": dict(zip(letters, options)),
                    "answer_idx": gold,
                    "answer": fact[1],
                    "department": fact[2],
                    "subdepartment": fact[3],
                }
            )
    return items


def bad_sft_rows() -> list[dict[str, Any] | str]:
    """Deliberately broken rows for quarantine demos; the last one is a raw line of invalid JSON."""
    return [
        {"id": "bad-no-messages", "source": "broken"},
        {"id": "bad-no-role", "messages": [{"content": "What is metformin used to treat?"}]},
        {
            "id": "bad-unknown-role",
            "messages": [
                {"role": "wizard", "content": "Cast a healing spell."},
                {"role": "assistant", "content": "No."},
            ],
        },
        {"id": "bad-empty-conversation", "messages": []},
        {"id": "bad-no-assistant", "messages": [{"role": "user", "content": "What is tonometry used for?"}]},
        {"id": "bad-messages-string", "messages": "user: hi\nassistant: hello"},
        '{"id": "bad-json", "messages": [{"role": "user", "content": "unterminated',
    ]


# ---------------------------------------------------------------------------------------------- o1-style reasoning
# FineMedLM-o1 trains on long answers in two parts: a "## Thought" section that reasons step by step and a
# "## Summarization" section with the final answer. Ours are templated from the fact tables: restate the question,
# recall what the drug / disease is, recall the fact, rule out one or two other facts of the same table by name,
# conclude. The summarization is exactly the plain SFT answer (:func:`_answer`), so the fact is in it verbatim.

THOUGHT_HEADER = "## Thought"
SUMMARY_HEADER = "## Summarization"

# Drug class per drug of DRUG_INDICATIONS (teaching-level labels, used only in the reasoning text).
DRUG_CLASSES: dict[str, str] = {
    "metformin": "a biguanide",
    "levothyroxine": "a synthetic thyroid hormone",
    "amlodipine": "a calcium channel blocker",
    "atorvastatin": "a statin (an HMG-CoA reductase inhibitor)",
    "furosemide": "a loop diuretic",
    "warfarin": "a vitamin K antagonist anticoagulant",
    "omeprazole": "a proton pump inhibitor",
    "albuterol": "a short-acting beta-2 agonist bronchodilator",
    "allopurinol": "a xanthine oxidase inhibitor",
    "levetiracetam": "an antiseizure medicine",
    "sumatriptan": "a triptan (a serotonin 5-HT1B/1D agonist)",
    "oseltamivir": "a neuraminidase inhibitor antiviral",
    "nitrofurantoin": "a urinary antibacterial",
    "tamsulosin": "an alpha-1 blocker",
    "cefazolin": "a first-generation cephalosporin",
    "alendronate": "a bisphosphonate",
    "heparin": "an injectable anticoagulant",
    "oxytocin": "a uterotonic hormone",
    "magnesium sulfate": "a magnesium salt used as an anticonvulsant",
    "clomiphene": "a selective estrogen receptor modulator",
    "metronidazole": "a nitroimidazole antimicrobial",
    "palivizumab": "a monoclonal antibody against RSV",
    "caffeine citrate": "a methylxanthine respiratory stimulant",
    "methylphenidate": "a central nervous system stimulant",
    "amoxicillin": "an aminopenicillin antibiotic",
    "betahistine": "a histamine analogue",
    "fluticasone nasal spray": "an intranasal corticosteroid",
    "penicillin V": "an oral penicillin antibiotic",
    "sertraline": "a selective serotonin reuptake inhibitor",
    "isotretinoin": "an oral retinoid",
    "latanoprost": "a prostaglandin analogue eye drop",
    "ondansetron": "a 5-HT3 receptor antagonist antiemetic",
}

_RESTATE = {
    "drug": (
        "The question asks which condition {drug} is used to treat.",
        "I need to name the condition that {drug} is prescribed for.",
    ),
    "test": (
        "The question asks which test comes first when {disease} is suspected.",
        "I need to name the first-line diagnostic test for {disease}.",
    ),
}
_RECALL = {
    "drug": (
        "{Drug} is {drug_class}. It is mostly prescribed in {dept}, in particular in {subdept}.",
        "Recall the drug: {drug} is {drug_class}, a medicine used mainly in {subdept} ({dept}).",
    ),
    "test": (
        "{Disease_cap} is a condition seen in {dept}, in particular in {subdept}. The first test should be quick, "
        "widely available and answer the clinical question directly.",
        "Recall the disease: {disease} belongs to {subdept} ({dept}). The workup starts with the simplest test that "
        "confirms or excludes it.",
    ),
}
_FACT = {
    "drug": (
        "The main indication of {drug} is {indication}.",
        "{Drug} is the standard treatment for {indication}.",
    ),
    "test": (
        "For {disease}, the test ordered first is {test}.",
        "The usual first test in the workup of {disease} is {test}.",
    ),
}
_RULE_OUT = {
    "drug": "Could the answer be {other_indication}? No: {other_indication} is treated with {other_drug}, not {drug}.",
    "test": "Could the answer be {other_test}? No: the first-line test for {other_disease} is {other_test}, "
            "and it is not the one for {disease}.",
}
_CONCLUDE = {
    "drug": "So the condition {drug} treats is {indication}.",
    "test": "So the first-line test for {disease} is {test}.",
}


def _distractors(kind: str, i: int, rng: random.Random, k: int) -> list[int]:
    """``k`` other facts of the same table, preferring ones from the same primary department (plausible
    alternatives), in a random order."""
    table = _FACT_TYPES[kind][0]
    same = [j for j, f in enumerate(table) if j != i and f[2] == table[i][2]]
    other = [j for j, f in enumerate(table) if j != i and f[2] != table[i][2]]
    rng.shuffle(same)
    rng.shuffle(other)
    return (same + other)[:k]


def _item_rng(seed: int, kind: str, i: int, p: int, what: str) -> random.Random:
    # A string seed is hashed deterministically (not with PYTHONHASHSEED); one stream per item and purpose, so an
    # item's text does not depend on which other items are generated.
    return random.Random(f"{what}:{seed}:{kind}:{i}:{p}")


def _reasoning_answer(kind: str, i: int, p: int, seed: int) -> tuple[str, list[int]]:
    """The o1-style answer for fact ``i`` asked with paraphrase ``p``, and the fact indices it rules out."""
    rng = _item_rng(seed, kind, i, p, "reasoning")
    table = _FACT_TYPES[kind][0]
    fact = table[i]
    ruled_out = _distractors(kind, i, rng, rng.choice((1, 2)))
    if kind == "drug":
        fields = {"drug": fact[0], "Drug": _cap(fact[0]), "indication": fact[1],
                  "drug_class": DRUG_CLASSES[fact[0]]}
    else:
        fields = {"disease": fact[0], "Disease_cap": _cap(fact[0]), "test": fact[1]}
    fields.update(dept=fact[2], subdept=fact[3])
    steps = [
        rng.choice(_RESTATE[kind]).format(**fields),
        rng.choice(_RECALL[kind]).format(**fields),
        rng.choice(_FACT[kind]).format(**fields),
    ]
    for j in ruled_out:
        other = table[j]
        if kind == "drug":
            steps.append(_RULE_OUT[kind].format(other_drug=other[0], other_indication=other[1], **fields))
        else:
            steps.append(_RULE_OUT[kind].format(other_disease=other[0], other_test=other[1], **fields))
    steps.append(_CONCLUDE[kind].format(**fields))
    thought = "\n".join(f"Step {n}: {s}" for n, s in enumerate(steps, 1))
    text = f"{THOUGHT_HEADER}\n\n{thought}\n\n{SUMMARY_HEADER}\n\n{_answer(kind, fact)}"
    return text, ruled_out


def reasoning_answer(kind: str, i: int, p: int, seed: int = 0) -> str:
    """The o1-style answer (``## Thought`` steps, then ``## Summarization`` with the plain answer sentence) for
    fact ``i`` of fact type ``kind`` ("drug" | "test") asked with question paraphrase ``p``."""
    return _reasoning_answer(kind, i, p, seed)[0]


def sample_reasoning_rows(
    n: int | None = None,
    seed: int = 0,
    paraphrases: Paraphrases = "train",
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
) -> list[dict[str, Any]]:
    """Like :func:`sample_sft_rows` (same questions, order, ``n`` and repeat rules, same schema) but the assistant
    answers in FineMedLM-o1's long form: a ``## Thought`` section of numbered steps (restate the question,
    recall the drug class / the disease, recall the fact, rule out one or two other facts of the table by name,
    conclude), then ``## Summarization`` holding exactly the plain SFT answer sentence.

    Ids are the SFT ids with a ``cot-`` prefix, so both kinds of rows can share one dataset. Deterministic given
    ``seed``; an item's reasoning text depends only on (seed, fact, paraphrase), not on ``n``.
    """
    items = _all_items(paraphrases)
    if n is not None and n < 0:
        raise ValueError(f"n={n}: must be >= 0")
    rng = random.Random(seed)
    target = len(items) if n is None else n
    rows: list[dict[str, Any]] = []
    rep = 0
    while len(rows) < target:
        order = list(items)
        rng.shuffle(order)
        for kind, i, p in order[: target - len(rows)]:
            fact = _FACT_TYPES[kind][0][i]
            messages = [] if not system_prompt else [{"role": "system", "content": system_prompt}]
            messages += [
                {"role": "user", "content": _question(kind, fact, p)},
                {"role": "assistant", "content": reasoning_answer(kind, i, p, seed)},
            ]
            rows.append(
                {
                    "id": f"cot-{kind}-{i:02d}-p{p}" + (f"-r{rep}" if rep else ""),
                    "messages": messages,
                    "department": fact[2],
                    "subdepartment": fact[3],
                    "source": SOURCE,
                }
            )
        rep += 1
    return rows


def _wrong_answer(kind: str, fact: tuple[str, str, str, str], other: tuple[str, str, str, str]) -> str:
    """The plain answer template for ``fact`` with ``other``'s indication / test in place of the true one."""
    return _answer(kind, (fact[0], other[1], fact[2], fact[3]))


def sample_dpo_rows(
    seed: int = 0,
    paraphrases: Paraphrases = "train",
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    wrong_fraction: float = 0.5,
) -> list[dict[str, Any]]:
    """Preference pairs in TRL's conversational format, one per (fact, paraphrase) of the split, shuffled by ``seed``.

    - ``prompt``: ``[system?, user question]``;
    - ``chosen``: ``[assistant reasoning answer]`` -- the same text :func:`sample_reasoning_rows` gives the item;
    - ``rejected``: ``[assistant direct answer]``, no reasoning. As in FineMedLM-o1 the preference is reasoning
      over a direct answer, but here about ``wrong_fraction`` of the direct answers (a fixed, seeded choice) are
      also *wrong*: the answer template with another fact's indication / test, namely the first alternative the
      chosen answer's Thought rules out. The rest are the correct plain answer. The wrong ones are exactly
      ``round(wrong_fraction * len(pairs))`` pairs, picked by ``seed``.

    Why some wrong: with only correct direct answers the pair differs in format alone, and a preference learned on it
    says nothing about the facts. With wrong ones the rejected text names a distractor, so after DPO the reward
    margin and preference accuracy on held-out pairs (``paraphrases="heldout"``: the same facts asked in unseen
    words) reflect the content as well as the format. ``rejected_kind`` ("direct-correct" | "direct-wrong") lets
    an evaluation report the two groups apart. Extra keys are ignored by the DPO schema.

    Ids: ``dpo-<kind>-<fact>-p<paraphrase>``, stable across seeds (the seed changes order and texts, not ids).
    """
    if not 0.0 <= wrong_fraction <= 1.0:
        raise ValueError(f"wrong_fraction={wrong_fraction}: must be within [0, 1]")
    items = _all_items(paraphrases)
    # Exactly round(wrong_fraction * len(items)) wrong rejected answers, picked by seed.
    wrong_items = set(random.Random(f"rejected:{seed}").sample(items, round(wrong_fraction * len(items))))
    order = list(items)
    random.Random(seed).shuffle(order)
    rows: list[dict[str, Any]] = []
    for kind, i, p in order:
        table = _FACT_TYPES[kind][0]
        fact = table[i]
        chosen, ruled_out = _reasoning_answer(kind, i, p, seed)
        wrong = (kind, i, p) in wrong_items
        rejected = _wrong_answer(kind, fact, table[ruled_out[0]]) if wrong else _answer(kind, fact)
        prompt = [] if not system_prompt else [{"role": "system", "content": system_prompt}]
        prompt.append({"role": "user", "content": _question(kind, fact, p)})
        rows.append(
            {
                "id": f"dpo-{kind}-{i:02d}-p{p}",
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
                "department": fact[2],
                "subdepartment": fact[3],
                "source": SOURCE,
                "rejected_kind": "direct-wrong" if wrong else "direct-correct",
            }
        )
    return rows


def bad_dpo_rows() -> list[dict[str, Any] | str]:
    """Deliberately broken preference rows for quarantine tests; the last one is a raw line of invalid JSON.

    Each row's id names its defect. ``bad-empty-chosen`` and ``bad-empty-user`` pass the schema's
    ``validate_dpo_row`` (it checks shapes, not emptiness); the DPO prepare step rejects them too."""
    q = [{"role": "user", "content": "What is metformin used to treat?"}]
    good = [{"role": "assistant", "content": "Metformin is used to treat type 2 diabetes."}]
    bad = [{"role": "assistant", "content": "Metformin is used to treat hypothyroidism."}]
    return [
        {"id": "bad-chosen-equals-rejected", "prompt": q, "chosen": good, "rejected": list(good)},
        {"id": "bad-empty-prompt", "prompt": [], "chosen": good, "rejected": bad},
        {"id": "bad-empty-chosen", "prompt": q, "chosen": [{"role": "assistant", "content": "  "}], "rejected": bad},
        {"id": "bad-empty-user", "prompt": [{"role": "user", "content": ""}], "chosen": good, "rejected": bad},
        {"id": "bad-missing-rejected", "prompt": q, "chosen": good},
        {"id": "bad-chosen-user-role", "prompt": q, "chosen": [{"role": "user", "content": "Type 2 diabetes."}],
         "rejected": bad},
        {"id": "bad-unknown-role", "prompt": [{"role": "wizard", "content": "Cast a healing spell."}],
         "chosen": good, "rejected": bad},
        {"id": "bad-prompt-ends-with-assistant", "prompt": q + good, "chosen": good, "rejected": bad},
        {"id": "bad-prompt-string", "prompt": "What is metformin used to treat?", "chosen": good, "rejected": bad},
        '{"id": "bad-json", "prompt": [{"role": "user", "content": "unterminated',
    ]


def write_jsonl(rows: Iterable[dict[str, Any] | str], uri: str) -> str:
    """Write rows as JSONL (dicts via ``json.dumps``, strings verbatim) to a local path or ``s3://`` URI."""
    lines = [row if isinstance(row, str) else json.dumps(row, ensure_ascii=False) for row in rows]
    text = "".join(line + "\n" for line in lines)
    from finemed_ray import storage

    if storage.is_s3(uri):
        storage.write_text(uri, text)
    else:
        parent = os.path.dirname(os.path.abspath(uri))
        os.makedirs(parent, exist_ok=True)
        with open(uri, "w", encoding="utf-8") as fh:
            fh.write(text)
    return uri


# Hand-written general medical English for the tiny tokenizer's vocabulary (not training data for the task).
_GENERAL_MEDICAL_TEXT = """\
The patient presented to the emergency department with chest pain radiating to the left arm.
Vital signs on admission were a blood pressure of 142/88 mmHg, heart rate 96 beats per minute, and temperature 37.8 °C.
Physical examination revealed bilateral crackles at the lung bases and mild pitting edema of both ankles.
The differential diagnosis includes acute coronary syndrome, pulmonary embolism, and aortic dissection.
Laboratory results showed an elevated white blood cell count and a raised C-reactive protein.
A complete blood count, basic metabolic panel, and liver function tests were ordered.
The physician reviewed the medication list and stopped the nonsteroidal anti-inflammatory drug.
Informed consent was obtained before the procedure.
The risks, benefits, and alternatives of surgery were discussed with the patient and family.
Hypertension is a major risk factor for stroke, myocardial infarction, and chronic kidney disease.
Lifestyle changes include regular exercise, a balanced diet, weight loss, and smoking cessation.
Patients with diabetes should have their feet examined at every visit.
Insulin therapy is started when oral agents fail to control blood glucose.
Hypoglycemia may cause sweating, tremor, confusion, and loss of consciousness.
Asthma is a chronic inflammatory disease of the airways with reversible obstruction.
Inhaled corticosteroids are the cornerstone of long-term asthma control.
Chronic obstructive pulmonary disease is usually caused by long-term exposure to tobacco smoke.
Spirometry measures the forced expiratory volume in one second and the forced vital capacity.
Pneumonia often presents with fever, productive cough, and shortness of breath.
Antibiotics should be chosen according to local resistance patterns.
Sepsis is a life-threatening organ dysfunction caused by a dysregulated response to infection.
Early fluid resuscitation and broad-spectrum antibiotics improve survival in septic shock.
Blood cultures should be drawn before antibiotics are given whenever possible.
The kidneys regulate fluid balance, electrolytes, and acid-base status.
Acute kidney injury is defined by a rapid rise in serum creatinine or a fall in urine output.
Hyperkalemia can cause dangerous cardiac arrhythmias.
Atrial fibrillation increases the risk of thromboembolic stroke.
Anticoagulation decisions balance the risk of stroke against the risk of bleeding.
Heart failure with reduced ejection fraction is treated with several classes of medication.
The echocardiogram showed a left ventricular ejection fraction of 35%.
Anemia is defined as a hemoglobin concentration below the normal range for age and sex.
Iron supplements may cause constipation and dark stools.
Vitamin B12 deficiency can lead to anemia and peripheral neuropathy.
Thyroid hormone regulates metabolism, heart rate, and body temperature.
Symptoms of hyperthyroidism include weight loss, palpitations, heat intolerance, and anxiety.
Osteoarthritis commonly affects the knees, hips, and hands.
Rheumatoid arthritis causes symmetric joint swelling and morning stiffness.
Gout results from the deposition of uric acid crystals in the joints.
Migraine headaches are often unilateral, throbbing, and associated with nausea and sensitivity to light.
A sudden severe headache requires urgent evaluation for subarachnoid hemorrhage.
Stroke symptoms include facial droop, arm weakness, and speech difficulty.
Time is brain: every minute of delay in stroke treatment matters.
Seizures may be focal or generalized.
Parkinson's disease is characterized by tremor, rigidity, and slowness of movement.
Dementia is a progressive decline in memory and other cognitive functions.
Depression is common and treatable; screening is recommended in primary care.
Anxiety disorders can present with palpitations, chest tightness, and insomnia.
The surgeon performed a laparoscopic cholecystectomy without complications.
Postoperative care includes pain control, early mobilization, and wound monitoring.
Deep vein thrombosis prophylaxis is recommended after major surgery.
Appendicitis classically begins with periumbilical pain that migrates to the right lower quadrant.
A hernia is the protrusion of an organ through a weakness in the wall that contains it.
Fractures are immobilized with a splint or cast to allow healing.
Open fractures require urgent antibiotics and surgical debridement.
Burns are classified by depth as superficial, partial thickness, or full thickness.
The wound was cleaned, irrigated, and closed with sutures.
Pregnancy is dated from the first day of the last menstrual period.
Prenatal care includes blood pressure checks, urine tests, and ultrasound examinations.
Preeclampsia is new-onset hypertension with proteinuria after twenty weeks of gestation.
Folic acid supplementation before conception reduces the risk of neural tube defects.
Postpartum hemorrhage is a leading cause of maternal death worldwide.
Breastfeeding provides antibodies that protect infants against infection.
Menopause typically occurs between the ages of 45 and 55.
Endometriosis may cause painful periods and infertility.
The cervical screening program aims to detect precancerous changes early.
Children should receive vaccines according to the national immunization schedule.
Fever in a newborn younger than 28 days requires a full evaluation for sepsis.
Growth charts are used to monitor height, weight, and head circumference.
Dehydration in children is assessed by mucous membranes, skin turgor, and capillary refill.
Oral rehydration solution is the first treatment for mild to moderate dehydration.
Bronchiolitis is a common viral infection of the small airways in infants.
Croup causes a barking cough and inspiratory stridor.
Kawasaki disease can lead to coronary artery aneurysms if untreated.
Acute otitis media causes ear pain, fever, and irritability in young children.
Tonsillitis is usually viral, but group A streptococcus must be considered.
Chronic sinusitis lasts longer than twelve weeks.
Nosebleeds usually stop with firm pressure on the soft part of the nose.
Hoarseness lasting more than three weeks should be evaluated with laryngoscopy.
Hearing loss may be conductive, sensorineural, or mixed.
Tinnitus is the perception of sound without an external source.
Vertigo is a false sensation of movement, often spinning.
Benign paroxysmal positional vertigo is treated with repositioning maneuvers.
Skin cancer risk increases with ultraviolet exposure and fair skin.
Eczema causes itchy, dry, and inflamed skin.
Psoriasis presents with well-demarcated plaques covered by silvery scale.
Glaucoma damages the optic nerve and can cause irreversible vision loss.
Cataracts cause gradual clouding of the lens.
Diabetic retinopathy is screened with a dilated eye examination.
Chemotherapy can cause nausea, hair loss, and low blood counts.
Palliative care focuses on relieving symptoms and improving quality of life.
Pain is assessed with a numerical rating scale from 0 to 10.
Opioids are effective analgesics but carry a risk of dependence and respiratory depression.
Allergic reactions range from mild urticaria to life-threatening anaphylaxis.
Anaphylaxis is treated immediately with intramuscular epinephrine.
Hand hygiene is the most important measure to prevent hospital-acquired infections.
Antibiotic stewardship reduces resistance and adverse drug events.
Tuberculosis is spread through airborne droplets.
HIV infection is managed with combination antiretroviral therapy.
Hepatitis B vaccination is recommended for all infants.
Malaria is transmitted by the bite of an infected Anopheles mosquito.
Influenza vaccination is recommended every year.
The nurse recorded the fluid intake and output every four hours.
The pharmacist checked for drug interactions before dispensing the prescription.
Take one tablet by mouth twice daily with food.
The dose should be adjusted in patients with renal impairment.
Common side effects include headache, dizziness, nausea, and diarrhea.
Contraindications include pregnancy and severe liver disease.
Follow-up is arranged in two weeks to review the test results.
The patient was discharged home in stable condition.
Magnetic resonance imaging provides detailed images of soft tissues.
Computed tomography uses X-rays to create cross-sectional images.
Ultrasound is safe in pregnancy because it does not use ionizing radiation.
A biopsy confirmed the diagnosis of adenocarcinoma.
Screening tests should be sensitive; confirmatory tests should be specific.
Evidence-based medicine integrates research evidence, clinical expertise, and patient values.
The randomized controlled trial showed a 20% relative risk reduction.
Sensitivity is the proportion of people with the disease who test positive.
Specificity is the proportion of people without the disease who test negative.
Q: What is the normal resting heart rate in adults? A: Between 60 and 100 beats per minute.
Q: What does BMI stand for? A: Body mass index, calculated as weight in kilograms divided by height in meters squared.
Q: Which vitamin is made in the skin after sun exposure? A: Vitamin D.
Q: What is the most common cause of community-acquired pneumonia? A: Streptococcus pneumoniae.
Q: Which organ produces insulin? A: The pancreas.
Q: What is the antidote for paracetamol overdose? A: N-acetylcysteine.
Q: What is the antidote for opioid overdose? A: Naloxone.
Q: Where is the mitral valve? A: Between the left atrium and the left ventricle.
Q: What is the normal range for fasting blood glucose? A: About 70 to 99 mg/dL (3.9 to 5.5 mmol/L).
The doctor explained the diagnosis in plain language and answered the patient's questions.
Please describe your symptoms: when did they start, and what makes them better or worse?
I have had a sore throat and a mild fever for three days.
My child has been coughing at night for two weeks.
Is it safe to take ibuprofen during pregnancy?
How often should I check my blood pressure at home?
You should seek urgent care if you develop shortness of breath or chest pain.
Drink plenty of fluids, rest, and take paracetamol for fever.
This medicine should not be stopped suddenly without talking to your doctor.
The results are within the normal range, so no further testing is needed.
Hypertension is often called a silent killer because it usually causes no symptoms.
Untreated hypertension damages the heart, brain, kidneys, and eyes.
Home blood pressure monitoring helps confirm the diagnosis of hypertension.
Secondary hypertension should be considered in young patients and in resistant hypertension.
The patient has a history of hypertension, type 2 diabetes, and hyperlipidemia.
Diabetic ketoacidosis presents with vomiting, abdominal pain, rapid breathing, and dehydration.
Diabetes increases the risk of heart disease, kidney disease, nerve damage, and vision loss.
Gestational diabetes usually resolves after delivery but raises the future risk of type 2 diabetes.
Metabolic syndrome combines abdominal obesity, high blood pressure, high blood sugar, and abnormal lipids.
Obesity is associated with sleep apnea, osteoarthritis, fatty liver disease, and several cancers.
Cholesterol levels are measured with a fasting lipid profile.
Statins lower low-density lipoprotein cholesterol and reduce cardiovascular events.
Coronary artery disease is caused by atherosclerotic plaque in the coronary arteries.
Angina is chest discomfort caused by reduced blood flow to the heart muscle.
Aspirin is given immediately when a heart attack is suspected, unless contraindicated.
Cardiac arrest requires immediate cardiopulmonary resuscitation and defibrillation.
Syncope is a temporary loss of consciousness due to reduced blood flow to the brain.
Palpitations may be caused by arrhythmias, anxiety, caffeine, or thyroid disease.
Peripheral artery disease causes leg pain when walking that improves with rest.
Varicose veins are enlarged, twisted veins, usually in the legs.
Pulmonary embolism may cause sudden shortness of breath, chest pain, and a rapid heart rate.
Oxygen saturation is measured with a pulse oximeter.
Supplemental oxygen is given to keep oxygen saturation within the target range.
Wheezing is a high-pitched whistling sound caused by narrowed airways.
Smoking cessation is the most effective intervention to slow the progression of lung disease.
Lung cancer is the leading cause of cancer death in many countries.
Chest pain, cough, fever, and fatigue are common reasons for a medical consultation.
Gastroenteritis causes diarrhea, vomiting, and abdominal cramps.
Peptic ulcer disease is often caused by Helicobacter pylori infection or anti-inflammatory drugs.
Gastroesophageal reflux disease causes heartburn and regurgitation.
Inflammatory bowel disease includes Crohn's disease and ulcerative colitis.
Irritable bowel syndrome is a functional disorder of the gut.
Colorectal cancer screening begins in middle age for people at average risk.
Cirrhosis is scarring of the liver caused by long-term liver damage.
Jaundice is yellowing of the skin and eyes caused by high bilirubin levels.
Pancreatitis causes severe upper abdominal pain that radiates to the back.
Gallstones can cause biliary colic, cholecystitis, and pancreatitis.
Kidney stones cause severe flank pain that may radiate to the groin.
Urinary tract infection causes burning on urination, frequency, and urgency.
Pyelonephritis is an infection of the kidney and usually causes fever and flank pain.
Chronic kidney disease is staged by the estimated glomerular filtration rate and albuminuria.
Dialysis replaces kidney function in patients with end-stage kidney disease.
Benign prostatic hyperplasia causes a weak urinary stream and frequent urination at night.
Prostate cancer is one of the most common cancers in men.
Breast cancer screening is performed with mammography.
A lump in the breast should always be evaluated by a doctor.
Ovarian cancer often presents late with bloating and abdominal discomfort.
Polycystic ovary syndrome causes irregular periods, acne, and excess hair growth.
Infertility is defined as the failure to conceive after twelve months of regular unprotected intercourse.
Ectopic pregnancy is a medical emergency when it ruptures.
Miscarriage is the loss of a pregnancy before twenty weeks of gestation.
Labor is divided into three stages: dilation, delivery of the baby, and delivery of the placenta.
Cesarean delivery is performed when vaginal birth is unsafe for the mother or the baby.
Anemia in pregnancy is common and is usually caused by iron deficiency.
Newborns receive vitamin K at birth to prevent bleeding.
Neonatal jaundice is common and usually harmless, but high levels need phototherapy.
Premature infants may need help with breathing, feeding, and temperature control.
Infants should be placed on their backs to sleep to reduce the risk of sudden infant death.
Measles is a highly contagious viral infection prevented by vaccination.
Chickenpox causes an itchy rash of blisters and is caused by the varicella-zoster virus.
Hand, foot, and mouth disease is a common viral illness in young children.
Attention deficit hyperactivity disorder affects attention, activity level, and impulse control.
Autism spectrum disorder affects communication and social interaction.
Childhood obesity increases the risk of diabetes and high blood pressure later in life.
Febrile seizures occur in young children with fever and are usually harmless.
Pediatric doses are calculated by body weight in kilograms.
Ear infections are among the most common reasons children visit a doctor.
Ear wax can block the ear canal and cause temporary hearing loss.
Allergic rhinitis causes sneezing, a runny nose, and itchy eyes.
Nasal polyps are soft growths in the lining of the nose and sinuses.
Sleep apnea causes loud snoring, pauses in breathing, and daytime sleepiness.
Head and neck cancers are strongly linked to tobacco and alcohol use.
A thyroid nodule is evaluated with ultrasound and sometimes a fine-needle biopsy.
The ultrasound showed a normal liver, gallbladder, and kidneys.
An ultrasound examination uses sound waves to create images of organs.
Doppler ultrasound measures blood flow in arteries and veins.
X-rays are useful for detecting fractures and pneumonia.
Laboratory tests include blood tests, urine tests, and cultures.
A urinalysis can detect infection, blood, protein, and glucose in the urine.
An electrocardiogram records the electrical activity of the heart.
Troponin is a blood marker of heart muscle injury.
The patient was admitted to the intensive care unit for close monitoring.
The patient reports fatigue, weight loss, and night sweats for the past month.
The patient denies fever, chills, nausea, or vomiting.
The patient is allergic to penicillin.
The patient was advised to return if symptoms worsen.
Every patient deserves clear information about their diagnosis and treatment.
Shared decision making respects the patient's values and preferences.
Medication adherence improves outcomes in chronic disease.
Elderly patients are at higher risk of falls, delirium, and adverse drug reactions.
Polypharmacy is the use of many medications at the same time.
Vaccination protects both the individual and the community.
Infection control includes hand hygiene, gloves, masks, and isolation when needed.
Urinary tract infection is more common in women than in men.
Infection of the skin and soft tissue is called cellulitis.
A fever is a body temperature above 38 °C.
Dehydration is common in older adults and in young children.
Headache, fever, and a stiff neck suggest meningitis, which is an emergency.
Epilepsy is a tendency to have recurrent unprovoked seizures.
Multiple sclerosis is an autoimmune disease of the central nervous system.
Peripheral neuropathy causes numbness, tingling, and burning pain in the feet.
Back pain is very common and usually improves within a few weeks.
Osteoporosis makes bones fragile and increases the risk of fractures.
Calcium and vitamin D are important for bone health.
Physical therapy helps patients recover strength and mobility after injury or surgery.
A sprain is an injury to a ligament; a strain is an injury to a muscle or tendon.
Carpal tunnel syndrome causes numbness and tingling in the thumb, index, and middle fingers.
Acne is treated with topical retinoids, benzoyl peroxide, and sometimes antibiotics.
Sunscreen reduces the risk of sunburn and skin cancer.
A changing mole should be examined for signs of melanoma.
Dry eye disease causes burning, grittiness, and blurred vision.
Red eye with pain and reduced vision requires urgent ophthalmology review.
Depression may present with low mood, loss of interest, poor sleep, and poor concentration.
Suicidal thoughts are a medical emergency and need immediate help.
Cognitive behavioral therapy is an effective treatment for depression and anxiety.
Alcohol use disorder can cause liver disease, pancreatitis, and heart failure.
Cancer treatment may include surgery, chemotherapy, radiotherapy, and immunotherapy.
Early detection of cancer improves the chance of cure.
Blood transfusion is used to treat severe anemia and major bleeding.
Sickle cell disease is an inherited disorder of hemoglobin.
Bleeding disorders such as hemophilia cause prolonged bleeding after injury.
Thrombosis is the formation of a blood clot inside a blood vessel.
Antibiotics do not work against viral infections such as the common cold.
Finish the full course of antibiotics unless your doctor tells you otherwise.
Store medicines out of reach of children.
"""


def tokenizer_corpus() -> list[str]:
    """Text lines for training the tiny tokenizer: general medical sentences plus every sample conversation."""
    lines = [line for line in _GENERAL_MEDICAL_TEXT.splitlines() if line.strip()]
    for row in sample_sft_rows(paraphrases="all"):
        lines.extend(m["content"] for m in row["messages"])
    for item in sample_mcq_items(paraphrases="all"):
        lines.append(item["question"] + " " + " ".join(f"{k}. {v}" for k, v in item["options"].items()))
    for table in (DRUG_INDICATIONS, DISEASE_TESTS):
        for fact in table:
            lines.append(f"{fact[0]}: {fact[1]} ({fact[2]}, {fact[3]})")
    lines.append(DEFAULT_SYSTEM_PROMPT)
    lines.extend(DEPARTMENTS)
    return lines
