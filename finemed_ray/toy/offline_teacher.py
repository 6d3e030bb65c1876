"""OFFLINE TEACHER: a rule-based stand-in for the teacher LLM of the synthesis pipeline. It is NOT an LLM.

``make demo`` has no model that could write medical questions and answers, so this module answers every prompt of
:mod:`finemed_ray.synth.prompts` from a lookup table instead: the fact tables of :mod:`finemed_ray.toy.sample`
(64 facts: drug -> indication, disease -> first-line test, each with its departments). It only knows those facts
and the texts of :mod:`finemed_ray.toy.seed_corpus`; any other prompt or text raises an error that names it (the
HTTP server answers 500), never a guess. A real run points the same pipeline config at a real teacher instead: a
vLLM model (``backend: vllm``, configs/synth_vllm.yaml) or any OpenAI-compatible URL (``backend: http``,
configs/synth_http.yaml) - see configs/synth_demo.yaml for the one-line change.

What it answers, per prompt (recognised by the fixed wording of the prompt builders, checked at import):

- primary / secondary department: the fact's departments, mapped onto the paper's taxonomy
  (:data:`TAXONOMY_LABELS`: sample.py uses a few sub-specialties the 6/29 taxonomy lacks);
- questions: for seed-text variant v (0-2 and 6-8: common texts such as a reference entry, clinic note, patient
  leaflet; 3-5 and 9-11: case discussions) the first question is TRAIN paraphrase ``seed_corpus.paraphrase_of(v)``
  of sample.py (0-2 and 5-7), so the synthesized data covers exactly the six train wordings of each fact and never
  a held-out one; the other questions are weaker side questions (drug class, specialty). A text that quotes a question
  (the planted exam item) gets that quoted question, copied verbatim - as a careless teacher would;
- scores: questions from case discussions (variants 3-5, 9-11) are complex (complexity 9), all others common
  (complexity 5), so every train wording of every fact yields one SFT dialogue and one reasoning dialogue / DPO pair;
  the first question always scores highest, so the paper's selection keeps it;
- common answers: sample.py's plain answer sentence (the patient-friendly style adds one short sentence); the
  judge picks the plain one;
- complex answer: exactly ``sample.reasoning_answer(kind, i, p)`` (the project's Thought/Summarization format);
- follow-ups: a patient asks what to watch out for / a clinician asks about checks; the answer restates the fact
  plus one general safety sentence;
- direct answer (the DPO rejected side): the plain answer for half of the facts and, for the other half (a fixed
  seeded choice), a WRONG answer naming the first fact the reasoning answer's Thought rules out - a hurried answer
  without reasoning, so preference pairs differ in correctness, not only in length.
"""

from __future__ import annotations

import random
import re
from typing import Any

from finemed_ray.toy import sample
from finemed_ray.synth import prompts
from finemed_ray.toy.seed_corpus import COMPLEX_VARIANTS, PLANTED_HEADING, VARIANT_HEADINGS, paraphrase_of

__all__ = ["MODEL_NAME", "OfflineTeacherError", "OfflineTeacherServer", "TAXONOMY_LABELS", "fact_labels",
           "is_wrong_direct_answer", "offline_teacher_reply", "recognise_prompt"]

MODEL_NAME = "offline-teacher"
SEED = 0
WRONG_FRACTION = 0.5

Fact = tuple[str, str, str, str]
_TABLES: dict[str, tuple[Fact, ...]] = {"drug": sample.DRUG_INDICATIONS, "test": sample.DISEASE_TESTS}
_QUESTIONS: dict[str, tuple[str, ...]] = {"drug": sample.DRUG_QUESTIONS, "test": sample.DISEASE_QUESTIONS}
_SLOT = {"drug": "{drug}", "test": "{disease}"}

IM, SURG, OBGYN, PED, ENT, OTHER = sample.DEPARTMENTS
# sample.py's (primary, secondary) -> the nearest label pair of the paper's taxonomy (finemed_ray/synth/taxonomy.py)
# where sample.py uses a sub-specialty the taxonomy does not have. Every other pair is already a taxonomy label.
TAXONOMY_LABELS: dict[tuple[str, str], tuple[str, str]] = {
    (IM, "Rheumatology"): (SURG, "Orthopedics"),  # joint disease: the taxonomy's only musculoskeletal label
    (PED, "Developmental Pediatrics"): (PED, "General Pediatrics"),
    (PED, "Pediatric Orthopedics"): (PED, "General Pediatrics"),
    (PED, "Pediatric Pulmonology"): (PED, "General Pediatrics"),
    (PED, "Pediatric Surgery"): (PED, "General Pediatrics"),
    (ENT, "Otology"): (ENT, "Otolaryngology"),
    (ENT, "Rhinology"): (ENT, "Otolaryngology"),
    (ENT, "Head and Neck"): (ENT, "Otolaryngology"),
    (ENT, "Sleep Medicine"): (ENT, "Otolaryngology"),
    (ENT, "Laryngology"): (ENT, "Otolaryngology"),
    (OTHER, "Ophthalmology"): (ENT, "Ophthalmology"),  # the taxonomy files eyes under Otorhinolaryngology
    (OTHER, "Psychiatry"): (IM, "Neurology"),  # no psychiatry label: the nearest is disorders of the brain
    (OTHER, "Oncology"): (IM, "Hematology"),  # haematology-oncology
}

# Side questions (never selected: they score lower than the paraphrase question), one per extra question asked.
_SIDE_QUESTIONS: dict[str, tuple[str, ...]] = {
    "drug": ("Which drug class does {drug} belong to?",
             "What should be reviewed before {drug} is prescribed?",
             "How is treatment with {drug} followed up?"),
    "test": ("Which clinical specialty usually manages {disease}?",
             "What happens after the first test when {disease} is suspected?",
             "Why does the workup of {disease} start with a simple test?"),
}
_FOLLOW_UP_QUESTIONS = {
    ("drug", "patient"): "Is there anything I should watch out for while taking {drug}?",
    ("drug", "clinician"): "What would you check before and after starting {drug}?",
    ("test", "patient"): "What should I do while I wait for the result of the {test}?",
    ("test", "clinician"): "How do you proceed if the {test} is inconclusive?",
}
_SAFETY = {
    "drug": "Take it exactly as prescribed, and tell your doctor or pharmacist about side effects, other medicines "
            "you take, or symptoms that get worse.",
    "test": "The doctor will go through the result and plan the next steps; seek care promptly if the symptoms get "
            "worse in the meantime.",
}
_STYLE_B_SENTENCE = "If anything about this is unclear, ask your doctor or pharmacist to explain it."


class OfflineTeacherError(ValueError):
    """A prompt or text the offline teacher does not know (the server answers it with a 500 naming it)."""


# ------------------------------------------------------------------------------------------------ prompt recognition
_SENTINEL_TEXT = "\x01SEED TEXT\x01"
_SENTINEL_Q = "\x01QUESTION\x01"
_SENTINEL_A = "\x01ANSWER A\x01"
_SENTINEL_B = "\x01ANSWER B\x01"


def _signatures() -> dict[str, dict[str, Any]]:
    """Per prompt builder: the fixed start (or, when the prompt starts with a variable part, the fixed end) of its
    user message and the system messages it uses - derived from the builders themselves, so a reworded prompt
    is still recognised and a new one fails the import-time self-check instead of being answered wrongly."""
    primary0 = prompts.DEFAULT_TAXONOMY.primaries[0]
    dialogue = [{"role": "user", "content": _SENTINEL_Q}, {"role": "assistant", "content": _SENTINEL_A}]
    builds: dict[str, list[tuple[list[dict[str, str]], list[str]]]] = {
        "classify_primary": [(prompts.classify_primary(_SENTINEL_TEXT), [_SENTINEL_TEXT])],
        "classify_secondary": [(prompts.classify_secondary(_SENTINEL_TEXT, primary0), [_SENTINEL_TEXT, primary0])],
        "generate_questions": [(prompts.generate_questions(_SENTINEL_TEXT, 7), [_SENTINEL_TEXT, "7"])],
        "score_question": [(prompts.score_question(_SENTINEL_TEXT, _SENTINEL_Q), [_SENTINEL_TEXT, _SENTINEL_Q])],
        "answer_common": [(prompts.answer_common(_SENTINEL_TEXT, _SENTINEL_Q, s), [_SENTINEL_TEXT, _SENTINEL_Q])
                          for s in prompts.ANSWER_STYLES],
        "judge_answers": [(prompts.judge_answers(_SENTINEL_Q, _SENTINEL_A, _SENTINEL_B),
                           [_SENTINEL_Q, _SENTINEL_A, _SENTINEL_B])],
        "answer_complex": [(prompts.answer_complex(_SENTINEL_TEXT, _SENTINEL_Q), [_SENTINEL_TEXT, _SENTINEL_Q])],
        "follow_up_question": [(prompts.follow_up_question(dialogue, p, text=_SENTINEL_TEXT),
                                [_SENTINEL_TEXT, _SENTINEL_Q, _SENTINEL_A]) for p in prompts.PERSONAS],
        "follow_up_answer": [(prompts.follow_up_answer(dialogue + [{"role": "user", "content": _SENTINEL_B}],
                                                       _SENTINEL_TEXT),
                              [_SENTINEL_TEXT, _SENTINEL_Q, _SENTINEL_A, _SENTINEL_B])],
        "direct_answer": [(prompts.direct_answer(_SENTINEL_Q), [_SENTINEL_Q])],
    }
    out: dict[str, dict[str, Any]] = {}
    for step, variants in builds.items():
        messages, variables = variants[0]
        user = messages[-1]["content"]
        first = min(user.find(v) for v in variables if v in user)
        last = max(user.rfind(v) + len(v) for v in variables if v in user)
        prefix, suffix = user[:first], user[last:]
        sig = {"prefix": prefix, "suffix": ""} if len(prefix.strip()) >= 20 else {"prefix": "", "suffix": suffix}
        if len((sig["prefix"] or sig["suffix"]).strip()) < 20:
            raise RuntimeError(f"offline teacher: no fixed wording found for prompt {step!r}")
        sig["systems"] = {m[0]["content"] for m, _ in variants if m[0]["role"] == "system"}
        out[step] = sig
    # Self-check: every builder output is recognised as its own step and no other.
    for step, variants in builds.items():
        for messages, _ in variants:
            got = [s for s in out if _matches(out[s], messages)]
            if got != [step]:
                raise RuntimeError(f"offline teacher: prompt {step!r} is recognised as {got}")
    return out


def _matches(sig: dict[str, Any], messages: list[dict[str, Any]]) -> bool:
    user = str(messages[-1].get("content", ""))
    system = next((str(m.get("content")) for m in messages if m.get("role") == "system"), None)
    if sig["systems"] and system not in sig["systems"]:
        return False
    return user.startswith(sig["prefix"]) if sig["prefix"] else user.endswith(sig["suffix"])


_SIGNATURES = _signatures()


def recognise_prompt(messages: list[dict[str, Any]]) -> str:
    """The prompt builder (a key of ``prompts.PROMPT_VERSIONS``) that made ``messages``; raises if none did."""
    if not messages or messages[-1].get("role") != "user":
        raise OfflineTeacherError("offline teacher: the request does not end with a user message")
    got = [step for step, sig in _SIGNATURES.items() if _matches(sig, messages)]
    if len(got) != 1:
        user = " ".join(str(messages[-1].get("content", "")).split())
        raise OfflineTeacherError(f"offline teacher: unknown prompt (matches {got or 'no pipeline prompt'}): "
                                  f"{user[:160]!r}")
    return got[0]


def _between(user: str, start: str, end: str, what: str, last: bool = False) -> str:
    i = user.rfind(start) if last else user.find(start)
    j = user.find(end, i + len(start)) if i >= 0 else -1
    if i < 0 or j < 0:
        raise OfflineTeacherError(f"offline teacher: no {what} in the prompt")
    return user[i + len(start):j].strip()


# ------------------------------------------------------------------------------------------------ fact lookup
def _fold(s: str) -> str:
    return " ".join(s.casefold().split())


def fact_labels(kind: str, i: int) -> tuple[str, str]:
    """(primary, secondary) taxonomy labels of fact ``i`` of ``kind``."""
    fact = _TABLES[kind][i]
    return TAXONOMY_LABELS.get((fact[2], fact[3]), (fact[2], fact[3]))


def _fact_of_text(text: str) -> tuple[str, int]:
    """The fact a seed text states: the facts whose name AND answer (indication / test) both occur in it; of
    those, the longest name (then answer) wins. A metformin text mentions "type 2 diabetes" too, but not its test."""
    folded = _fold(text)
    found = [(len(f[0]), len(f[1]), kind, i) for kind, table in _TABLES.items() for i, f in enumerate(table)
             if _fold(f[0]) in folded and _fold(f[1]) in folded]
    if not found:
        raise OfflineTeacherError(f"offline teacher: the text states none of the facts it knows: {text[:120]!r}")
    found.sort(reverse=True)
    if len(found) > 1 and found[0][:2] == found[1][:2]:
        raise OfflineTeacherError(f"offline teacher: the text states several facts equally: {text[:120]!r}")
    return found[0][2], found[0][3]


def _template_regex(template: str, slot: str) -> re.Pattern[str]:
    head, tail = template.split(slot)
    return re.compile(re.escape(head) + r"(?P<name>.+?)" + re.escape(tail) + r"$", re.IGNORECASE)


# (kind, paraphrase index or "side:<k>", regex); paraphrases are sample.py's (0-2 and 5-7 train, 3-4 held-out).
_QUESTION_PATTERNS: list[tuple[str, Any, re.Pattern[str]]] = [
    (kind, p, _template_regex(t, _SLOT[kind])) for kind in _TABLES for p, t in enumerate(_QUESTIONS[kind])
] + [(kind, f"side:{k}", _template_regex(t, _SLOT[kind])) for kind in _TABLES
     for k, t in enumerate(_SIDE_QUESTIONS[kind])]


def _parse_question(question: str) -> tuple[str, int, Any]:
    """``(kind, fact index, paraphrase)`` of a question the teacher wrote (or copied): paraphrase is 0-7 for
    sample.py's paraphrases, ``"side:<k>"`` for a side question."""
    q = " ".join(question.split())
    for kind, p, pattern in _QUESTION_PATTERNS:
        m = pattern.match(q)
        if not m:
            continue
        name = _fold(m.group("name"))
        for i, fact in enumerate(_TABLES[kind]):
            if _fold(fact[0]) == name:
                return kind, i, p
    raise OfflineTeacherError(f"offline teacher: unknown question {q[:120]!r}")


def _variant(text: str) -> int | str:
    t = text.lstrip()
    if t.startswith(PLANTED_HEADING):
        return "copied"
    for headings in VARIANT_HEADINGS.values():
        for v, heading in enumerate(headings):
            if t.startswith(heading):
                return v
    raise OfflineTeacherError(f"offline teacher: unknown kind of seed text (no known heading): {text[:80]!r}")


_QUOTED_QUESTION = re.compile(r"\"([^\"]{10,}?\?)\"")


# ------------------------------------------------------------------------------------------------ answers
def _plain(kind: str, i: int) -> str:
    return sample._answer(kind, _TABLES[kind][i])


def _side_answer(kind: str, i: int, p: str) -> str:
    fact = _TABLES[kind][i]
    if kind == "drug":
        return f"{sample._cap(fact[0])} is {sample.DRUG_CLASSES[fact[0]]}. It is used to treat {fact[1]}."
    primary, secondary = fact_labels(kind, i)
    return f"{sample._cap(fact[0])} is usually managed in {secondary} ({primary}). {_plain(kind, i)}"


def _answer_for(question: str) -> tuple[str, int, Any, str]:
    kind, i, p = _parse_question(question)
    return kind, i, p, _side_answer(kind, i, p) if isinstance(p, str) else _plain(kind, i)


_WRONG_FACTS = frozenset(random.Random(f"offline-teacher-rejected:{SEED}").sample(
    [(kind, i) for kind, table in _TABLES.items() for i in range(len(table))],
    round(WRONG_FRACTION * sum(len(t) for t in _TABLES.values()))))


def is_wrong_direct_answer(kind: str, i: int) -> bool:
    """Whether the direct (DPO rejected) answer for fact ``i`` of ``kind`` is the wrong one (a fixed half)."""
    return (kind, i) in _WRONG_FACTS


def _direct_answer(question: str) -> str:
    kind, i, p = _parse_question(question)
    if isinstance(p, str):
        return _side_answer(kind, i, p)
    if not is_wrong_direct_answer(kind, i):
        return _plain(kind, i)
    _, ruled_out = sample._reasoning_answer(kind, i, p, SEED)
    table = _TABLES[kind]
    return sample._wrong_answer(kind, table[i], table[ruled_out[0]])


def _check_same_fact(text_fact: tuple[str, int], kind: str, i: int, question: str) -> None:
    if text_fact != (kind, i):
        raise OfflineTeacherError(f"offline teacher: question {question!r} is about another fact than its text")


def _allowed_labels(user: str) -> list[str]:
    return [line[2:].strip() for line in user.splitlines() if line.startswith("- ")]


def offline_teacher_reply(messages: list[dict[str, Any]]) -> str:
    """The offline teacher's reply to one pipeline prompt (OpenAI-style chat ``messages``). Deterministic; raises
    :class:`OfflineTeacherError` for a prompt, text or question it does not know."""
    step = recognise_prompt(messages)
    user = str(messages[-1]["content"])
    text = _between(user, "<text>\n", "\n</text>", "<text> block", last=True) if "<text>" in user else None

    if step in ("classify_primary", "classify_secondary"):
        kind, i = _fact_of_text(text)
        label = fact_labels(kind, i)[0 if step == "classify_primary" else 1]
        allowed = _allowed_labels(user)
        if label not in allowed:
            raise OfflineTeacherError(f"offline teacher: its label {label!r} is not among the allowed {allowed}")
        return label

    if step == "generate_questions":
        n = len(prompts_json_example(user))
        kind, i = _fact_of_text(text)
        variant = _variant(text)
        name = _TABLES[kind][i][0]
        if variant == "copied":
            quoted = _QUOTED_QUESTION.search(text)
            if not quoted:
                raise OfflineTeacherError(f"offline teacher: no quoted question in {text[:80]!r}")
            first = quoted.group(1)
        else:
            first = sample._question(kind, _TABLES[kind][i], paraphrase_of(variant))
        if n - 1 > len(_SIDE_QUESTIONS[kind]):
            raise OfflineTeacherError(f"offline teacher: can write at most {len(_SIDE_QUESTIONS[kind]) + 1} "
                                      f"questions per text, {n} asked")
        side = [t.format(**{_SLOT[kind][1:-1]: name}) for t in _SIDE_QUESTIONS[kind][: n - 1]]
        return _json({"questions": [first, *side]})

    if step == "score_question":
        question = _between(user, "<question>\n", "\n</question>", "<question> block")
        kind, i, p = _parse_question(question)
        _check_same_fact(_fact_of_text(text), kind, i, question)
        if isinstance(p, str):  # side question: clearly weaker than the paraphrase question
            scores = {"quality": 6, "complexity": 3, "relevance": 4}
        elif _variant(text) in COMPLEX_VARIANTS:  # a case discussion: complex (above the paper's threshold of 8)
            scores = {"quality": 9, "complexity": 9, "relevance": 6}
        else:  # reference entries, clinic notes, leaflets and copied questions: common
            scores = {"quality": 9, "complexity": 5, "relevance": 6}
        return _json({**scores, "mentions_specific_details": False})

    if step == "answer_common":
        question = _between(user, "<question>\n", "\n</question>", "<question> block")
        kind, i, p, answer = _answer_for(question)
        _check_same_fact(_fact_of_text(text), kind, i, question)
        style = next((s for s, desc in prompts.ANSWER_STYLES.items() if desc in user), None)
        if style is None:
            raise OfflineTeacherError("offline teacher: unknown answer style")
        return answer if style == next(iter(prompts.ANSWER_STYLES)) else f"{answer} {_STYLE_B_SENTENCE}"

    if step == "judge_answers":
        question = _between(user, "<question>\n", "\n</question>", "<question> block")
        a = _between(user, "<answer_A>\n", "\n</answer_A>", "<answer_A> block")
        b = _between(user, "<answer_B>\n", "\n</answer_B>", "<answer_B> block")
        plain = _answer_for(question)[3]
        return _json({"choice": "B" if b == plain and a != plain else "A"})

    if step == "answer_complex":
        question = _between(user, "<question>\n", "\n</question>", "<question> block")
        kind, i, p = _parse_question(question)
        _check_same_fact(_fact_of_text(text), kind, i, question)
        if isinstance(p, str):
            raise OfflineTeacherError(f"offline teacher: no reasoning answer for the side question {question!r}")
        return sample.reasoning_answer(kind, i, p, SEED)

    if step == "follow_up_question":
        kind, i = _fact_of_text(text)
        persona = next(p for p, desc in prompts.PERSONAS.items() if messages[0].get("content") == desc)
        fact = _TABLES[kind][i]
        return _FOLLOW_UP_QUESTIONS[(kind, persona)].format(drug=fact[0], test=fact[1])

    if step == "follow_up_answer":
        kind, i = _fact_of_text(text)
        return f"{_plain(kind, i)} {_SAFETY[kind]}"

    if step == "direct_answer":
        suffix = _SIGNATURES["direct_answer"]["suffix"]
        return _direct_answer(user[: len(user) - len(suffix)])

    raise OfflineTeacherError(f"offline teacher: no rule for prompt {step!r}")  # a new builder without a rule


def prompts_json_example(user: str) -> list[str]:
    """The question placeholders of generate_questions' JSON example (``"<question 1>"`` ...): how many it asks."""
    found = re.findall(r"\"<question (\d+)>\"", user)
    if not found:
        raise OfflineTeacherError("offline teacher: cannot tell how many questions are asked")
    return found


def _json(obj: dict[str, Any]) -> str:
    import json

    return json.dumps(obj, ensure_ascii=False)


# ------------------------------------------------------------------------------------------------ server
def OfflineTeacherServer(**kwargs: Any):  # noqa: N802 - reads as a class at call sites
    """A local OpenAI-compatible HTTP server (127.0.0.1, a free port) answering with :func:`offline_teacher_reply`
    and serving the model name ``offline-teacher``. Use as a context manager, or ``start()`` / ``stop()``; its
    ``base_url`` goes into the pipeline config. Keyword arguments go to ``ScriptedTeacherServer``."""
    from finemed_ray.toy.scripted_teacher import ScriptedTeacherServer

    return ScriptedTeacherServer(offline_teacher_reply, model=MODEL_NAME, **kwargs)
