"""Schemas: validation reasons name the field; canonical tables are read unchanged by datasets/TRL."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from finemed_ray import schemas

BENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "benchmarks"

GOOD_SFT = {
    "id": "a1",
    "messages": [
        {"role": "system", "content": "You are a doctor."},
        {"role": "user", "content": "What treats hypothyroidism?"},
        {"role": "assistant", "content": "Levothyroxine."},
    ],
    "department": "Internal Medicine",
    "subdepartment": "Endocrinology",
    "source": "test",
}


@pytest.mark.parametrize(
    "row, reason",
    [
        ({"id": "x"}, "messages: missing"),
        ({"messages": "hello"}, "messages: expected a list"),
        ({"messages": []}, "messages: empty conversation"),
        ({"messages": [{"content": "hi"}]}, r"messages\[0\]\.role: None"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, r"messages\[0\]\.role: 'wizard'"),
        ({"messages": [{"role": "user", "content": 3}]}, r"messages\[0\]\.content: expected a string"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, "first non-system message must be from the user"),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                          {"role": "assistant", "content": "c"}]},
            "must alternate",
        ),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": " "}]}, "empty"),
        ({**GOOD_SFT, "department": 5}, "department: expected a string"),
        ("not an object", "expected a JSON object"),
    ],
)
def test_sft_validation_reasons(row, reason):
    import re

    got = schemas.validate_sft_row(row)
    assert got is not None and re.search(reason, got), got


def test_good_rows_pass_and_extra_columns_are_allowed():
    assert schemas.validate_sft_row(GOOD_SFT) is None
    assert schemas.validate_sft_row({**GOOD_SFT, "category": "extra"}) is None


def test_split_valid_keeps_every_row():
    rows = [GOOD_SFT, {"messages": []}, "junk", GOOD_SFT]
    good, bad = schemas.split_valid(rows, "sft", dataset="mem")
    assert len(good) == 2 and len(bad) == 2  # nothing dropped: every row is somewhere
    assert bad[1] == {"dataset": "mem", "reason": "row: expected a JSON object, got str", "raw": "junk"}
    assert json.loads(bad[0]["raw"]) == {"messages": []}


def test_jsonl_parse_errors_are_reasons():
    row, err = schemas.parse_jsonl_line('{"messages": [}')
    assert row is None and err.startswith("invalid JSON")


def test_dpo_validation():
    good = {
        "prompt": [{"role": "user", "content": "Q?"}],
        "chosen": [{"role": "assistant", "content": "Thought: ... Summarization: A"}],
        "rejected": [{"role": "assistant", "content": "A"}],
    }
    assert schemas.validate_dpo_row(good) is None
    assert "identical" in schemas.validate_dpo_row({**good, "rejected": good["chosen"]})
    assert "assistant messages only" in schemas.validate_dpo_row({**good, "chosen": good["prompt"]})
    assert "last message must be from the user" in schemas.validate_dpo_row({**good, "prompt": good["chosen"]})


def test_tables_round_trip_through_parquet_into_datasets_and_trl(tmp_path):
    import datasets
    from trl.data_utils import is_conversational

    sft = schemas.to_table([GOOD_SFT, {"messages": GOOD_SFT["messages"][1:]}], "sft")
    assert sft.schema == schemas.SFT_SCHEMA
    pq.write_table(sft, tmp_path / "sft.parquet")
    ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "sft.parquet"), split="train")
    assert ds[0]["messages"] == GOOD_SFT["messages"] and ds[1]["department"] is None
    assert is_conversational(ds[0])

    dpo_row = {
        "prompt": [{"role": "user", "content": "Q?"}],
        "chosen": [{"role": "assistant", "content": "long"}],
        "rejected": [{"role": "assistant", "content": "short"}],
    }
    dpo = schemas.to_table([dpo_row], "dpo")
    pq.write_table(dpo, tmp_path / "dpo.parquet")
    ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "dpo.parquet"), split="train")
    assert is_conversational(ds[0]) and ds[0]["chosen"] == dpo_row["chosen"]


def test_mcq_normalization_with_many_options():
    row = {"realidx": 7, "question": "Q", "options": {c: f"opt {c}" for c in "ABCDEFGHIJ"}, "answer_idx": "j"}
    out = schemas.normalize_mcq(row)
    assert out["id"] == "7" and out["answer_idx"] == "J" and len(out["options"]) == 10
    assert "answer_idx" in schemas.validate_mcq_row({**row, "answer_idx": "K"})
    assert "not consecutive from A" in schemas.validate_mcq_row({**row, "options": {"A": "x", "C": "y"}})


@pytest.mark.skipif(not BENCH.is_dir(), reason="../shared/data/benchmarks not present")
@pytest.mark.parametrize("name", ["medqa", "medmcqa", "pubmedqa", "mmlu"])
def test_real_benchmark_files_fit_the_mcq_schema(name):
    lines = (BENCH / name / "test.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    good, bad = schemas.split_valid(rows, "mcq", dataset=name)
    assert bad == [] and len(good) == len(rows)
    table = schemas.to_table(good, "mcq")
    assert table.num_rows == len(rows) and table.schema == schemas.MCQ_SCHEMA
