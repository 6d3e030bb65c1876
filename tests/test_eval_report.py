"""Scoring and the evaluation report: Wilson intervals against published values, per-benchmark/per-TTT scores,
and the report files written to a local directory and to S3 (with a baseline comparison)."""

from __future__ import annotations

import json

import pytest

from finemed_ray import storage
from finemed_ray.errors import DataError, StorageError
from finemed_ray.eval.report import load_report, render_markdown, score, wilson_interval, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("k", "n", "low", "high"),
    [
        (5, 10, 0.2366, 0.7634),   # Newcombe (1998), Table I / standard references
        (0, 10, 0.0, 0.2775),
        (10, 10, 0.7225, 1.0),
        (81, 263, 0.2553, 0.3662),  # Newcombe (1998) example 81/263
        (15, 148, 0.0624, 0.1605),  # Newcombe (1998) example 15/148
    ],
)
def test_wilson_known_values(k, n, low, high):
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(low, abs=1e-4) and hi == pytest.approx(high, abs=1e-4)


def test_wilson_edges():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo90, hi90 = wilson_interval(5, 10, z=1.645)
    lo95, hi95 = wilson_interval(5, 10)
    assert lo95 < lo90 < 0.5 < hi90 < hi95
    with pytest.raises(ValueError):
        wilson_interval(3, 2)
    with pytest.raises(ValueError):
        wilson_interval(-1, 2)


def _preds() -> list[dict]:
    preds = []
    # medqa: 10 items; without TTT 6 correct, 1 unextractable; with TTT 8 correct, 0 unextractable
    for i in range(10):
        preds.append({"benchmark": "medqa", "id": i, "gold": "A", "pred": "A" if i < 6 else (None if i == 9 else "B"),
                      "raw": f"reply {i}", "method": "answer_phrase" if i != 9 else "none", "ttt": False})
        preds.append({"benchmark": "medqa", "id": i, "gold": "A", "pred": "A" if i < 8 else "C",
                      "raw": f"ttt reply {i}", "method": "answer_phrase", "ttt": True})
    # pubmedqa: only without TTT, 3 of 4 correct
    for i, pred in enumerate(["A", "B", "C", "C"]):
        preds.append({"benchmark": "pubmedqa", "id": f"p{i}", "gold": ["A", "B", "C", "A"][i], "pred": pred,
                      "raw": "yes", "method": "option_text", "ttt": False})
    return preds


def test_score_per_benchmark_and_setting():
    s = score(_preds())
    assert list(s) == ["medqa", "pubmedqa"]
    base, ttt = s["medqa"]["no_ttt"], s["medqa"]["ttt"]
    assert (base["n"], base["correct"], base["unextractable"]) == (10, 6, 1)
    assert (ttt["n"], ttt["correct"], ttt["unextractable"]) == (10, 8, 0)
    assert base["accuracy"] == 0.6 and ttt["accuracy"] == 0.8
    assert s["medqa"]["delta"] == pytest.approx(0.2)
    assert base["ci95"]["low"] == pytest.approx(wilson_interval(6, 10)[0])
    assert set(s["pubmedqa"]) == {"no_ttt"}
    assert s["pubmedqa"]["no_ttt"]["accuracy"] == 0.75


def test_score_reports_chance_no_answer_paired_test_and_categories():
    preds = []
    for i in range(20):
        cat = "cardiology" if i < 12 else "neurology"
        base = {"benchmark": "mmlu-pro", "id": i, "gold": "A", "raw": "", "method": "x", "n_options": 10 if i < 10 else 4,
                "category": cat}
        preds.append({**base, "pred": "A" if i < 5 else (None if i < 8 else "B"), "ttt": False})
        preds.append({**base, "pred": "A" if i < 15 else "B", "ttt": True})
    s = score(preds)["mmlu-pro"]
    assert s["no_ttt"]["chance"] == pytest.approx((10 * 0.1 + 10 * 0.25) / 20)
    assert s["no_ttt"]["no_answer_rate"] == pytest.approx(3 / 20) and s["ttt"]["no_answer_rate"] == 0
    # paired on the same 20 items: 10 gained, 0 lost -> McNemar exact p = 2 * 0.5**10
    assert (s["paired"]["gained"], s["paired"]["lost"]) == (10, 0)
    assert s["paired"]["p_value"] == pytest.approx(2 * 0.5 ** 10)
    cats = s["categories"]
    assert set(cats) == {"cardiology", "neurology"}
    assert (cats["cardiology"]["no_ttt"]["n"], cats["cardiology"]["no_ttt"]["correct"]) == (12, 5)
    assert (cats["neurology"]["ttt"]["n"], cats["neurology"]["ttt"]["correct"]) == (8, 3)
    md = render_markdown({"scores": {"mmlu-pro": s}})
    assert "McNemar exact p=" in md and "| chance |" in md and "### mmlu-pro by category" in md
    # without option counts there is no chance level, and nothing is invented
    plain = score([{k: v for k, v in p.items() if k != "n_options"} for p in preds])["mmlu-pro"]
    assert plain["no_ttt"]["chance"] is None


def test_items_carry_their_category_to_the_predictions():
    from finemed_ray.eval.benchmarks import MCQItem
    from finemed_ray.eval.runner import item_category

    item = MCQItem(id="1", question="q", options={"A": "a", "B": "b"}, answer="A", benchmark="b", kind="mcq",
                   extra={"meta_info": "step1", "category": "health"})
    assert item_category(item) == "health"
    assert item_category(MCQItem(id="2", question="q", options={"A": "a"}, answer="A", benchmark="b", kind="mcq",
                                 extra={})) == ""


def test_score_rejects_bad_predictions():
    with pytest.raises(DataError, match="no predictions"):
        score([])
    with pytest.raises(DataError, match="prediction 0: missing gold"):
        score([{"benchmark": "b", "id": 1, "pred": "A", "ttt": False}])
    dup = _preds()[:1] * 2
    with pytest.raises(DataError, match=r"duplicate medqa/0 \(without TTT\); first at prediction 0"):
        score(dup)


def _check_report_files(out: str, report: dict) -> None:
    on_disk = storage.read_json(storage.join(out, "report.json"))
    assert on_disk == json.loads(json.dumps(report))
    assert load_report(out) == on_disk
    md = storage.read_text(storage.join(out, "report.md"))
    assert "## medqa" in md and "## pubmedqa" in md
    assert "| metric | without TTT | with TTT | Δ (TTT − no TTT) |" in md
    assert "| accuracy | 60.0% (95% CI 31.3–83.2) | 80.0% (95% CI 49.0–94.3) | +20.0 pp (McNemar exact p=0.5, gained 2, lost 0) |" in md
    assert "| correct / n | 6 / 10 | 8 / 10 |  |" in md
    assert "| unextractable | 1 | 0 | -1 |" in md
    assert "| metric | without TTT |\n" in md  # pubmedqa: one setting, no delta column
    png = storage.read_bytes(storage.join(out, "accuracy.png"))
    assert png.startswith(PNG_MAGIC) and len(png) > 5000
    lines = storage.read_text(storage.join(out, "predictions.jsonl")).splitlines()
    assert len(lines) == 24
    first = json.loads(lines[0])
    assert first == {"benchmark": "medqa", "id": "0", "ttt": False, "prediction": "A", "gold": "A",
                     "correct": True, "method": "answer_phrase", "raw": "reply 0"}
    rows = [json.loads(line) for line in lines]
    assert sum(r["correct"] for r in rows) == 6 + 8 + 3
    assert [r["prediction"] for r in rows if r["method"] == "none"] == [None]


def test_write_report_local(tmp_path):
    out = str(tmp_path / "eval" / "run1")
    report = write_report(out, _preds(), meta={"model": "tiny", "mode": "direct"})
    assert report["meta"] == {"model": "tiny", "mode": "direct"}
    assert report["baseline"] is None
    assert sorted(p.name for p in (tmp_path / "eval" / "run1").iterdir()) == [
        "accuracy.png", "predictions.jsonl", "report.json", "report.md"]
    _check_report_files(out, report)
    assert "- **model**: tiny" in (tmp_path / "eval" / "run1" / "report.md").read_text()


def test_write_report_s3_with_baseline(tmp_path, s3_prefix):
    base_preds = [dict(p, pred="A" if p["pred"] is not None else None) for p in _preds() if not p["ttt"]]
    base_uri = f"{s3_prefix}/baseline"
    baseline = write_report(base_uri, base_preds)
    assert baseline["scores"]["medqa"]["no_ttt"]["accuracy"] == 0.9
    assert baseline["scores"]["pubmedqa"]["no_ttt"]["accuracy"] == 0.5

    out = f"{s3_prefix}/run"
    report = write_report(out, _preds(), baseline=base_uri, meta={"model": "tiny"})
    assert set(storage.list_files(out)) == {f"{out}/{name}" for name in
                                            ("accuracy.png", "predictions.jsonl", "report.json", "report.md")}
    _check_report_files(out, report)
    deltas = report["baseline"]["deltas"]
    assert report["baseline"]["source"] == base_uri
    # each setting is compared with the baseline's no-TTT result (the baseline has no TTT run)
    assert deltas["medqa"]["no_ttt"]["delta"] == pytest.approx(0.6 - 0.9)
    assert deltas["medqa"]["ttt"]["delta"] == pytest.approx(0.8 - 0.9)
    assert deltas["medqa"]["ttt"]["baseline_setting"] == "no_ttt"
    assert deltas["pubmedqa"]["no_ttt"]["delta"] == pytest.approx(0.25)
    md = storage.read_text(f"{out}/report.md")
    assert "| Δ vs baseline | -30.0 pp (baseline 90.0%) | -10.0 pp (baseline 90.0%) |  |" in md
    assert "| Δ vs baseline | +25.0 pp (baseline 50.0%) |" in md

    # a baseline given as a loaded dict gives the same comparison
    local = write_report(str(tmp_path / "r"), _preds(), baseline=load_report(base_uri))
    assert local["baseline"]["deltas"] == deltas and local["baseline"]["source"] is None


def test_load_report_errors(tmp_path):
    with pytest.raises(StorageError):
        load_report(str(tmp_path / "missing"))
    (tmp_path / "x.json").write_text('{"not": "a report"}')
    with pytest.raises(DataError, match="not an evaluation report"):
        load_report(str(tmp_path / "x.json"))
