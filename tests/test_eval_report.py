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
    # The project's own MCQ rows (synthesis, the demo's held-out questions) group by primary department, last.
    assert item_category(MCQItem(id="3", question="q", options={"A": "a"}, answer="A", benchmark="b", kind="mcq",
                                 extra={"department": "Pediatrics", "subdepartment": "Neonatology"})) == "Pediatrics"
    assert item_category(MCQItem(id="4", question="q", options={"A": "a"}, answer="A", benchmark="b", kind="mcq",
                                 extra={"department": "Pediatrics", "subject": "anatomy"})) == "anatomy"


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
    assert "| unextractable | 1 (10.0%) | 0 (0.0%) | -1 |" in md
    assert "cut off at max tokens" not in md  # no generated replies recorded a cut-off: no row is invented
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
        "accuracy.png", "predictions.jsonl", "report.json", "report.md", "results_lm_eval.json"]
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
    assert set(storage.list_files(out)) == {f"{out}/{name}" for name in ("accuracy.png", "predictions.jsonl",
                                                                         "report.json", "report.md",
                                                                         "results_lm_eval.json")}
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


# ------------------------------------------------------------------------------------------------ cut-off rate
def test_cut_off_rate_is_reported_beside_the_no_answer_rate():
    preds = []
    for i in range(10):  # without TTT 3 of 10 replies hit the token budget (2 of them left no answer), with TTT 1
        preds.append({"benchmark": "medqa", "id": i, "gold": "A", "pred": None if i in (0, 1) else "A",
                      "raw": "## Thought ...", "method": "cut_off" if i < 2 else "answer_phrase", "ttt": False,
                      "cut_off": i < 3, "completion_tokens": 512 if i < 3 else 100})
        preds.append({"benchmark": "medqa", "id": i, "gold": "A", "pred": "A", "raw": "ok", "method": "x",
                      "ttt": True, "cut_off": i == 0})
    # log-likelihood predictions carry no cut-off flag: no count is made up for them
    preds.append({"benchmark": "pubmedqa", "id": "p", "gold": "A", "pred": "A", "raw": "{}", "method": "loglik",
                  "ttt": False})
    s = score(preds)
    base = s["medqa"]["no_ttt"]
    assert (base["cut_off"], base["cut_off_rate"]) == (3, 0.3)
    assert (base["unextractable"], base["no_answer_rate"]) == (2, 0.2)
    assert (s["medqa"]["ttt"]["cut_off"], s["medqa"]["ttt"]["cut_off_rate"]) == (1, 0.1)
    assert "cut_off" not in s["pubmedqa"]["no_ttt"]
    md = render_markdown({"scores": s})
    medqa = md.split("## medqa")[1].split("## pubmedqa")[0]
    lines = medqa.splitlines()
    unx = next(i for i, line in enumerate(lines) if line.startswith("| unextractable |"))
    assert lines[unx] == "| unextractable | 2 (20.0%) | 0 (0.0%) | -2 |"
    assert "| cut off at max tokens | 3 (30.0%) | 1 (10.0%) | -2 |" in lines
    assert "cut off at max tokens" not in md.split("## pubmedqa")[1]


def test_runner_marks_replies_that_used_the_whole_budget():
    from finemed_ray.eval.runner import _prediction, cut_off

    assert cut_off("text", 64, 64) is True and cut_off("text", 63, 64) is False
    assert cut_off(None, 0, 64) is None and cut_off("text", None, 64) is None
    row = {"benchmark": "b", "id": "1", "gold": "A", "options": json.dumps({"A": "yes", "B": "no"}),
           "n_options": 2, "category": ""}
    cut = _prediction(row, "## Thought\n\nStep 1: it could be", None, False, max_tokens=8, completion_tokens=8)
    assert (cut["cut_off"], cut["pred"], cut["method"]) == (True, None, "cut_off")
    stopped = _prediction(row, "## Thought\n\nStep 1: it could be", None, False, max_tokens=8, completion_tokens=5)
    assert (stopped["cut_off"], stopped["method"]) == (False, "unfinished")
    failed = _prediction(row, None, "boom", False, max_tokens=8, completion_tokens=0)
    assert failed["cut_off"] is None and failed["method"] == "error"


# ------------------------------------------------------------------------------------------------ published figures
ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def _figures_yaml(tmp_path, body: str) -> str:
    path = tmp_path / "figures.yaml"
    path.write_text(body)
    return str(path)


def test_report_renders_published_figures_as_quoted_with_their_source(tmp_path):
    uri = _figures_yaml(tmp_path, """
figures:
  - model: Some-8B
    benchmark: medqa
    accuracy: 61.5
    source: A paper (arXiv 0000.00000), Table 2
    url: https://arxiv.org/abs/0000.00000
    setting: 5-shot
  - model: Some-8B
    benchmark: mmlu_medical
    category: anatomy
    accuracy: 70.0
    source: A model card
    url: https://example.org/card
""")
    report = write_report(str(tmp_path / "out"), _preds(), published=uri)
    assert report["published"]["source"] == uri and len(report["published"]["figures"]) == 2
    md = (tmp_path / "out" / "report.md").read_text()
    section = md.split("## Published figures (quoted, not measured)")[1].split("\n## ")[0]
    assert "not measured here, and not comparable like-for-like" in section
    assert ("| benchmark | measured here, without TTT | measured here, with TTT | model (published) "
            "| accuracy (quoted, not measured) | source |") in section
    # our measured figure sits beside the quoted one, in its own column; the source is linked
    assert ("| medqa | 60.0% (95% CI 31.3–83.2) | 80.0% (95% CI 49.0–94.3) | Some-8B | 61.5% (5-shot) "
            "| [A paper (arXiv 0000.00000), Table 2](https://arxiv.org/abs/0000.00000) |") in section
    assert "1 quoted figures are for benchmarks not in this run: mmlu_medical." in section
    # the quoted figures never enter the measured tables or the chart's series
    assert "61.5" not in md.split("## medqa")[1]


def test_published_figure_beside_our_category(tmp_path):
    preds = [{"benchmark": "mmlu_medical", "id": i, "gold": "A", "pred": "A" if i < 3 else "B", "raw": "", "ttt": False,
              "category": "anatomy" if i < 4 else "virology"} for i in range(8)]
    published = {"source": None, "figures": [{"model": "M", "benchmark": "mmlu_medical", "category": "anatomy",
                                              "accuracy": 49.3, "source": "S", "url": "u", "setting": None}]}
    md = render_markdown({"scores": score(preds), "published": published})
    assert "| mmlu_medical / anatomy | 75.0% (95% CI 30.1–95.4) | M | 49.3% | [S](u) |" in md


@pytest.mark.parametrize(("body", "match"), [
    ("figures:\n  - {model: M, benchmark: medqa, accuracy: 50, url: u}\n", r"figures\.0\.source: Field required"),
    ("figures:\n  - {model: M, benchmark: medqa, accuracy: 50, source: '  ', url: u}\n", r"figures\.0\.source"),
    ("figures:\n  - {model: M, benchmark: medqa, accuracy: 150, source: s, url: u}\n", r"figures\.0\.accuracy"),
    ("figures:\n  - {model: M, benchmark: medqa, accuracy: 50, source: s, url: u, note: x}\n",
     r"figures\.0\.note: unknown key"),
    ("figures:\n  - {model: M, benchmark: medqa, accuracy: 50, source: s, url: u}\n"
     "  - {model: M, benchmark: medqa, accuracy: 51, source: t, url: v}\n", r"figures\.1: M on medqa is already"),
    ("figures: []\n", r"figures: List should have at least 1 item"),
    ("- just a list\n", r"expected a mapping"),
    ("figures: [\n", r"not valid YAML"),
])
def test_bad_baselines_file_names_the_file_and_the_key(tmp_path, body, match):
    from finemed_ray.errors import ConfigError
    from finemed_ray.eval.report import load_baselines

    uri = _figures_yaml(tmp_path, body)
    with pytest.raises(ConfigError, match=match) as err:
        load_baselines(uri)
    assert uri in str(err.value)


def test_shipped_baselines_validate_and_every_figure_has_a_source():
    from finemed_ray.eval.report import load_baselines

    files = sorted((ROOT / "configs" / "baselines").glob("*.yaml"))
    assert files, "no published-figure files shipped"
    for path in files:
        figures = load_baselines(str(path))["figures"]
        assert figures
        for f in figures:
            assert f["source"].strip() and f["url"].startswith("https://"), f
        header = " ".join(path.read_text().split("\nfigures:")[0].replace("#", " ").split()).lower()
        assert "not comparable like-for-like" in header and "quoted from the source" in header


def test_chart_of_a_perfect_score(tmp_path):
    # Wilson's upper bound at 6/6 is 0.9999999999999999: the error bar must not come out negative.
    preds = [{"benchmark": "b", "id": i, "gold": "A", "pred": "A", "raw": "", "ttt": False} for i in range(6)]
    assert wilson_interval(6, 6)[1] < 1.0
    write_report(str(tmp_path), preds)
    assert (tmp_path / "accuracy.png").read_bytes().startswith(PNG_MAGIC)
