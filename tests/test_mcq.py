"""The one benchmark reader (finemed_ray.mcq): evaluation, dataset validation / log-likelihood scoring and
decontamination read every file and row the same way - same rows, ids, question, options and gold letter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finemed_ray import schemas
from finemed_ray.errors import DataError
from finemed_ray.eval.benchmarks import load_benchmark
from finemed_ray.eval.loglik import mcq_gold, mcq_options
from finemed_ray.mcq import BadRow, parse_item, read_rows, row_id
from finemed_ray.synth.decontam import Decontaminator, _flatten, _get, normalize_words

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "benchmarks"  # ../shared beside the clone, as in CI
REAL_FILES = ["medqa/test.jsonl", "medmcqa/test.jsonl", "pubmedqa/test.jsonl", "pubmedqa/train.jsonl",
              "mmlu/test.jsonl"]
Q = "Which drug is first line for type 2 diabetes in an adult with normal kidney function and no contraindications"


def _row(**kw) -> dict:
    row = {"question": Q, "options": {"A": "metformin", "B": "insulin", "C": "acarbose"}, "answer_idx": "A"}
    row.update(kw)
    return {k: v for k, v in row.items() if v is not ...}


# ------------------------------------------------------------------------------------------------ file shapes
def test_read_rows_container_shapes():
    jsonl = read_rows("\n" + json.dumps(_row(realidx=1)) + "\n{broken\n[1]\n")
    assert [(e.number, e.key, e.error is None, e.where) for e in jsonl] == [
        (2, None, True, "line 2"), (3, None, False, "line 3"), (4, None, False, "line 4")]
    assert jsonl[1].error.startswith("invalid JSON") and jsonl[2].error == "not a JSON object (list)"
    array = read_rows(json.dumps([_row(), 5, _row()], indent=2))
    assert [(e.number, e.unit, e.error) for e in array] == [(1, "item", None), (2, "item", "not a JSON object (int)"),
                                                          (3, "item", None)]
    by_id = read_rows(json.dumps({"2112": {"QUESTION": "Is it?"}, "77": _row()}, indent=1))
    assert [(e.number, e.key) for e in by_id] == [(1, "2112"), (2, "77")]
    one_line = read_rows(json.dumps({"question": Q, "options": {"A": {"text": "x"}}}))  # JSONL, not id -> row
    assert [(e.number, e.key) for e in one_line] == [(1, None)]
    assert read_rows("  \n\n") == []


def test_row_ids():
    assert row_id({"realidx": 3, "id": "x"}) == "3"  # realidx first, then id, idx, qid
    assert row_id({"id": " ", "idx": 4}) == "4"  # blank, dict, list and bool values are not ids
    assert row_id({"qid": {"a": 1}}, fallback="9") == "9"
    assert row_id({"realidx": 3}, key="pmid-1") == "pmid-1"  # an id -> row object's key beats fields
    assert row_id({"realidx": 3, "uid": 8}, key="k", id_field="uid") == "8"  # a configured field beats all
    with pytest.raises(BadRow, match="missing id field 'uid'"):
        row_id({"realidx": 3}, id_field="uid")


def test_bad_row_reasons_name_the_field_and_carry_the_id():
    with pytest.raises(BadRow, match="answer_idx 'D' not among options A-C") as info:
        parse_item(_row(realidx=5, answer_idx="D"))
    assert info.value.item_id == "5"
    with pytest.raises(BadRow, match="question: missing or empty"):
        parse_item(_row(question=" "), line_no=4)
    # the same reasons reach dataset quarantine and log-likelihood scoring
    assert schemas.validate_mcq_row(_row(answer_idx="D")) == "answer_idx 'D' not among options A-C"
    assert schemas.validate_mcq_row([1]) == "row: expected a JSON object, got list"
    with pytest.raises(DataError, match="MCQ item 'q7': answer_idx: missing"):
        mcq_gold(_row(id="q7", answer_idx=...))


def test_every_reader_accepts_every_shape(tmp_path):
    rows = [_row(realidx="r1"), _row(), _row(options=[{"key": "b", "text": " no "}, {"key": "a", "text": "yes"}],
                                             answer_idx="b")]
    files = {
        "jsonl": "\n".join(json.dumps(r) for r in rows) + "\n",
        "array": json.dumps(rows, indent=2),
        "object": json.dumps({f"k{i}": r for i, r in enumerate(rows)}),
    }
    expected_ids = {"jsonl": ["r1", "2", "3"], "array": ["r1", "2", "3"], "object": ["k0", "k1", "k2"]}
    for shape, text in files.items():
        path = tmp_path / f"{shape}.json"
        path.write_text(text)
        bench = load_benchmark(shape, str(path))
        assert [i.id for i in bench] == expected_ids[shape] and bench.skipped == [], shape
        assert bench[2].options == {"A": "yes", "B": "no"} and bench[2].answer == "B"
        index = Decontaminator.from_files({shape: str(path)})
        assert index.items == [(shape, i) for i in expected_ids[shape]]
        assert index.check(Q) == f"contaminated:{shape}:{expected_ids[shape][0]}"


def test_strict_errors_point_at_array_items(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps([_row(realidx=1), _row(realidx=2, options={})]))
    with pytest.raises(DataError, match=r"a\.json: item 2: options: empty"):
        load_benchmark("a", str(path), strict=True)
    dup = tmp_path / "dup.json"
    dup.write_text(json.dumps([_row(realidx=1), _row(realidx=1)]))
    assert load_benchmark("d", str(dup)).skipped == [(2, "1", "duplicate id '1' (first at item 1)")]


# ------------------------------------------------------------------------------------------------ real files
@pytest.mark.skipif(not REAL.is_dir(), reason=f"{REAL} not present (../shared/data/benchmarks)")
@pytest.mark.parametrize("rel", REAL_FILES)
def test_evaluation_validation_and_decontamination_read_real_files_alike(rel):
    path = REAL / rel
    entries = read_rows(path.read_text())
    rows = [e.value for e in entries]
    assert rows and all(e.error is None for e in entries)

    bench = load_benchmark(rel, str(path))  # evaluation
    assert bench.skipped == [] and bench.total_rows == len(rows) == len(bench)
    index = Decontaminator.from_files({rel: str(path)})  # decontamination
    assert index.stats["per_benchmark"][rel]["bad_lines"] == 0
    assert index.items == [(rel, item.id) for item in bench]  # same rows, same order, same ids

    for row, item in zip(rows, bench):
        assert item.id == str(row["realidx"])
        norm = schemas.normalize_mcq(row)  # dataset validation (GRPO's mcq_item reads rows through it)
        assert (norm["id"], norm["question"], norm["answer_idx"]) == (item.id, item.question, item.answer)
        assert {o["key"]: o["text"] for o in norm["options"]} == item.options
        assert mcq_options(row) == list(item.options.items()) and mcq_gold(row) == item.answer  # log-likelihood
        # the text decontamination indexes is the evaluated question and options
        assert normalize_words(_flatten(_get(row, "question"))) == normalize_words(item.question)
        assert normalize_words(_flatten(_get(row, "options"))) == normalize_words(" ".join(item.options.values()))
