"""Few-shot prompting: worked examples drawn with a fixed seed from a dev split, never an evaluated question, laid
out as chat turns before the question, for generation and for log-likelihood scoring; the config refuses k > 0
without a dev split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finemed_ray.config import load_config
from finemed_ray.errors import ConfigError, DataError
from finemed_ray.eval.benchmarks import MCQItem, load_benchmark
from finemed_ray.eval.config import EvalJobConfig
from finemed_ray.eval.prompting import build_messages, draw_examples, example_reply, format_question
from finemed_ray.eval.runner import few_shot_examples, item_messages, item_rows

ROOT = Path(__file__).resolve().parents[1]
SYSTEM = "You are a helpful professional doctor."


def _item(i: int, question: str | None = None, **extra) -> MCQItem:
    return MCQItem(id=str(i), question=question or f"Question number {i}?", options={"A": f"alpha {i}",
                   "B": f"beta {i}", "C": f"gamma {i}"}, answer="ABC"[i % 3], benchmark="b", extra=extra)


POOL = [_item(i) for i in range(20)]


def test_same_seed_same_examples_other_seed_other_examples():
    first = draw_examples(POOL, 3, seed=7)
    assert [e.id for e in first] == [e.id for e in draw_examples(POOL, 3, seed=7)]
    assert [e.id for e in first] != [e.id for e in draw_examples(POOL, 3, seed=8)]
    assert len({e.id for e in first}) == 3  # drawn without replacement
    assert draw_examples(POOL, 0, seed=7) == []


def test_examples_never_include_an_evaluated_question():
    # The dev split holds copies of the test questions, re-spaced and re-cased: they are still the same question.
    tests = [_item(100 + i) for i in range(5)]
    pool = POOL[:4] + [_item(200 + i, question="  " + t.question.upper().replace(" ", "  ")) for i, t in
                       enumerate(tests)]
    for seed in range(50):
        drawn = draw_examples(pool, 4, seed=seed, exclude=tests)
        assert {e.id for e in drawn} == {e.id for e in POOL[:4]}
    with pytest.raises(DataError, match=r"few_shot.k=5, but the dev split has only 4 usable items \(5 of 9 "
                                        r"dropped as evaluated questions\)"):
        draw_examples(pool, 5, seed=0, exclude=tests)


def test_prompt_layout_direct_mode():
    examples = [_item(1), _item(2)]
    item = _item(9)
    messages = build_messages(item, mode="direct", system_prompt=SYSTEM, examples=examples)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert messages[0]["content"] == SYSTEM
    # each example is laid out exactly like the question, and answered in the form the question asks for
    assert messages[1]["content"] == format_question(examples[0], "direct")
    assert messages[2]["content"] == "The answer is (B)."
    assert messages[3]["content"] == format_question(examples[1], "direct")
    assert messages[4]["content"] == "The answer is (C)."
    assert messages[-1]["content"] == format_question(item, "direct")
    # zero-shot is unchanged: system + the question
    assert build_messages(item, mode="direct", system_prompt=SYSTEM) == [messages[0], messages[-1]]


def test_prompt_layout_reasoning_question_and_loglik():
    worked = _item(4, exp="Beta is the classic finding.")
    assert example_reply(worked, "reasoning") == "Beta is the classic finding.\n\nThe answer is (B)."
    assert example_reply(worked, "direct") == "The answer is (B)."  # direct mode shows no reasoning
    assert example_reply(_item(5), "reasoning") == "The answer is (C)."  # no explanation in the row
    # question mode: the question alone, answered by the option's text (how answers are read in that mode)
    q = build_messages(_item(9), mode="question", system_prompt=None, examples=[worked])
    assert q == [{"role": "user", "content": worked.question}, {"role": "assistant", "content": "beta 4"},
                 {"role": "user", "content": _item(9).question}]
    # log-likelihood: an example's reply is the gold option's scored continuation
    ll = build_messages(_item(9), mode="direct", system_prompt=None, examples=[worked], continuation="letter_text")
    assert ll[1]["content"] == "The answer is (B) beta 4"
    assert build_messages(_item(9), mode="direct", system_prompt=None, examples=[worked],
                          continuation="letter")[1]["content"] == "The answer is (B)"


def _cfg(*overrides: str) -> EvalJobConfig:
    return load_config(EvalJobConfig, ROOT / "configs/eval_tiny.yaml",
                       ["engine.model=m", "output.path=/tmp/x", *overrides])


def test_runner_uses_the_scoring_mode_for_the_examples():
    examples = [_item(1)]
    gen = item_messages(_item(9), _cfg("scoring.method=generate", "prompt.mode=direct").model_dump(mode="json"),
                        examples)
    assert gen[2] == {"role": "assistant", "content": "The answer is (B)."}
    ll = item_messages(_item(9), _cfg("prompt.mode=direct").model_dump(mode="json"), examples)  # loglik default
    assert ll[2] == {"role": "assistant", "content": "The answer is (B) beta 1"}


def test_config_needs_a_dev_split_for_k_above_zero():
    with pytest.raises(ConfigError, match=r"benchmarks\.0\.few_shot.*few_shot\.split_path: required when "
                                          r"few_shot\.k > 0 \(k=3\)"):
        _cfg("benchmarks.0.few_shot.k=3")
    with pytest.raises(ConfigError, match=r"few_shot\.split_path: .* is the evaluated file itself"):
        _cfg("benchmarks.0.few_shot.k=3", "benchmarks.0.few_shot.split_path=s3://my-bucket/benchmarks/medqa/test.jsonl")
    cfg = _cfg("benchmarks.0.few_shot.k=3", "benchmarks.0.few_shot.split_path=s3://b/dev.jsonl",
               "benchmarks.0.few_shot.seed=5")
    assert (cfg.benchmarks[0].few_shot.k, cfg.benchmarks[0].few_shot.seed) == (3, 5)
    assert cfg.benchmarks[1].few_shot.k == 0


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_job_draws_examples_from_the_dev_file_into_every_prompt(tmp_path):
    def row(i: int, q: str) -> dict:
        return {"id": i, "question": q, "options": {"A": "yes", "B": "no"}, "answer_idx": "AB"[i % 2]}

    test_path = _jsonl(tmp_path / "test.jsonl", [row(i, f"Test question {i}?") for i in range(4)])
    # the dev split repeats one test question: it must never be drawn
    dev_path = _jsonl(tmp_path / "dev.jsonl", [row(i, f"Dev question {i}?") for i in range(6)]
                      + [row(99, "Test question 2?")])
    cfg = _cfg(f"benchmarks=[{{name: t, path: {test_path}, kind: mcq, few_shot: {{k: 6, split_path: {dev_path}, "
               f"seed: 1}}}}]", "scoring.method=generate", "prompt.mode=direct")
    sets = {"t": load_benchmark("t", test_path, kind="mcq")}
    examples = few_shot_examples(cfg.benchmarks, sets)
    assert sorted(e.id for e in examples["t"]) == [str(i) for i in range(6)]  # all six dev-only questions
    assert examples == few_shot_examples(cfg.benchmarks, sets)  # same seed: same draw
    rows = item_rows(sets, cfg.model_dump(mode="json"), examples)
    for r in rows:
        turns = [m["content"] for m in r["messages"] if m["role"] == "user"]
        assert len(turns) == 7 and turns[-1].startswith(r["question"])
        assert not any(t.startswith(r["question"]) for t in turns[:-1])
    too_many = cfg.model_copy(deep=True)
    too_many.benchmarks[0].few_shot.k = 7
    with pytest.raises(DataError, match=r"benchmark 't': few_shot.k=7, but the dev split has only 6 usable items"):
        few_shot_examples(too_many.benchmarks, sets)
