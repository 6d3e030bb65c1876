"""Benchmark loading: the real MedQA/MedMCQA/PubMedQA/MMLU files load completely, every bad-row case is skipped
with a clear reason (or raises in strict mode), the registry validates, S3 URIs work; prompts are well formed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from finemed_ray import storage
from finemed_ray.config import undocumented_fields, validate
from finemed_ray.errors import ConfigError, DataError
from finemed_ray.eval.benchmarks import (
    DEFAULT_BENCHMARKS,
    BenchmarkSpec,
    MCQItem,
    default_benchmarks,
    load_benchmark,
    load_benchmarks,
)
from finemed_ray.eval.extract import extract_answer, normalize_text
from finemed_ray.eval.prompting import build_messages, option_continuations

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "benchmarks"  # ../shared beside the clone, as in CI
# Skipped only without ../shared/data/benchmarks; where ../shared exists, conftest turns this skip into a failure.
needs_real = pytest.mark.skipif(not REAL.is_dir(), reason=f"{REAL} not present (../shared/data/benchmarks)")
REAL_FILES = {  # name, file, rows, kind
    "medqa": ("medqa/test.jsonl", 1273, "mcq"),
    "medmcqa": ("medmcqa/test.jsonl", 2816, "mcq"),
    "pubmedqa": ("pubmedqa/test.jsonl", 500, "yes_no_maybe"),
    "pubmedqa_train": ("pubmedqa/train.jsonl", 450, "yes_no_maybe"),
    "mmlu": ("mmlu/test.jsonl", 1089, "mcq"),
}


def _row(i: int = 0, **kw) -> dict:
    row = {"realidx": i, "question": f"Question {i}?", "options": {"A": "alpha", "B": "beta", "C": "gamma",
                                                                     "D": "delta"}, "answer_idx": "B"}
    row.update(kw)
    return {k: v for k, v in row.items() if v is not ...}


def _write(tmp_path: Path, lines: list, name: str = "b.jsonl") -> str:
    path = tmp_path / name
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


# ------------------------------------------------------------------------------------------------ real files
@pytest.fixture(scope="module")
def real_sets():
    return {name: load_benchmark(name, str(REAL / rel)) for name, (rel, _, _) in REAL_FILES.items()}


@needs_real
@pytest.mark.parametrize("name", list(REAL_FILES))
def test_real_benchmark_loads_every_row(real_sets, name):
    rel, rows, kind = REAL_FILES[name]
    bench = real_sets[name]
    raw = [json.loads(line) for line in (REAL / rel).read_text().splitlines() if line.strip()]
    assert len(raw) == rows
    assert bench.skipped == []
    assert len(bench) == rows and bench.total_rows == rows
    assert bench.kind == kind
    assert len({item.id for item in bench}) == rows
    for item, row in zip(bench, raw):
        assert item.id == str(row["realidx"])
        assert item.benchmark == name
        assert item.answer == row["answer_idx"]
        assert list(item.options) == sorted(row["options"])
        assert item.answer_text == row["options"][row["answer_idx"]].strip()
        assert "question" not in item.extra and "options" not in item.extra
    if name.startswith("pubmedqa"):
        assert all(item.options == {"A": "yes", "B": "no", "C": "maybe"} for item in bench)
        assert {item.answer for item in bench} == {"A", "B", "C"}
        assert all("answer_rationale" in item.extra for item in bench)
    if name == "mmlu":
        assert {item.extra["subject"] for item in bench} >= {"anatomy"}


@needs_real
def test_real_gold_answer_phrase_is_extracted(real_sets):
    """Every real item: the gold answer stated in the prompt's format (and common variants) is read back."""
    n = 0
    for bench in real_sets.values():
        for item in bench:
            for text in (f"the answer is ({item.answer})", f"The answer is {item.answer}.",
                         f"Answer: {item.answer}", f"Final answer: **{item.answer}**"):
                got = extract_answer(text, item.options)
                assert got.letter == item.answer, (bench.name, item.id, text, got)
            n += 1
    assert n == sum(rows for _, rows, _ in REAL_FILES.values())


@needs_real
def test_real_gold_option_text_is_extracted(real_sets):
    """Replying with the gold option's text recovers the gold letter, except where the text cannot identify it:
    two options share it, or it is itself another option's letter (MedQA item 709: options A "B", B "C", ...)."""
    checked, ambiguous = 0, []
    for bench in real_sets.values():
        for item in bench:
            gold_norm = normalize_text(item.answer_text)
            shared = sum(normalize_text(t) == gold_norm for t in item.options.values()) > 1
            is_letter = item.answer_text.strip().upper() in item.options and item.answer_text.strip() != item.answer
            if shared or is_letter:
                ambiguous.append((bench.name, item.id))
                continue
            got = extract_answer(item.answer_text, item.options)
            assert got.letter == item.answer, (bench.name, item.id, item.answer_text, got)
            checked += 1
    assert ambiguous == [("medqa", "709"), ("medmcqa", "0447b9a2-22ec-449c-8a23-a52c28ac6b34")]
    assert checked == sum(rows for _, rows, _ in REAL_FILES.values()) - 2


@needs_real
def test_default_registry_over_a_local_root(tmp_path):
    specs = default_benchmarks(str(REAL))
    present = {n: s for n, s in specs.items() if os.path.exists(s.path)}
    assert set(present) == {"medqa", "medmcqa", "pubmedqa", "mmlu_medical"}
    sets = load_benchmarks(present)
    assert {n: len(s) for n, s in sets.items()} == {"medqa": 1273, "medmcqa": 2816, "pubmedqa": 500,
                                                    "mmlu_medical": 1089}
    assert sets["pubmedqa"].kind == "yes_no_maybe"


# ------------------------------------------------------------------------------------------------ bad rows
def test_bad_rows_are_skipped_with_reasons(tmp_path):
    lines = [
        _row(1),                                                           # 1 ok
        "{not json",                                                       # 2
        _row(3, options=...),                                              # 3 no options
        _row(4, options={}),                                               # 4 empty options
        _row(5, answer_idx="E"),                                           # 5 gold not among A-D
        _row(6, options={"A": "x", "B": "y", "D": "z"}, answer_idx="A"),   # 6 not consecutive
        _row(7, options={k: k.lower() for k in "ABCDEFGHIJK"}, answer_idx="A"),  # 7 eleven options
        _row(8, question="   "),                                           # 8 empty question
        _row(1),                                                           # 9 duplicate id of line 1
        "",                                                                # 10 blank: not a row
        _row(11, options={"A": "x", "B": ""}, answer_idx="A"),             # 11 empty option text
        "[1, 2]",                                                          # 12 not an object
        _row(13, answer_idx=...),                                          # 13 no gold
        _row(14, options={"A": "only"}, answer_idx="A"),                   # 14 one option
        _row(15, answer_idx="c"),                                          # 15 ok: letters are upper-cased
    ]
    bench = load_benchmark("toy", _write(tmp_path, lines))
    assert [item.id for item in bench] == ["1", "15"]
    assert bench[1].answer == "C"
    assert bench.total_rows == 14
    reasons = {line: (rid, reason) for line, rid, reason in bench.skipped}
    assert sorted(reasons) == [2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 14]
    assert reasons[2][0] is None and reasons[2][1].startswith("invalid JSON")
    assert reasons[3] == ("3", "no options")
    assert reasons[4] == ("4", "options: empty")
    assert reasons[5] == ("5", "answer_idx 'E' not among options A-D")
    assert reasons[6] == ("6", "option letters A, B, D are not consecutive from A")
    assert reasons[7] == ("7", "11 options; at most 10 (A-J) are supported")
    assert reasons[8] == ("8", "question: missing or empty")
    assert reasons[9] == ("1", "duplicate id '1' (first at line 1)")
    assert reasons[11] == ("11", "option 'B': empty text")
    assert reasons[12] == (None, "not a JSON object (list)")
    assert reasons[13] == ("13", "answer_idx: missing")
    assert reasons[14] == ("14", "only 1 option; need at least 2")


def test_strict_mode_names_file_line_and_reason(tmp_path):
    path = _write(tmp_path, [_row(1), _row(2), _row(3, answer_idx="F")])
    assert len(load_benchmark("toy", path)) == 2
    with pytest.raises(DataError, match=r"b\.jsonl: line 3: answer_idx 'F' not among options A-D"):
        load_benchmark("toy", path, strict=True)
    dup = _write(tmp_path, [_row(12), _row(5), _row(12)], "dup.jsonl")
    with pytest.raises(DataError, match=r"dup\.jsonl: line 3: duplicate id '12' \(first at line 1\)"):
        load_benchmark("toy", dup, strict=True)


def test_empty_and_all_bad_files_raise(tmp_path):
    with pytest.raises(DataError, match="is empty"):
        load_benchmark("toy", _write(tmp_path, ["", "  "], "empty.jsonl"))
    with pytest.raises(DataError, match=r"no valid rows \(2 skipped; line 1: invalid JSON.*line 2: no options"):
        load_benchmark("toy", _write(tmp_path, ["{", _row(2, options=...)], "bad.jsonl"))


def test_ten_options_and_ids(tmp_path):
    ten = {k: f"opt {k}" for k in "JIHGFEDCBA"}  # any order in the file; items are ordered A..J
    lines = [
        _row(0, options=ten, answer_idx="J"),
        {"id": "x-1", "question": "q?", "options": {"A": "a", "B": "b"}, "answer_idx": "A"},
        {"question": "q?", "options": {"A": "a", "B": "b"}, "answer_idx": "B", "uid": 7},
    ]
    bench = load_benchmark("toy", _write(tmp_path, lines))
    assert list(bench[0].options) == list("ABCDEFGHIJ") and bench[0].answer == "J"
    assert [item.id for item in bench] == ["0", "x-1", "3"]  # realidx, id, line number
    assert bench[2].extra == {"uid": 7}
    by_uid = load_benchmark("toy", _write(tmp_path, lines[2:], "uid.jsonl"), id_field="uid")
    assert by_uid[0].id == "7"
    missing = load_benchmark("toy", _write(tmp_path, lines, "m.jsonl"), id_field="uid")
    assert [line for line, _, reason in missing.skipped if reason == "missing id field 'uid'"] == [1, 2]


def test_limit_keeps_first_valid_items_but_reports_all_skips(tmp_path):
    path = _write(tmp_path, [_row(1), _row(2, answer_idx="Z"), _row(3), _row(4), _row(5, options={})])
    bench = load_benchmark("toy", path, limit=2)
    assert [item.id for item in bench] == ["1", "3"]
    assert [line for line, _, _ in bench.skipped] == [2, 5]
    with pytest.raises(DataError, match="limit=0"):
        load_benchmark("toy", path, limit=0)


def test_yes_no_maybe_kinds(tmp_path):
    ynm = {"A": "Yes", "B": "No", "C": "Maybe"}
    lines = [
        _row(1, options=ynm, answer_idx="B"),
        {"realidx": "p2", "question": "Does it work?", "final_decision": "maybe"},   # no options
        {"realidx": "p3", "question": "Does it?", "answer": "YES", "options": None},
        {"realidx": "p4", "question": "Does it?", "answer": "perhaps"},
        _row(5),                                                                    # alpha..delta
        _row(6, options=ynm, answer_idx="A", answer="no"),                           # contradiction
    ]
    path = _write(tmp_path, lines)
    auto = load_benchmark("toy", path)
    assert [(i.id, i.kind) for i in auto] == [("1", "yes_no_maybe"), ("5", "mcq")]
    assert auto.kind == "mixed"
    assert [reason for _, _, reason in auto.skipped] == ["no options"] * 3 + [
        "answer_idx 'A' ('Yes') contradicts answer 'no'"]

    ynm_set = load_benchmark("toy", path, kind="yes_no_maybe")
    assert [(i.id, i.answer) for i in ynm_set] == [("1", "B"), ("p2", "C"), ("p3", "A")]
    assert ynm_set.kind == "yes_no_maybe"
    assert ynm_set[1].options == {"A": "yes", "B": "no", "C": "maybe"}
    reasons = [reason for _, _, reason in ynm_set.skipped]
    assert reasons[0] == "no options, and answer/final_decision is not yes, no or maybe"
    assert reasons[1].startswith("kind 'yes_no_maybe' but options are")
    assert reasons[2] == "answer_idx 'A' ('Yes') contradicts answer 'no'"

    forced = load_benchmark("toy", path, kind="mcq")
    assert {i.kind for i in forced} == {"mcq"} and len(forced) == 3


def test_loads_from_s3(tmp_path, s3_prefix):
    uri = f"{s3_prefix}/medqa/test.jsonl"
    storage.write_text(uri, "\n".join(json.dumps(_row(i)) for i in range(5)) + "\n" + "{broken\n")
    bench = load_benchmark("s3toy", uri)
    assert len(bench) == 5 and bench.path == uri
    assert bench.skipped[0][0] == 6
    with pytest.raises(DataError, match=r"s3://finemed-test/.*/medqa/test\.jsonl: line 6: invalid JSON"):
        load_benchmark("s3toy", uri, strict=True)


# ------------------------------------------------------------------------------------------------ registry
def test_registry_specs():
    assert set(DEFAULT_BENCHMARKS) == {"medqa", "medmcqa", "pubmedqa", "mmlu_medical", "mmlu_pro_health",
                                       "medbullets"}
    assert all(s.path.startswith("s3://") and s.name == n for n, s in DEFAULT_BENCHMARKS.items())
    assert DEFAULT_BENCHMARKS["pubmedqa"].kind == "yes_no_maybe"
    assert undocumented_fields(BenchmarkSpec) == []
    with pytest.raises(ConfigError, match="limitt: unknown key"):
        validate(BenchmarkSpec, {"name": "x", "path": "p", "limitt": 3})
    with pytest.raises(ConfigError, match="kind"):
        validate(BenchmarkSpec, {"name": "x", "path": "p", "kind": "essay"})
    with pytest.raises(ConfigError, match="limit"):
        validate(BenchmarkSpec, {"name": "x", "path": "p", "limit": 0})


def test_load_benchmarks_from_dicts(tmp_path):
    path = _write(tmp_path, [_row(i) for i in range(4)])
    sets = load_benchmarks([{"name": "a", "path": path, "limit": 3}, BenchmarkSpec(name="b", path=path)])
    assert {n: len(s) for n, s in sets.items()} == {"a": 3, "b": 4}
    with pytest.raises(DataError, match="listed twice"):
        load_benchmarks([{"name": "a", "path": path}, {"name": "a", "path": path}])
    with pytest.raises(ConfigError, match="pth: unknown key"):
        load_benchmarks([{"name": "a", "pth": path}])


# ------------------------------------------------------------------------------------------------ prompts
ITEM = MCQItem(id="1", question="Which drug treats type 2 diabetes?",
               options={"A": "Amlodipine", "B": "Metformin", "C": "Ondansetron", "D": "Levetiracetam",
                        "E": "Warfarin"}, answer="B", benchmark="toy")


def test_build_messages_modes():
    msgs = build_messages(ITEM)
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert msgs[0]["content"] == "You are a helpful professional doctor."
    user = msgs[1]["content"]
    assert user.startswith("Which drug treats type 2 diabetes?\n\nA. Amlodipine\nB. Metformin\n")
    assert "\nE. Warfarin\n" in user
    assert "step by step" in user and '"the answer is (X)"' in user and "A, B, C, D, E" in user
    direct = build_messages(ITEM, mode="direct", system_prompt="Be brief.")
    assert direct[0] == {"role": "system", "content": "Be brief."}
    assert "only the letter" in direct[1]["content"] and "step by step" not in direct[1]["content"]
    assert [m["role"] for m in build_messages(ITEM, system_prompt=None)] == ["user"]
    with pytest.raises(ConfigError, match="prompt mode 'chatty'"):
        build_messages(ITEM, mode="chatty")  # type: ignore[arg-type]


def test_yes_no_maybe_prompt_uses_letters():
    item = MCQItem(id="p", question="Context...\nDoes X help?", options={"A": "yes", "B": "no", "C": "maybe"},
                   answer="A", benchmark="pubmedqa", kind="yes_no_maybe")
    user = build_messages(item, mode="direct")[1]["content"]
    assert "A. yes\nB. no\nC. maybe" in user


def test_option_continuations():
    conts = option_continuations(ITEM)
    assert conts[1] == ("B", "The answer is (B) Metformin")
    assert [k for k, _ in conts] == list("ABCDE")
    assert option_continuations(ITEM, style="letter")[4] == ("E", "The answer is (E)")
    assert option_continuations(ITEM, style="text")[0] == ("A", "Amlodipine")
    # every continuation is read back as its own letter by the extractor
    assert all(extract_answer(text, ITEM.options).letter == k for k, text in conts)
    with pytest.raises(ConfigError):
        option_continuations(ITEM, style="bogus")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------- ../shared skip guard
_GUARD_PROBE = '''
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
BENCH = SHARED / "data" / "no-such-benchmarks"


@pytest.mark.skipif(not BENCH.is_dir(), reason=f"{BENCH} not present")
def test_marker_skip():
    pass


def test_inline_skip():
    pytest.skip("real files not found (../shared/data/benchmarks is absent)")


def test_unrelated_skip():
    pytest.skip("not a CPU vLLM build")


@pytest.mark.xfail(reason="../shared: a known failure")
def test_xfail():
    assert False
'''


def _guard_outcomes(root: Path) -> dict[str, str]:
    """Run the probe tests under a copy of tests/conftest.py in ``root/main/tests`` (so its ../shared is
    ``root/shared``); test name -> outcome from the JUnit report."""
    import shutil
    import subprocess
    import sys
    import xml.etree.ElementTree as ET

    tests = root / "main" / "tests"
    tests.mkdir(parents=True)
    shutil.copy(ROOT / "tests" / "conftest.py", tests / "conftest.py")
    (tests / "test_probe.py").write_text(_GUARD_PROBE)
    report = root / "report.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
                    "--rootdir", str(root / "main"), str(tests)], cwd=root / "main", capture_output=True,
                   timeout=300, check=False)
    outcomes = {}
    for case in ET.parse(report).iter("testcase"):
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        skipped = case.find("skipped")
        xfail = skipped is not None and skipped.get("type") == "pytest.xfail"
        outcomes[case.get("name")] = "xfailed" if xfail else ("failed" if {"failure", "error"} & set(kinds)
                                                              else "skipped" if kinds else "passed")
    return outcomes


def test_skips_for_missing_shared_data_fail_where_shared_exists(tmp_path):
    (tmp_path / "with" / "shared").mkdir(parents=True)
    assert _guard_outcomes(tmp_path / "with") == {
        "test_marker_skip": "failed", "test_inline_skip": "failed",  # ../shared exists: a skip hides a test
        "test_unrelated_skip": "skipped", "test_xfail": "xfailed"}
    assert _guard_outcomes(tmp_path / "without") == {  # a bare clone without ../shared: skips stay skips
        "test_marker_skip": "skipped", "test_inline_skip": "skipped",
        "test_unrelated_skip": "skipped", "test_xfail": "xfailed"}
