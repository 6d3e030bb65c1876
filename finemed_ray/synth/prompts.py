"""Versioned prompt builders for the teacher LLM in the synthesis pipeline (FineMedLM-o1, arXiv 2501.09213).

Every builder returns a list of chat messages (``{"role", "content"}`` dicts, system first) ready for an
OpenAI-style chat endpoint or a chat template. Each step has a version string in :data:`PROMPT_VERSIONS`; bump it
whenever the wording of that step changes, so cached teacher outputs keyed on it are not reused for a different
prompt. :func:`fingerprint` hashes the version together with the exact messages for a cache key.

The matching parsers are in :mod:`finemed_ray.synth.parsing`; the output contract each prompt asks for is what the
parser accepts:

======================  ==================================================================  =====================
step                    output asked for                                                    parser
======================  ==================================================================  =====================
classify_primary        one primary label, nothing else                                     taxonomy.match_primary
classify_secondary      one secondary label of the given primary, nothing else              taxonomy.match_secondary
generate_questions      JSON ``{"questions": [q1, ..., qn]}``                               parse_questions
score_question          JSON ``{"quality", "complexity", "relevance", "mentions_specific_details"}``  parse_scores
answer_common           plain answer text in the requested style                            parse_answer
judge_answers           JSON ``{"choice": "A" | "B"}``                                      parse_judge
answer_complex          ``## Thought`` section, then ``## Summarization`` section           parse_reasoning
follow_up_question      the next question only                                              parse_answer
follow_up_answer        the answer only                                                     parse_answer
direct_answer           a short answer without reasoning (DPO rejected)                     parse_answer
dpo_prompt              (the student's prompt, not sent to the teacher)                     -
======================  ==================================================================  =====================

Texts are inserted verbatim between ``<text>`` tags; ``max_text_chars`` (``None`` = no limit) clips a long source
text at a word boundary and marks the cut, so the pipeline config controls the teacher's context budget.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from finemed_ray.synth.taxonomy import DEFAULT_TAXONOMY, Taxonomy

__all__ = [
    "ANSWER_STYLES",
    "PERSONAS",
    "PROMPT_VERSIONS",
    "STEP_BY_STEP_INSTRUCTION",
    "answer_common",
    "answer_complex",
    "classify_primary",
    "classify_secondary",
    "clip_text",
    "direct_answer",
    "dpo_prompt",
    "fingerprint",
    "follow_up_answer",
    "follow_up_question",
    "generate_questions",
    "judge_answers",
    "render_dialogue",
    "score_question",
]

Message = dict[str, str]

PROMPT_VERSIONS: dict[str, str] = {
    "classify_primary": "classify_primary/v1",
    "classify_secondary": "classify_secondary/v1",
    "generate_questions": "generate_questions/v1",
    "score_question": "score_question/v1",
    "answer_common": "answer_common/v1",
    "judge_answers": "judge_answers/v1",
    "answer_complex": "answer_complex/v1",
    "follow_up_question": "follow_up_question/v1",
    "follow_up_answer": "follow_up_answer/v1",
    "direct_answer": "direct_answer/v1",
    "dpo_prompt": "dpo_prompt/v1",
}

# Two answer styles for common questions; the judge later keeps the better of the two.
ANSWER_STYLES: dict[str, str] = {
    "concise_clinical": (
        "Write as an experienced physician speaking to a colleague: precise, concise and clinically focused. Use "
        "correct medical terminology, state the key facts, mechanisms, diagnostics or management directly, and "
        "mention important caveats or contraindications where relevant."
    ),
    "patient_friendly": (
        "Write as a caring physician explaining to a patient or a non-specialist: clear, plain language and a "
        "well-organised explanation. Briefly explain any medical term you need, give the reasoning behind the "
        "advice, and say when the person should see a doctor or seek urgent care if that is relevant."
    ),
}

PERSONAS: dict[str, str] = {
    "patient": (
        "You are role-playing a patient (or a patient's relative) who is talking to a doctor. You have no medical "
        "training: use everyday language, and ask about what matters to you - what it means for you, what to do "
        "next, risks, side effects, what to expect."
    ),
    "clinician": (
        "You are role-playing a clinician (a resident or a colleague from another specialty) consulting a senior "
        "specialist. Ask a precise, technical question - e.g. about differential diagnosis, mechanism, evidence, "
        "dosing, monitoring, complications or management of a harder variant of the case."
    ),
}

STEP_BY_STEP_INSTRUCTION = (
    "Please think through this question step by step before giving your final answer."
)

_DOCTOR_SYSTEM = "You are a knowledgeable, careful medical expert. You answer accurately and do not invent facts."
_CLASSIFIER_SYSTEM = "You are a medical librarian who classifies medical texts by clinical department."
_JSON_ONLY = "Respond with a single JSON object only: no code fences, no explanation before or after it."


def clip_text(text: str, max_chars: int | None = None) -> str:
    """``text`` stripped; if longer than ``max_chars``, cut at the last space before the limit and mark the cut."""
    text = (text or "").strip()
    if max_chars is None or len(text) <= max_chars:
        return text
    if max_chars <= 0:
        raise ValueError(f"max_chars must be positive or None, got {max_chars}")
    cut = text[:max_chars]
    space = cut.rfind(" ")
    if space > max_chars // 2:
        cut = cut[:space]
    return cut.rstrip() + " [...]"


def _text_block(text: str, max_chars: int | None) -> str:
    return f"<text>\n{clip_text(text, max_chars)}\n</text>"


def _msgs(system: str, user: str) -> list[Message]:
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def _bullets(labels: Sequence[str]) -> str:
    return "\n".join(f"- {label}" for label in labels)


def fingerprint(step: str, messages: Sequence[Mapping[str, str]], **extra: Any) -> str:
    """A stable cache key (sha256 hex) of the step's prompt version, the exact messages and any extra settings
    (e.g. teacher model name, sampling parameters). Unknown steps raise ``KeyError``."""
    payload = {"version": PROMPT_VERSIONS[step], "messages": list(messages), "extra": extra}
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


# ------------------------------------------------------------------------------------------------- classification
def classify_primary(
    text: str, taxonomy: Taxonomy = DEFAULT_TAXONOMY, *, max_text_chars: int | None = None
) -> list[Message]:
    """Ask for the one primary department of ``text``; the reply must be one label from the list, verbatim."""
    labels = taxonomy.primaries
    user = (
        "Classify the medical text below into exactly one primary clinical department - the department whose "
        "doctors would most typically handle the topic it is mainly about.\n\n"
        f"Allowed departments:\n{_bullets(labels)}\n\n"
        f"{_text_block(text, max_text_chars)}\n\n"
        f'If no other department fits, choose "{labels[-1]}".\n'
        "Reply with the department name only, copied exactly from the list above: no explanation, no "
        "punctuation, no other words."
    )
    return _msgs(_CLASSIFIER_SYSTEM, user)


def classify_secondary(
    text: str, primary: str, taxonomy: Taxonomy = DEFAULT_TAXONOMY, *, max_text_chars: int | None = None
) -> list[Message]:
    """Ask for the secondary department of ``text`` within its (already chosen) ``primary`` department."""
    labels = taxonomy.secondaries(primary)
    if not labels:
        raise ValueError(f"primary department {primary!r} is not in the taxonomy {list(taxonomy.primaries)}")
    canonical = taxonomy.match_primary(primary)
    user = (
        f'The medical text below belongs to the primary department "{canonical}". Classify it into exactly one '
        "of that department's sub-departments - the one whose specialists would most typically handle the topic "
        "it is mainly about.\n\n"
        f"Allowed sub-departments:\n{_bullets(labels)}\n\n"
        f"{_text_block(text, max_text_chars)}\n\n"
        "Choose the closest sub-department even if the fit is not perfect.\n"
        "Reply with the sub-department name only, copied exactly from the list above: no explanation, no "
        "punctuation, no other words."
    )
    return _msgs(_CLASSIFIER_SYSTEM, user)


# ------------------------------------------------------------------------------------------------- questions
def generate_questions(text: str, n: int = 2, *, max_text_chars: int | None = None) -> list[Message]:
    """Ask for ``n`` distinct, self-contained medical questions grounded in ``text``, as JSON."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    example = json.dumps({"questions": [f"<question {i + 1}>" for i in range(n)]})
    user = (
        f"Read the medical text below and write {n} different questions that a medical student, doctor or "
        "patient could ask, whose answers draw on the medical knowledge in the text.\n\n"
        f"{_text_block(text, max_text_chars)}\n\n"
        "Requirements for every question:\n"
        "- Self-contained: it must be understandable and answerable without seeing the text. Never refer to "
        '"the text", "the passage", "the article", "this study", "the authors", "the patient above" and the like; '
        "if a case is needed, describe the relevant details inside the question itself.\n"
        "- Do not depend on details that only exist in this source (names of specific studies, authors, "
        "hospitals, sample sizes, table or figure numbers, exact study results).\n"
        "- Medically meaningful: ask about diagnosis, mechanisms, treatment, management, prevention, prognosis "
        "or clinical reasoning - prefer questions that need reasoning over simple fact look-ups.\n"
        "- The questions must differ from each other in what they ask.\n"
        "- Write in English, one question each, without numbering.\n\n"
        f"{_JSON_ONLY} Use exactly this shape, with {n} strings in the list:\n{example}"
    )
    return _msgs(_DOCTOR_SYSTEM, user)


def score_question(text: str, question: str, *, max_text_chars: int | None = None) -> list[Message]:
    """Ask for the paper's question scores as JSON: quality 1-10, complexity 1-10, relevance 1-6 and whether the
    question mentions details specific to the source text."""
    user = (
        "You are evaluating a medical question that was written from the source text below.\n\n"
        f"{_text_block(text, max_text_chars)}\n\n"
        f"<question>\n{question.strip()}\n</question>\n\n"
        "Score the question on these criteria:\n"
        "- quality (integer 1-10): is it clear, well-formed, medically accurate and answerable? 1 = unusable, "
        "10 = excellent.\n"
        "- complexity (integer 1-10): how much medical knowledge and multi-step reasoning does a good answer "
        "need? 1 = a trivial fact look-up, 10 = expert-level reasoning over several steps.\n"
        "- relevance (integer 1-6): how relevant is it to clinical medicine and to the medical content of the "
        "text? 1 = irrelevant, 6 = highly relevant.\n"
        "- mentions_specific_details (true or false): true if the question refers to the source itself or cannot "
        'be answered without it - e.g. "the text", "this study", "the authors", "the patient described", '
        "specific study names, sample sizes, table or figure numbers or results only found in this source. "
        "false if a doctor could answer it from general medical knowledge.\n\n"
        f"{_JSON_ONLY} Use exactly these keys:\n"
        '{"quality": <1-10>, "complexity": <1-10>, "relevance": <1-6>, "mentions_specific_details": <true|false>}'
    )
    return _msgs("You are a strict, consistent examiner of medical questions.", user)


# ------------------------------------------------------------------------------------------------- answers
def answer_common(text: str, question: str, style: str, *, max_text_chars: int | None = None) -> list[Message]:
    """Ask for an answer to a common (not complex) question in one of :data:`ANSWER_STYLES`."""
    if style not in ANSWER_STYLES:
        raise ValueError(f"unknown answer style {style!r}; expected one of {list(ANSWER_STYLES)}")
    user = (
        "Answer the medical question below. A reference text is given for background; use it where it is "
        "correct and relevant, and your own medical knowledge otherwise.\n\n"
        f"{_text_block(text, max_text_chars)}\n\n"
        f"<question>\n{question.strip()}\n</question>\n\n"
        f"Style: {ANSWER_STYLES[style]}\n\n"
        "Answer the question directly and completely. Do not mention or cite the reference text (the reader "
        "never sees it) and do not repeat the question. Reply with the answer only."
    )
    return _msgs(_DOCTOR_SYSTEM, user)


def judge_answers(question: str, answer_a: str, answer_b: str) -> list[Message]:
    """Ask which of two answers is better, as JSON ``{"choice": "A"|"B"}``."""
    user = (
        "Compare two answers to the same medical question and decide which one is better overall: first "
        "medical accuracy and safety, then completeness and relevance to the question, then clarity. Do not "
        "prefer an answer just because it is longer, and ignore the order in which they are shown.\n\n"
        f"<question>\n{question.strip()}\n</question>\n\n"
        f"<answer_A>\n{answer_a.strip()}\n</answer_A>\n\n"
        f"<answer_B>\n{answer_b.strip()}\n</answer_B>\n\n"
        f'{_JSON_ONLY} Use exactly this shape: {{"choice": "A"}} or {{"choice": "B"}}'
    )
    return _msgs("You are an impartial senior physician reviewing answers to medical questions.", user)


def answer_complex(text: str, question: str, *, max_text_chars: int | None = None) -> list[Message]:
    """Ask for a long, o1-style answer: a ``## Thought`` section with the full reasoning, then a
    ``## Summarization`` section with the final answer."""
    user = (
        "Answer the complex medical question below with careful, explicit reasoning. A reference text is given "
        "for background; use it where it is correct and relevant, and your own medical knowledge otherwise.\n\n"
        f"{_text_block(text, max_text_chars)}\n\n"
        f"<question>\n{question.strip()}\n</question>\n\n"
        "Write your reply in exactly two sections, with these two Markdown headings on their own lines and in "
        "this order:\n\n"
        "## Thought\n"
        "Think step by step as an expert clinician would: identify what is being asked, recall the relevant "
        "facts, weigh alternatives (e.g. differential diagnoses or treatment options), check your intermediate "
        "conclusions, notice and correct any mistake, and reach a conclusion.\n\n"
        "## Summarization\n"
        "A clear, self-contained final answer that states the conclusion and its key justification.\n\n"
        "Do not mention or cite the reference text (the reader never sees it). Write nothing before "
        '"## Thought" and use no other top-level headings named Thought or Summarization.'
    )
    return _msgs(_DOCTOR_SYSTEM, user)


# ------------------------------------------------------------------------------------------------- dialogues
def render_dialogue(dialogue: Sequence[Mapping[str, str]]) -> str:
    """Chat messages -> a transcript (``Patient/Questioner:`` and ``Doctor:`` turns; system messages skipped)."""
    lines = []
    for m in dialogue:
        role = m.get("role")
        if role == "system":
            continue
        who = "Questioner" if role == "user" else "Doctor"
        lines.append(f"{who}: {str(m.get('content', '')).strip()}")
    if not lines:
        raise ValueError("dialogue has no user or assistant turns")
    return "\n\n".join(lines)


def follow_up_question(
    dialogue: Sequence[Mapping[str, str]], persona: str, *, text: str | None = None, max_text_chars: int | None = None
) -> list[Message]:
    """Ask the teacher, role-playing ``persona`` ("patient" or "clinician"), for the next question in a dialogue.
    ``text`` (optional) is the source text, shown so the follow-up stays on topic."""
    if persona not in PERSONAS:
        raise ValueError(f"unknown persona {persona!r}; expected one of {list(PERSONAS)}")
    source = f"Background text the conversation is based on:\n{_text_block(text, max_text_chars)}\n\n" if text else ""
    user = (
        "Here is a conversation so far:\n\n"
        f"<dialogue>\n{render_dialogue(dialogue)}\n</dialogue>\n\n"
        f"{source}"
        "Write the questioner's next message: one natural follow-up question that builds on the doctor's last "
        "answer (asks for clarification, goes deeper, or raises a closely related practical concern). It must "
        "not repeat a question already asked, and must make sense without any other document.\n"
        'Reply with the question only - no "Questioner:" prefix, no quotes, no commentary.'
    )
    return _msgs(PERSONAS[persona], user)


def follow_up_answer(
    dialogue: Sequence[Mapping[str, str]], text: str, *, max_text_chars: int | None = None
) -> list[Message]:
    """Ask for the doctor's answer to the last (user) turn of ``dialogue``, with ``text`` as background."""
    if not dialogue or dialogue[-1].get("role") != "user":
        raise ValueError("dialogue must end with a user turn to answer")
    user = (
        "Here is a conversation between a questioner and a doctor:\n\n"
        f"<dialogue>\n{render_dialogue(dialogue)}\n</dialogue>\n\n"
        "Background text for reference (use it where correct and relevant, and your own medical knowledge "
        f"otherwise):\n{_text_block(text, max_text_chars)}\n\n"
        "Write the doctor's answer to the questioner's last message. Match the questioner's level (plain "
        "language for a patient, technical for a clinician), stay consistent with what the doctor said before, "
        "and do not mention or cite the background text.\n"
        'Reply with the answer only - no "Doctor:" prefix.'
    )
    return _msgs(_DOCTOR_SYSTEM, user)


# ------------------------------------------------------------------------------------------------- DPO
def direct_answer(question: str) -> list[Message]:
    """Ask for a short direct answer without any reasoning (the *rejected* side of a DPO pair)."""
    user = (
        f"{question.strip()}\n\n"
        "Give only a short, direct answer in one to three sentences. Do not show your reasoning, do not think "
        "step by step, and do not add headings."
    )
    return _msgs("You are a medical assistant who answers briefly.", user)


def dpo_prompt(
    question: str, *, instruction: str = STEP_BY_STEP_INSTRUCTION, system: str | None = None
) -> list[Message]:
    """The student-side prompt of a DPO pair: the question plus the step-by-step ``instruction`` (and an optional
    system message, e.g. the SFT system prompt)."""
    user = f"{question.strip()}\n\n{instruction.strip()}" if instruction and instruction.strip() else question.strip()
    msgs: list[Message] = [{"role": "system", "content": system}] if system else []
    msgs.append({"role": "user", "content": user})
    return msgs
