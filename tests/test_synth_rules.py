"""Synthesis pipeline rules: taxonomy matching, prompt builders, teacher-output parsers, question selection and
n-gram decontamination. Pure Python, no Ray, no model calls."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import pytest

from finemed_ray.toy.sample import DEPARTMENTS
from finemed_ray.errors import DataError
from finemed_ray.mcq import read_rows
from finemed_ray.synth import prompts
from finemed_ray.synth.decontam import Decontaminator, normalize_words
from finemed_ray.synth.parsing import (
    format_reasoning,
    parse_answer,
    parse_judge,
    parse_questions,
    parse_reasoning,
    parse_scores,
    reason_kind,
    select_question,
    split_kind,
)
from finemed_ray.synth.taxonomy import DEFAULT_TAXONOMY, Taxonomy, match_primary, match_secondary, normalize_label

BENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "benchmarks"
BENCH_FILES = {name: BENCH / name / "test.jsonl" for name in ("medqa", "medmcqa", "pubmedqa", "mmlu")}
needs_bench = pytest.mark.skipif(
    not all(p.is_file() for p in BENCH_FILES.values()),
    reason=f"real benchmark files not found under {BENCH} (../shared/data/benchmarks is absent)",
)


# ================================================================================================= taxonomy
def test_taxonomy_counts_and_labels():
    tax = DEFAULT_TAXONOMY
    assert tax.primaries == DEPARTMENTS
    assert len(tax.primaries) == 6
    assert len(tax.all_secondaries) == 29
    counts = {p: len(tax.secondaries(p)) for p in tax.primaries}
    assert counts == {
        "Internal Medicine": 8,
        "Surgery": 10,
        "Obstetrics & Gynecology": 2,
        "Pediatrics": 2,
        "Otorhinolaryngology": 3,
        "Other": 4,
    }
    assert "Endocrinology" in tax.secondaries("Internal Medicine")
    assert {"Ophthalmology", "Dentistry"} <= set(tax.secondaries("Otorhinolaryngology"))
    assert set(tax.secondaries("Other")) == {
        "Dermatology",
        "Rehabilitation",
        "Anesthesiology",
        "Traditional Chinese Medicine",
    }


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Internal Medicine", "Internal Medicine"),
        ("internal medicine", "Internal Medicine"),
        ("  INTERNAL   MEDICINE \n", "Internal Medicine"),
        ("Internal Medicine.", "Internal Medicine"),
        ('"Surgery"', "Surgery"),
        ("'Surgery'.", "Surgery"),
        ("**Pediatrics**", "Pediatrics"),
        ("Paediatrics", "Pediatrics"),
        ("Obstetrics and Gynecology", "Obstetrics & Gynecology"),
        ("obstetrics & gynaecology", "Obstetrics & Gynecology"),
        ("Obstetrics&Gynecology", "Obstetrics & Gynecology"),
        ("Department: Otorhinolaryngology", "Otorhinolaryngology"),
        ("Primary department - Other", "Other"),
        ("Answer: Department: Surgery.", "Surgery"),
        ("The department is: Surgery", "Surgery"),
        ("Primary: Pediatrics", "Pediatrics"),
    ],
)
def test_match_primary_accepts_normalised_labels(raw, expected):
    assert match_primary(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "   ",
        None,
        3,
        "ENT",
        "OB/GYN",
        "Obstetrics",  # a secondary, not a primary
        "Cardiology",
        "Internal",
        "Internal Medicine Department",
        "Surgery because the text is about appendectomy",
        "Surgery, Internal Medicine",
        "Surgery\nInternal Medicine",
        "Obstetrics/Gynecology",  # '/' is not 'and'
        "Otorhinolaryngology (ENT)",
        "General Surgery",
        "Others",
        "Unknown",
    ],
)
def test_match_primary_rejects_everything_else(raw):
    assert match_primary(raw) is None


@pytest.mark.parametrize(
    "raw, primary, expected",
    [
        ("Endocrinology", "Internal Medicine", "Endocrinology"),
        ("endocrinology.", "internal medicine", "Endocrinology"),
        ("Secondary department: Infectious diseases", "Internal Medicine", "Infectious Diseases"),
        ("Orthopaedics", "Surgery", "Orthopedics"),
        ("Haematology", "Internal Medicine", "Hematology"),
        ('"traditional chinese medicine"', "Other", "Traditional Chinese Medicine"),
        ("Anaesthesiology", "Other", "Anesthesiology"),
        ("Dentistry", "Otorhinolaryngology", "Dentistry"),
        ("Gynecology", "Obstetrics and Gynecology", "Gynecology"),
    ],
)
def test_match_secondary_accepts(raw, primary, expected):
    assert match_secondary(raw, primary) == expected


@pytest.mark.parametrize(
    "raw, primary",
    [
        ("Cardiology", "Surgery"),  # exists, but under another primary
        ("Endocrinology", "Pediatrics"),
        ("Respiratory", "Internal Medicine"),  # a synonym is not a label
        ("Rheumatology", "Internal Medicine"),
        ("Cardiology", "Not A Department"),
        ("Infectious Disease", "Internal Medicine"),  # singular is a different word
        ("TCM", "Other"),
        ("", "Other"),
    ],
)
def test_match_secondary_rejects(raw, primary):
    assert match_secondary(raw, primary) is None


def test_normalize_label_examples():
    assert normalize_label('**Department: "Obstetrics and Gynaecology".**') == "obstetrics and gynecology"
    assert normalize_label("Obstetrics & Gynecology") == "obstetrics and gynecology"
    assert normalize_label(None) == ""


def test_taxonomy_from_dict_override_and_validation():
    tax = Taxonomy.from_dict({"departments": {"Medicine": ["Cardiology", "Renal"], "Surgery": ["General"]}})
    assert tax.primaries == ("Medicine", "Surgery")
    assert tax.match_secondary("renal.", "medicine") == "Renal"
    assert tax.match_primary("Internal Medicine") is None
    bare = Taxonomy.from_dict({"A": ["x"]})
    assert bare.secondaries("a") == ("x",)
    assert Taxonomy.from_dict(None) == DEFAULT_TAXONOMY
    with pytest.raises(ValueError, match="same after normalisation"):
        Taxonomy.from_dict({"Ob & Gyn": ["x"], "ob and gyn": ["y"]})
    with pytest.raises(ValueError, match="at least one secondary"):
        Taxonomy.from_dict({"A": []})
    with pytest.raises(ValueError):
        Taxonomy.from_dict({"departments": {"A": ["x"]}, "extra": 1})


# ================================================================================================= prompts
TEXT = "Metformin is a first-line oral agent for type 2 diabetes; it lowers hepatic glucose output."
DIALOGUE = [
    {"role": "system", "content": "You are a helpful professional doctor."},
    {"role": "user", "content": "What is metformin used for?"},
    {"role": "assistant", "content": "It treats type 2 diabetes."},
]


def _builders():
    return {
        "classify_primary": lambda: prompts.classify_primary(TEXT),
        "classify_secondary": lambda: prompts.classify_secondary(TEXT, "Internal Medicine"),
        "generate_questions": lambda: prompts.generate_questions(TEXT, n=2),
        "score_question": lambda: prompts.score_question(TEXT, "Why is metformin first-line?"),
        "answer_common": lambda: prompts.answer_common(TEXT, "Q?", "concise_clinical"),
        "judge_answers": lambda: prompts.judge_answers("Q?", "a", "b"),
        "answer_complex": lambda: prompts.answer_complex(TEXT, "Q?"),
        "follow_up_question": lambda: prompts.follow_up_question(DIALOGUE, "patient"),
        "follow_up_answer": lambda: prompts.follow_up_answer(
            DIALOGUE + [{"role": "assistant", "content": "x"}, {"role": "user", "content": "Is it safe?"}], TEXT
        ),
        "direct_answer": lambda: prompts.direct_answer("Q?"),
        "dpo_prompt": lambda: prompts.dpo_prompt("Q?"),
    }


def test_every_builder_has_a_version_and_returns_chat_messages():
    builders = _builders()
    assert set(builders) == set(prompts.PROMPT_VERSIONS)
    for step, build in builders.items():
        msgs = build()
        assert msgs and msgs[-1]["role"] == "user", step
        assert all(set(m) == {"role", "content"} and m["content"].strip() for m in msgs), step
        assert prompts.PROMPT_VERSIONS[step].startswith(step + "/v")


def test_classify_prompts_list_exact_labels():
    user = prompts.classify_primary(TEXT)[-1]["content"]
    for label in DEPARTMENTS:
        assert f"- {label}\n" in user + "\n"
    sec = prompts.classify_secondary(TEXT, "surgery")[-1]["content"]
    assert '"Surgery"' in sec and "- Burn Surgery" in sec and "- Cardiology" not in sec
    with pytest.raises(ValueError, match="not in the taxonomy"):
        prompts.classify_secondary(TEXT, "Cardiology")


def test_prompt_contracts():
    assert '{"questions": ["<question 1>", "<question 2>", "<question 3>"]}' in (
        prompts.generate_questions(TEXT, n=3)[-1]["content"]
    )
    score = prompts.score_question(TEXT, "Q?")[-1]["content"]
    for key in ("quality", "complexity", "relevance", "mentions_specific_details"):
        assert f'"{key}"' in score
    complex_ = prompts.answer_complex(TEXT, "Q?")[-1]["content"]
    assert complex_.index("## Thought") < complex_.index("## Summarization")
    assert '{"choice": "A"}' in prompts.judge_answers("Q?", "a", "b")[-1]["content"]
    a = prompts.answer_common(TEXT, "Q?", "concise_clinical")[-1]["content"]
    b = prompts.answer_common(TEXT, "Q?", "patient_friendly")[-1]["content"]
    assert a != b
    assert prompts.dpo_prompt("What causes gout?") == [
        {"role": "user", "content": "What causes gout?\n\n" + prompts.STEP_BY_STEP_INSTRUCTION}
    ]
    assert prompts.dpo_prompt("Q?", system="S")[0] == {"role": "system", "content": "S"}
    patient = prompts.follow_up_question(DIALOGUE, "patient")
    clinician = prompts.follow_up_question(DIALOGUE, "clinician")
    assert patient[0]["content"] != clinician[0]["content"]
    assert "Doctor: It treats type 2 diabetes." in patient[-1]["content"]
    with pytest.raises(ValueError, match="persona"):
        prompts.follow_up_question(DIALOGUE, "nurse")
    with pytest.raises(ValueError, match="style"):
        prompts.answer_common(TEXT, "Q?", "pirate")
    with pytest.raises(ValueError, match="end with a user turn"):
        prompts.follow_up_answer(DIALOGUE, TEXT)


def test_clip_text_and_fingerprint():
    long = "word " * 100
    clipped = prompts.clip_text(long, 50)
    assert clipped.endswith(" [...]") and len(clipped) <= 50 + 6
    assert prompts.clip_text(" short ", 50) == "short"
    assert "[...]" in prompts.classify_primary(long, max_text_chars=40)[-1]["content"]
    msgs = prompts.classify_primary(TEXT)
    fp = prompts.fingerprint("classify_primary", msgs, model="teacher")
    assert fp == prompts.fingerprint("classify_primary", [dict(m) for m in msgs], model="teacher")
    assert fp != prompts.fingerprint("classify_primary", msgs, model="other")
    assert fp != prompts.fingerprint("classify_primary", prompts.classify_primary(TEXT + "!"), model="teacher")


# ================================================================================================= questions
Q1 = "What is the first-line pharmacological treatment for type 2 diabetes?"
Q2 = "How does metformin reduce blood glucose levels?"


@pytest.mark.parametrize(
    "raw",
    [
        json.dumps({"questions": [Q1, Q2]}),
        f'```json\n{{"questions": ["{Q1}", "{Q2}"]}}\n```',
        f'```\n{{"questions": ["{Q1}", "{Q2}"]}}\n```',
        f'Sure! Here are the questions:\n{{"questions": ["{Q1}", "{Q2}"]}}\nLet me know if you need more.',
        f'<think>The text is about metformin {{not json}}.</think>\n{{"questions": ["{Q1}", "{Q2}"]}}',
        json.dumps({"Questions": [{"question": Q1}, {"question": Q2}]}),
        json.dumps([Q1, Q2]),
        json.dumps({"questions": ["1. " + Q1, "2) " + Q2]}),
        json.dumps({"questions": ["  " + Q1 + "\n", "Q2: " + Q2]}),
    ],
)
def test_parse_questions_good(raw):
    assert parse_questions(raw, 2) == ([Q1, Q2], None)


@pytest.mark.parametrize(
    "raw, kind",
    [
        ("", "bad_json"),
        (None, "bad_type"),
        ("I cannot produce questions for this text.", "bad_json"),
        (f"{{'questions': ['{Q1}', '{Q2}']}}", "bad_json"),  # single quotes are not JSON
        (f'{{"questions": ["{Q1}", "{Q2}",]}}', "bad_json"),  # trailing comma
        (f'{{"questions": ["{Q1}", "{Q2}"', "bad_json"),  # truncated
        ("<think>still thinking", "truncated"),
        (json.dumps({"qs": [Q1, Q2]}), "missing_field"),
        (json.dumps({"questions": Q1}), "bad_field"),
        (json.dumps({"questions": [Q1, 7]}), "bad_field"),
        (json.dumps({"questions": [Q1]}), "wrong_count"),
        (json.dumps({"questions": [Q1, Q2, Q1 + " Explain."]}), "wrong_count"),
        (json.dumps({"questions": [Q1, "   "]}), "empty_question"),
        (json.dumps({"questions": [Q1, "Why?"]}), "too_short"),
        (json.dumps({"questions": [Q1, Q1.upper().rstrip("?") + " ?"]}), "duplicate_question"),
        (json.dumps({"questions": [{"q": Q1}, {"q": Q2}]}), "missing_field"),
    ],
)
def test_parse_questions_bad(raw, kind):
    value, reason = parse_questions(raw, 2)
    assert value is None and reason_kind(reason) == kind, reason


def test_parse_questions_keeps_leading_numbers_that_are_content():
    q = "5-year survival after radical cystectomy depends on which factors?"
    assert parse_questions(json.dumps({"questions": [q, Q1]}), 2).value[0] == q
    assert parse_questions(json.dumps({"questions": [Q1]}), 1).value == [Q1]


# ================================================================================================= scores
GOOD_SCORES = {"quality": 8, "complexity": 9, "relevance": 5, "mentions_specific_details": False}


@pytest.mark.parametrize(
    "raw",
    [
        json.dumps(GOOD_SCORES),
        "```json\n" + json.dumps(GOOD_SCORES, indent=2) + "\n```",
        "My evaluation:\n" + json.dumps(GOOD_SCORES) + "\nThe question is good.",
        '{"quality": "8", "complexity": 9.0, "relevance": " 5 ", "mentions_specific_details": "no"}',
        '{"Quality": 8, "Complexity": 9, "RELEVANCE": 5, "Mentions specific details": "False", "note": "x"}',
        '{"quality": 8, "complexity": 9, "relevance": 5, "mentions-specific-details": "NO"}',
    ],
)
def test_parse_scores_good(raw):
    assert parse_scores(raw) == (GOOD_SCORES, None)


def test_parse_scores_yes_is_true():
    raw = '{"quality": 1, "complexity": 10, "relevance": 6, "mentions_specific_details": "Yes"}'
    assert parse_scores(raw).value["mentions_specific_details"] is True
    raw = '{"quality": 1, "complexity": 10, "relevance": 6, "mentions_specific_details": true}'
    expected = {"quality": 1, "complexity": 10, "relevance": 6, "mentions_specific_details": True}
    assert parse_scores(raw).value == expected


@pytest.mark.parametrize(
    "patch, reason",
    [
        ({"quality": 11}, "out_of_range: quality=11 (allowed 1..10)"),
        ({"quality": 0}, "out_of_range: quality=0 (allowed 1..10)"),
        ({"relevance": 7}, "out_of_range: relevance=7 (allowed 1..6)"),
        ({"complexity": -1}, "out_of_range: complexity=-1 (allowed 1..10)"),
        ({"complexity": 7.5}, "not_integer: complexity=7.5"),
        ({"complexity": "high"}, "not_integer: complexity='high'"),
        ({"quality": True}, "not_integer: quality=True"),
        ({"relevance": None}, "missing_field: relevance"),
        ({"mentions_specific_details": "maybe"}, "bad_field: mentions_specific_details='maybe' (expected true/false)"),
        ({"mentions_specific_details": 1}, "bad_field: mentions_specific_details=1 (expected true/false)"),
    ],
)
def test_parse_scores_bad_values(patch, reason):
    assert parse_scores(json.dumps({**GOOD_SCORES, **patch})) == (None, reason)


def test_parse_scores_missing_fields_and_bad_json():
    for key in GOOD_SCORES:
        raw = json.dumps({k: v for k, v in GOOD_SCORES.items() if k != key})
        assert parse_scores(raw) == (None, f"missing_field: {key}")
    assert reason_kind(parse_scores("quality: 8, complexity: 9").reason) == "bad_json"
    assert reason_kind(parse_scores("{'quality': 8}").reason) == "bad_json"


def test_parse_scores_custom_ranges():
    raw = json.dumps({"quality": 4, "complexity": 5, "relevance": 5, "mentions_specific_details": False})
    ranges = {"quality": (1, 5), "complexity": (1, 5), "relevance": (1, 4)}
    assert parse_scores(raw, ranges) == (None, "out_of_range: relevance=5 (allowed 1..4)")
    assert parse_scores(raw, {"quality": (1, 5)}, bool_fields=()) == ({"quality": 4}, None)


# ================================================================================================= judge
@pytest.mark.parametrize(
    "raw, choice",
    [
        ('{"choice": "A"}', "A"),
        ('{"choice": "b"}', "B"),
        ('```json\n{"choice": "B"}\n```', "B"),
        ('After comparing both answers: {"choice": " A "} because it is safer.', "A"),
        ('{"Choice": "Answer B"}', "B"),
        ("B", "B"),
        ("**A**", "A"),
        ("Answer: B.", "B"),
    ],
)
def test_parse_judge_good(raw, choice):
    assert parse_judge(raw) == (choice, None)


@pytest.mark.parametrize(
    "raw, kind",
    [
        ('{"choice": "C"}', "bad_choice"),
        ('{"choice": "both"}', "bad_choice"),
        ('{"choice": "A or B"}', "bad_choice"),
        ('{"choice": 1}', "bad_choice"),
        ('{"winner": "A"}', "missing_field"),
        ("Both answers are equally good.", "bad_json"),
        ("", "bad_json"),
    ],
)
def test_parse_judge_bad(raw, kind):
    value, reason = parse_judge(raw)
    assert value is None and reason_kind(reason) == kind, reason


# ================================================================================================= reasoning
@pytest.mark.parametrize(
    "raw",
    [
        "## Thought\nStep 1: consider X.\nStep 2: verify.\n\n## Summarization\nThe answer is X.",
        "Sure, here is my answer.\n\n## Thought\nStep 1: consider X.\nStep 2: verify.\n"
        "## Summarization\nThe answer is X.\n",
        "### thought:\nStep 1: consider X.\nStep 2: verify.\n### SUMMARIZATION:\nThe answer is X.",
        "**Thought**\nStep 1: consider X.\nStep 2: verify.\n\n**Summarization:**\nThe answer is X.",
        "# **Thought**\nStep 1: consider X.\nStep 2: verify.\n# Summary\nThe answer is X.",
        "<think>hidden</think>\n## Thought\nStep 1: consider X.\nStep 2: verify.\n## Summarization\nThe answer is X.",
    ],
)
def test_parse_reasoning_good(raw):
    assert parse_reasoning(raw) == (("Step 1: consider X.\nStep 2: verify.", "The answer is X."), None)


@pytest.mark.parametrize(
    "raw, reason",
    [
        ("The answer is X.", "missing_section: ## Thought"),
        ("## Thought\nreasoning only", "missing_section: ## Summarization"),
        ("Thought: x\nSummarization: y", "missing_section: ## Thought"),  # plain lines are not headings
        ("## Thought\n\n## Summarization\nThe answer is X.", "empty_section: thought"),
        ("## Thought\nreasoning\n## Summarization\n   \n", "empty_section: summarization"),
        ("## Summarization\ny\n## Thought\nx", "section_order: Summarization comes before Thought"),
        ("## Thought\na\n## Thought\nb\n## Summarization\nc", "duplicate_section: 2 Thought headings"),
        ("## Thought\na\n## Summarization\nb\n## Summarization\nc", "duplicate_section: 2 Summarization headings"),
        ("<think>never closed ## Thought", "truncated: unterminated <think> block"),
        (42, "bad_type: expected a string, got int"),
    ],
)
def test_parse_reasoning_bad(raw, reason):
    assert parse_reasoning(raw) == (None, reason)


def test_reasoning_heading_inside_text_is_not_a_section():
    raw = "## Thought\nI will write the ## Summarization part later.\n## Summarization\nDone."
    assert parse_reasoning(raw).value == ("I will write the ## Summarization part later.", "Done.")
    assert parse_reasoning(format_reasoning(" a ", " b ")).value == ("a", "b")


# ================================================================================================= answers
def test_parse_answer():
    assert parse_answer("  Metformin.  \n") == ("Metformin.", None)
    assert parse_answer("Doctor: Take it with food.") == ("Take it with food.", None)
    assert parse_answer("**Questioner:** Is it safe in pregnancy?") == ("Is it safe in pregnancy?", None)
    assert parse_answer("<think>hmm</think>Yes.") == ("Yes.", None)
    assert reason_kind(parse_answer("   \n").reason) == "empty_answer"
    assert reason_kind(parse_answer("Answer:").reason) == "empty_answer"
    assert reason_kind(parse_answer(None).reason) == "bad_type"
    assert parse_answer("Yes.", min_chars=10) == (None, "too_short: 4 chars (min 10)")


# ================================================================================================= selection
def cand(q, quality, complexity, relevance, specific=False):
    return {
        "question": q,
        "scores": {
            "quality": quality,
            "complexity": complexity,
            "relevance": relevance,
            "mentions_specific_details": specific,
        },
    }


def test_select_drops_source_specific_questions():
    # the specific one scores higher but is dropped
    cs = [cand("a", 10, 10, 6, specific=True), cand("b", 5, 5, 3)]
    assert select_question(cs, 0, "t1") == (1, None)


def test_select_all_specific_drops_text():
    cs = [cand("a", 10, 10, 6, specific=True), cand("b", 5, 5, 3, specific=True)]
    value, reason = select_question(cs, 0, "t1")
    assert value is None
    assert reason == "source_specific: all questions mention source-specific details"
    assert reason_kind(reason) == "source_specific"


def test_select_tie_break_levels():
    # level 1: quality + complexity + relevance
    assert select_question([cand("a", 7, 7, 3), cand("b", 6, 6, 6)], 0, "k").value == 1
    # level 2: equal total (18) -> quality + complexity
    assert select_question([cand("a", 6, 6, 6), cand("b", 7, 7, 4)], 0, "k").value == 1
    # level 3: equal total (18) and q+c (14) -> quality
    assert select_question([cand("a", 9, 5, 4), cand("b", 8, 6, 4)], 0, "k").value == 0
    assert select_question([cand("a", 8, 6, 4), cand("b", 9, 5, 4)], 0, "k").value == 1


def test_select_random_tie_is_seeded_and_per_text():
    cs = [cand("a", 8, 8, 4), cand("b", 8, 8, 4)]
    picks = {key: select_question(cs, 1234, key).value for key in (f"text-{i}" for i in range(64))}
    assert set(picks.values()) == {0, 1}  # both sides get picked across texts
    again = {key: select_question(cs, 1234, key).value for key in picks}
    assert again == picks  # deterministic for seed + key
    other_seed = {key: select_question(cs, 99, key).value for key in picks}
    assert other_seed != picks
    # Golden values: stable across processes and PYTHONHASHSEED (sha256-seeded random.Random, not hash()).
    three = [cand("a", 8, 8, 4), cand("b", 8, 8, 4), cand("c", 8, 8, 4)]
    assert [select_question(three, 0, f"id{i}").value for i in range(10)] == [0, 2, 2, 1, 1, 2, 1, 2, 1, 0]


def test_select_ignores_unscored_candidates():
    cs = [{"question": "a", "scores": None}, cand("b", 3, 3, 3)]
    assert select_question(cs, 0, "k").value == 1
    cs = [{"question": "a", "scores": None}, cand("b", 3, 3, 3, specific=True)]
    assert reason_kind(select_question(cs, 0, "k").reason) == "source_specific"
    assert select_question([{"question": "a", "scores": None}], 0, "k") == (
        None,
        "no_scored_questions: 0 of 1 questions have scores",
    )
    assert reason_kind(select_question([], 0, "k").reason) == "no_scored_questions"
    # flat candidates (score fields at top level) work too
    flat = [{"question": "a", **cand("a", 2, 2, 2)["scores"]}, {"question": "b", **cand("b", 9, 9, 5)["scores"]}]
    assert select_question(flat, 0, "k").value == 1


def test_split_kind_threshold():
    assert split_kind({"complexity": 8}) == "common"
    assert split_kind({"complexity": 9}) == "complex"
    assert split_kind({"complexity": 1}) == "common"
    assert split_kind({"complexity": 7}, complex_threshold=6) == "complex"
    assert split_kind({"complexity": 6}, complex_threshold=6) == "common"


# ================================================================================================= decontamination
def test_normalize_words():
    assert normalize_words("A 17-year-old  Boy's ECG.") == ["a", "17", "year", "old", "boy", "s", "ecg"]


def _row(i, question, options=None):
    return {"realidx": i, "question": question, "options": options or {"A": "yes", "B": "no"}}


def test_decontam_synthetic_rules():
    long_q = (
        "A 45 year old man presents with crushing substernal chest pain radiating to the left arm "
        "and diaphoresis for two hours"
    )
    short_q = "which enzyme is deficient in classic phenylketonuria patients"  # 8 words: whole-segment gram
    tiny_q = "microangiopathic hemolytic anemia"  # 3 words: below min_words, not indexed
    d = Decontaminator.from_rows(
        {"bench": [_row(1, long_q), _row(2, short_q), _row(3, tiny_q)]}, n=13, min_words=8
    )
    assert d.check("Question: " + long_q.upper().replace(" ", ", ") + "?") == "contaminated:bench:1"
    assert d.check("Q: Which enzyme is deficient in classic phenylketonuria patients? Explain.") == (
        "contaminated:bench:2"
    )
    assert d.check("which enzyme is deficient in classic phenylketonuria") is None  # part of a short item
    assert d.check("Schistocytes suggest microangiopathic hemolytic anemia in this patient.") is None
    assert d.check("A 45 year old man presents with crushing substernal chest pain") is None  # 11 words only
    assert d.check("") is None and d.check(None) is None  # type: ignore[arg-type]
    # first hit in text order wins; matches lists all
    both = short_q + " and then " + long_q
    assert d.check(both) == "contaminated:bench:2"
    assert d.matches(both) == [("bench", "2"), ("bench", "1")]
    assert d.check_all(["clean text", long_q]) == "contaminated:bench:1"
    # n is configurable
    d5 = Decontaminator.from_rows({"bench": [_row(1, long_q)]}, n=5, min_words=3)
    assert d5.check("he had substernal chest pain radiating to the left arm") == "contaminated:bench:1"
    # pickles (shipped to Ray workers) and behaves the same afterwards
    d2 = pickle.loads(pickle.dumps(d))
    assert d2.check(long_q) == "contaminated:bench:1" and len(d2) == len(d)


def test_decontam_chunked_build_equals_single_chunk():
    rows = [
        _row(i, f"patient {i} presents with fever cough and shortness of breath after travel to region {i % 3}")
        for i in range(40)
    ] + [_row(100 + i, f"short item number {i} about renal tubular acidosis") for i in range(5)]
    whole = Decontaminator.from_rows({"b": rows})
    chunked = Decontaminator.from_rows({"b": rows}, chunk_words=7)  # many flushes and compactions
    assert (whole.hashes == chunked.hashes).all() and (whole.owners == chunked.owners).all()
    assert whole.short_lengths == chunked.short_lengths == (8,)
    assert chunked.check(rows[5]["question"]) == "contaminated:b:5"
    # this 13-gram is in items 0, 3, 6, ...: the first loaded item owns it
    assert chunked.check("presents with fever cough and shortness of breath after travel to region 0") == (
        "contaminated:b:0"
    )
    # earliest position in the text wins: the first 13-gram here is item 7's own
    assert chunked.check("patient 7 presents with fever cough and shortness of breath after travel to region 1") == (
        "contaminated:b:7"
    )


def test_decontam_grams_do_not_span_fields():
    q = "one two three four five six seven"
    opts = {"A": "eight nine ten", "B": "eleven twelve thirteen"}
    d = Decontaminator.from_rows({"b": [_row(1, q, opts)]}, n=8, min_words=20)
    assert d.check(q + " eight nine ten eleven twelve thirteen") is None
    d_q = Decontaminator.from_rows({"b": [_row(1, q + " " + q, opts)]}, n=8, fields=["question"], min_words=20)
    assert d_q.check(q + " one") == "contaminated:b:1"


def test_decontam_file_formats(tmp_path):
    q1 = "Does perioperative beta blockade reduce cardiac events in patients undergoing vascular surgery at high risk"
    q2 = (
        "Is early mobilisation after hip fracture surgery associated with lower mortality in elderly nursing home "
        "residents"
    )
    q3 = "Which antibiotic regimen is recommended for community acquired pneumonia in adults admitted to intensive care"
    as_array = tmp_path / "a.json"
    as_array.write_text(json.dumps([{"id": "x1", "question": q1}]))
    pqal = tmp_path / "ori_pqal.json"  # original PubMedQA: {pmid: {QUESTION, CONTEXTS: [...]}}
    pqal.write_text(json.dumps({"2112": {"QUESTION": "Is it?", "CONTEXTS": [q2[:60], q2[60:]]}}))
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text("not json\n\n" + json.dumps({"question": q3}) + "\n[1]\n")
    entries = read_rows(jsonl.read_text())
    assert [(e.number, e.error is None) for e in entries] == [(1, False), (3, True), (4, False)]
    d = Decontaminator.from_files(
        {"arr": str(as_array), "pqal": str(pqal), "lines": str(jsonl)},
        fields={"pqal": ["QUESTION", "contexts"]},
    )
    assert d.check(q1) == "contaminated:arr:x1"
    assert d.check(q2.upper()) == "contaminated:pqal:2112"
    assert d.check(q3) == "contaminated:lines:3"  # no id field: its line number, as evaluation names it
    assert d.matches(" ".join([q3, q1])) == [("lines", "3"), ("arr", "x1")]
    assert d.stats["per_benchmark"]["lines"]["bad_lines"] == 2
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="no JSON objects"):
        Decontaminator.from_files({"e": str(empty)})
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"question": "too short"}) + "\n")
    with pytest.raises(DataError, match="no item has indexable text"):
        Decontaminator.from_files({"s": str(short)})


def test_decontam_reads_s3(s3_prefix):
    from finemed_ray.storage import write_text

    q = "Which cranial nerve is most likely injured in a patient with a fracture of the stylomastoid foramen region"
    uri = f"{s3_prefix}/bench/test.jsonl"
    write_text(uri, json.dumps({"realidx": 7, "question": q}) + "\n")
    assert Decontaminator.from_files({"s3bench": uri}).check(q) == "contaminated:s3bench:7"


@pytest.fixture(scope="module")
def real_index():
    if not all(p.is_file() for p in BENCH_FILES.values()):
        pytest.skip(f"real benchmark files not found under {BENCH} (../shared/data/benchmarks is absent)")
    return Decontaminator.from_files({k: str(v) for k, v in BENCH_FILES.items()})


def _first_row(name, pred):
    with open(BENCH_FILES[name]) as f:
        for line in f:
            row = json.loads(line)
            if pred(row):
                return row
    raise AssertionError(f"no matching row in {name}")


def _mangle(text):
    """Change case and punctuation the way a paraphrasing teacher might copy text."""
    return re.sub(r"[,.;:]", " - ", text.swapcase()).replace("  ", " ")


@needs_bench
def test_decontam_catches_planted_real_questions(real_index):
    d = real_index
    assert d.stats["items"] == 1273 + 2816 + 500 + 1089
    medqa = _first_row("medqa", lambda r: True)
    planted = f"Consider this scenario. {_mangle(medqa['question'])} Explain your reasoning step by step."
    assert d.check(planted) == f"contaminated:medqa:{medqa['realidx']}"
    # a planted span of a long question in the middle of an answer
    words = medqa["question"].split()
    assert d.check("In summary, " + " ".join(words[20:35]).upper() + ", so disclosure matters.") == (
        f"contaminated:medqa:{medqa['realidx']}"
    )
    # a short (8-12 word) MedMCQA question copied verbatim is caught as a whole
    short = _first_row("medmcqa", lambda r: 8 <= len(normalize_words(r["question"])) < 13)
    assert ("medmcqa", str(short["realidx"])) in d.matches("Q: " + _mangle(short["question"]) + "? Discuss.")
    # a PubMedQA abstract (its question field) copied into a generated answer
    pub = _first_row("pubmedqa", lambda r: True)
    sentence = pub["question"].split("\n")[1][:200]
    assert ("pubmedqa", str(pub["realidx"])) in d.matches(sentence.lower())
    # MMLU options joined: a long option copied
    mmlu = _first_row("mmlu", lambda r: len(normalize_words(" ".join(r["options"].values()))) >= 13)
    assert ("mmlu", str(mmlu["realidx"])) in d.matches(" ".join(mmlu["options"].values()))


UNRELATED = [
    "Metformin is usually the first-line pharmacological treatment for type 2 diabetes because it lowers hepatic "
    "glucose production, does not cause hypoglycemia on its own and is inexpensive. Renal function should be "
    "checked before starting it and monitored during long-term use, and vitamin B12 levels may fall over years.",
    "## Thought\nThe patient has fever, neck stiffness and photophobia, which suggests meningitis. I should consider "
    "bacterial and viral causes, check for contraindications to lumbar puncture and start empirical antibiotics "
    "without delay if bacterial meningitis is likely.\n## Summarization\nStart empirical ceftriaxone and "
    "dexamethasone, then perform a lumbar puncture once it is safe.",
    "Which of the following statements is false about the management of acute otitis media in children under two?",
    "How should a clinician approach a 60-year-old woman with new-onset atrial fibrillation and a CHA2DS2-VASc score "
    "of 3 when deciding on anticoagulation?",
]


@needs_bench
@pytest.mark.parametrize("text", UNRELATED)
def test_decontam_does_not_flag_unrelated_medical_text(real_index, text):
    assert real_index.check(text) is None, real_index.matches(text)


@needs_bench
def test_decontam_does_not_flag_pubmedqa_train_abstracts(real_index):
    # Real medical abstracts that are not benchmark items (PubMedQA train vs the test benchmarks).
    with open(BENCH / "pubmedqa" / "train.jsonl") as f:
        rows = [json.loads(line) for line in f]
    flagged = [(r["realidx"], real_index.check(r["question"])) for r in rows]
    assert [x for x in flagged if x[1]] == []
