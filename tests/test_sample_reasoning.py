"""Synthetic o1-style reasoning SFT rows and DPO preference pairs (finemed_ray.toy.sample)."""

from __future__ import annotations

import re

import pytest

from finemed_ray.data.dpo_prepare import validate_dpo_pair
from finemed_ray.toy.sample import (
    DEFAULT_SYSTEM_PROMPT,
    DISEASE_TESTS,
    DRUG_CLASSES,
    DRUG_INDICATIONS,
    SUMMARY_HEADER,
    THOUGHT_HEADER,
    bad_dpo_rows,
    sample_dpo_rows,
    sample_reasoning_rows,
    sample_sft_rows,
)
from finemed_ray.schemas import to_table, validate_dpo_row, validate_sft_row

N_FACTS = len(DRUG_INDICATIONS) + len(DISEASE_TESTS)
_ID = re.compile(r"^(?:cot|dpo)-(drug|test)-(\d\d)-p(\d)")


def _fact(row_id: str):
    kind, i, _ = _ID.match(row_id).groups()
    return kind, (DRUG_INDICATIONS if kind == "drug" else DISEASE_TESTS)[int(i)]


def _sections(answer: str) -> tuple[str, str]:
    assert answer.startswith(THOUGHT_HEADER + "\n\n"), answer[:80]
    assert answer.count(SUMMARY_HEADER) == 1
    thought, summary = answer[len(THOUGHT_HEADER):].split(SUMMARY_HEADER)
    return thought.strip(), summary.strip()


def test_reasoning_rows_have_thought_and_summary_with_the_fact():
    rows = sample_reasoning_rows()
    sft = {r["id"]: r for r in sample_sft_rows()}
    assert len(rows) == N_FACTS * 3 and len({r["id"] for r in rows}) == len(rows)
    for row in rows:
        assert validate_sft_row(row) is None
        kind, fact = _fact(row["id"])
        plain = sft[row["id"].removeprefix("cot-")]
        assert row["messages"][:-1] == plain["messages"][:-1]  # same system + question
        assert (row["department"], row["subdepartment"], row["source"]) == (
            plain["department"], plain["subdepartment"], plain["source"])
        thought, summary = _sections(row["messages"][-1]["content"])
        # The summarization is exactly the plain SFT answer, so the fact is in it verbatim.
        assert summary == plain["messages"][-1]["content"]
        assert fact[1] in summary
        steps = re.findall(r"^Step (\d+): ", thought, flags=re.M)
        assert steps == [str(k) for k in range(1, len(steps) + 1)] and 5 <= len(steps) <= 6
        assert fact[0] in thought and fact[1] in thought
        if kind == "drug":
            assert DRUG_CLASSES[fact[0]] in thought
        # 1-2 other facts of the table are named and ruled out.
        assert 1 <= thought.count("Could the answer be") <= 2
    to_table(rows, "sft")  # fits the Arrow SFT schema


def test_reasoning_rows_are_deterministic_and_follow_sft_options():
    assert sample_reasoning_rows(seed=3) == sample_reasoning_rows(seed=3)
    assert sample_reasoning_rows(seed=3) != sample_reasoning_rows(seed=4)
    # Same order and n / repeat rules as sample_sft_rows.
    ids = [r["id"] for r in sample_reasoning_rows(n=500, seed=2)]
    assert ids == ["cot-" + r["id"] for r in sample_sft_rows(n=500, seed=2)]
    assert len(set(ids)) == 500
    # An item's text depends on (seed, fact, paraphrase) only.
    few = sample_reasoning_rows(n=5, seed=2)
    full = {r["id"]: r for r in sample_reasoning_rows(seed=2)}
    assert all(full[r["id"]] == r for r in few)
    no_sys = sample_reasoning_rows(n=3, system_prompt=None)
    assert [m["role"] for m in no_sys[0]["messages"]] == ["user", "assistant"]
    held = sample_reasoning_rows(paraphrases="heldout")
    assert len(held) == N_FACTS * 2 and {r["id"][-1] for r in held} == {"3", "4"}
    with pytest.raises(ValueError):
        sample_reasoning_rows(n=-1)


def test_dpo_rows_validate_and_prefer_reasoning():
    rows = sample_dpo_rows()
    assert len(rows) == N_FACTS * 3 and len({r["id"] for r in rows}) == len(rows)
    reasoning = {r["id"].removeprefix("cot-"): r for r in sample_reasoning_rows()}
    kinds = {"direct-correct": 0, "direct-wrong": 0}
    for row in rows:
        assert validate_dpo_row(row) is None and validate_dpo_pair(row) is None
        assert row["chosen"] != row["rejected"]
        assert row["prompt"][0] == {"role": "system", "content": DEFAULT_SYSTEM_PROMPT}
        assert [m["role"] for m in row["prompt"]] == ["system", "user"]
        assert [m["role"] for m in row["chosen"]] == [m["role"] for m in row["rejected"]] == ["assistant"]
        kind, fact = _fact(row["id"])
        assert row["department"] == fact[2] and row["subdepartment"] == fact[3]
        # chosen is the item's reasoning answer, rejected a one-sentence direct answer.
        twin = reasoning[row["id"].removeprefix("dpo-")]
        assert row["prompt"] == twin["messages"][:-1]
        assert row["chosen"][0]["content"] == twin["messages"][-1]["content"]
        _, summary = _sections(row["chosen"][0]["content"])
        rejected = row["rejected"][0]["content"]
        assert THOUGHT_HEADER not in rejected and rejected.count(".") == 1
        kinds[row["rejected_kind"]] += 1
        if row["rejected_kind"] == "direct-correct":
            assert rejected == summary and fact[1] in rejected
        else:
            assert fact[1] not in rejected and rejected != summary
            # the wrong answer states a distractor the chosen answer's Thought explicitly rules out
            wrong = rejected.rsplit(" is ", 1)[-1].rstrip(".") if kind == "test" else \
                rejected.split(" is used to treat ", 1)[1].rstrip(".")
            assert f"Could the answer be {wrong}? No" in row["chosen"][0]["content"]
    assert kinds == {"direct-correct": len(rows) // 2, "direct-wrong": len(rows) // 2}
    to_table(rows, "dpo")  # fits the Arrow DPO schema (extra keys ignored)


def test_dpo_rows_deterministic_heldout_and_options():
    assert sample_dpo_rows(seed=1) == sample_dpo_rows(seed=1)
    assert sample_dpo_rows(seed=1) != sample_dpo_rows(seed=2)
    assert sorted(r["id"] for r in sample_dpo_rows(seed=1)) == sorted(r["id"] for r in sample_dpo_rows(seed=2))
    held = sample_dpo_rows(paraphrases="heldout")
    train_questions = {r["prompt"][-1]["content"] for r in sample_dpo_rows()}
    assert len(held) == N_FACTS * 2
    assert not train_questions & {r["prompt"][-1]["content"] for r in held}  # unseen wordings
    assert all(validate_dpo_pair(r) is None for r in held)
    assert all(r["rejected_kind"] == "direct-correct" for r in sample_dpo_rows(wrong_fraction=0.0))
    assert all(r["rejected_kind"] == "direct-wrong" for r in sample_dpo_rows(wrong_fraction=1.0))
    assert [m["role"] for m in sample_dpo_rows(system_prompt=None)[0]["prompt"]] == ["user"]
    with pytest.raises(ValueError):
        sample_dpo_rows(wrong_fraction=1.5)


def test_bad_dpo_rows_all_fail_validation():
    import json

    bad = bad_dpo_rows()
    assert isinstance(bad[-1], str)
    with pytest.raises(json.JSONDecodeError):
        json.loads(bad[-1])
    reasons = {row["id"]: validate_dpo_pair(row) for row in bad[:-1]}
    assert all(reasons.values()), reasons
    assert "identical" in reasons["bad-chosen-equals-rejected"]
    assert reasons["bad-empty-prompt"].startswith("prompt: empty")
    assert reasons["bad-empty-chosen"].startswith("chosen: ")
    assert reasons["bad-empty-user"].startswith("prompt: ")
    assert reasons["bad-missing-rejected"] == "rejected: missing"
    assert reasons["bad-chosen-user-role"].startswith("chosen: ")
    assert "wizard" in reasons["bad-unknown-role"]
    assert "last message must be from the user" in reasons["bad-prompt-ends-with-assistant"]
    assert reasons["bad-prompt-string"].startswith("prompt: expected a list")
    # The schema validator alone lets the two "empty text" rows through; the DPO prepare step catches them.
    assert validate_dpo_row(bad[2]) is None and validate_dpo_row(bad[3]) is None


def test_mcq_items_with_every_heldout_wording():
    from finemed_ray.toy.sample import sample_mcq_items

    every = sample_mcq_items(paraphrases="heldout", every_paraphrase=True)
    assert len(every) == 128 and len({i["id"] for i in every}) == 128
    assert {i["id"].rsplit("-p", 1)[1] for i in every} == {"3", "4"}  # both held-out wordings, nothing else
    # the default (one wording per fact) is unchanged by the option
    assert [i["id"] for i in sample_mcq_items(paraphrases="heldout")] == \
        [i["id"] for i in sample_mcq_items(paraphrases="heldout", every_paraphrase=False)]
