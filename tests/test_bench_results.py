"""bench/RESULTS.md is generated from bench/results/*.json (bench/results_table.py): the committed table must be
what the JSON files give, and "met" / "not met" must follow the values and the declared targets. No benchmark
runs here."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `bench` is a folder of the repository, not an installed package
    sys.path.insert(0, str(ROOT))

from bench import results_table as rt  # noqa: E402


def _rows_of(text: str, label_start: str) -> list[list[str]]:
    """The cells of the Markdown table rows whose figure starts with ``label_start``."""
    out = []
    for line in text.splitlines():
        if line.startswith("| " + label_start):
            out.append([c.strip() for c in line.strip().strip("|").split(" | ")])
    return out


def _write(tmp_path: Path, name: str, data: dict) -> Path:
    (tmp_path / name).write_text(json.dumps(data))
    return tmp_path


def test_committed_table_matches_the_json():
    expected = rt.render(rt.load_results(rt.RESULTS_DIR))
    committed = rt.RESULTS_MD.read_text()
    assert committed == expected, (
        "bench/RESULTS.md is stale or was edited by hand: regenerate it with `make bench-table` "
        "(python -m bench.results_table) and commit it with the JSON it comes from")


def test_every_json_is_read_and_every_target_is_used():
    results = rt.load_results(rt.RESULTS_DIR)
    assert results, "bench/results/ has no JSON"
    rows = rt.build_rows(results)
    unread = sorted(set(results) - {r.file for r in rows if r.file})
    assert not unread, f"result JSON with no figure in bench/RESULTS.md (add a Figure for it): {unread}"
    used = {f.target for f in rt.FIGURES if f.target}
    assert used == set(rt.TARGETS), f"targets no figure uses: {sorted(set(rt.TARGETS) - used)}"
    assert all(f.target in rt.TARGETS for f in rt.FIGURES if f.target)
    assert all(t.source for t in rt.TARGETS.values())


@pytest.mark.parametrize(("value", "op", "limit", "expected"), [
    (1.09, "<=", 1.10, rt.MET), (1.10, "<=", 1.10, rt.MET), (1.11, "<=", 1.10, rt.NOT_MET),
    (0.95, ">=", 0.95, rt.MET), (0.94, ">=", 0.95, rt.NOT_MET),
    (20.0, "<", 20.0, rt.NOT_MET), (19.9, "<", 20.0, rt.MET),
    (0, "==", 0, rt.MET), (3, "==", 0, rt.NOT_MET), (True, "==", True, rt.MET), (False, "==", True, rt.NOT_MET),
])
def test_verdict(value, op, limit, expected):
    assert rt.verdict(value, rt.Target(op, limit, "t", "test")) == expected


def test_verdict_without_value_or_number():
    assert rt.verdict(None, rt.Target("<=", 1.0, "t", "test")) == rt.NOT_MEASURED
    assert rt.verdict(1.0, None) == rt.NO_TARGET
    assert rt.verdict(1.0, rt.Target(None, None, "near-linear", "test")) == rt.NOT_JUDGED


def test_missed_target_renders_not_met(tmp_path):
    """A synthetic serve JSON below its 4x target and one above it: computed from the values, not copied from the
    JSON's own verdict (which here claims the opposite and is flagged as inconsistent)."""
    base = {"benchmark": "serve", "engine": "vllm", "max_tokens": 32, "requests_per_level": 8, "errors_total": 0,
            "host": {"device": "cpu", "cpus": 2, "cpu_model": "Test CPU"}}
    _write(tmp_path, "serve_slow.json", {**base, "rps_16_over_1": 2.5, "meets_targets": {"rps_16_over_1": True}})
    _write(tmp_path, "serve_fast.json", {**base, "rps_16_over_1": 4.5})
    text = rt.render(rt.load_results(tmp_path))
    rows = {r[6]: r for r in _rows_of(text, "requests/s at concurrency 16 / at concurrency 1")}
    assert rows["`serve_slow.json`"][2:5] == ["2.5x", ">= 4x", "**not met**"]
    assert rows["`serve_fast.json`"][2:5] == ["4.5x", ">= 4x", "**met**"]
    assert "inconsistent JSON: it calls this met" in text
    assert "- Serving: requests/s at concurrency 16 / at concurrency 1, through our endpoint: 2.5x" in text
    # no provenance recorded: "unknown", the machine described from the JSON's own host fields
    assert rows["`serve_slow.json`"][7:] == ["unknown", "unknown", "cpu, Test CPU, 2 CPUs", "unknown"]


def test_provenance_is_shown(tmp_path):
    prov = {"command": "python -m bench.ttt --max-new-tokens 64", "commit": "0123456789abcdef0123",
            "worktree_dirty": True, "machine": "NVIDIA_H100, AMD EPYC, 16 CPUs", "date": "2026-12-01T10:00:00Z"}
    _write(tmp_path, "ttt_x.json", {
        "benchmark": "ttt", "host": {"device": "NVIDIA_H100", "provenance": prov}, "max_new_tokens": 64,
        "model": {"parameters": 100_000_000}, "ttt": {"k": 3, "steps": 4, "r": 8},
        "latency_ratio_ttt_vs_plain": 3.2, "plain_1_s": 1.0, "ttt_1": {"total_s": 3.2}})
    text = rt.render(rt.load_results(tmp_path))
    (row,) = _rows_of(text, "1 question with TTT / plain answering, 64-token answers")
    assert row[4] == "**not met**"
    assert row[7:] == ["`python -m bench.ttt --max-new-tokens 64`", "`0123456789 + local changes`",
                       "NVIDIA_H100, AMD EPYC, 16 CPUs", "2026-12-01T10:00:00Z"]
    # at the shipped settings, so no "not measured yet" row for them; a GPU JSON fills the GPU row
    assert not _rows_of(text, "1 question with TTT / plain answering, 64-token answers, at the shipped")
    (gpu,) = _rows_of(text, "TTT latency on one GPU")
    assert gpu[2] == "3.2x"


def test_figures_not_measured_are_listed_not_numbered(tmp_path):
    """With no JSON at all every figure of issue 18 is still in the table, as "not measured yet" / "no GPU figure"."""
    text = rt.render(rt.load_results(tmp_path))
    (serve_gpu,) = _rows_of(text, "(c) finemed-ray, TTT off / (a) `vllm serve`: output tokens/s, on GPU")
    assert serve_gpu[2:5] == ["-", ">= 0.9x `vllm serve` (on GPU)", rt.NO_GPU]
    (index,) = _rows_of(text, "ANN query p99 at 10^7 vectors")
    assert index[2:5] == ["-", "< 20 ms", rt.NOT_MEASURED]
    train = _rows_of(text, "stack (Ray Train + TRL + ZeRO-3) / bare DeepSpeed ZeRO-3 loop")
    assert len(train) == 4  # whole run wall / CPU, training phase wall / training processes CPU
    assert all(r[2:5] == ["-", "<= 1.10x a bare DeepSpeed ZeRO-3 loop", rt.NOT_MEASURED] for r in train)
    (replicas,) = _rows_of(text, "rows/s with 2 teacher replicas / 1")
    assert replicas[4] == rt.NOT_MEASURED


def test_setting_mismatch_is_noted(tmp_path):
    """A TTT figure measured at 2 adaptation steps is judged but flagged, and the shipped setting stays unmeasured."""
    _write(tmp_path, "ttt_cpu.json", {
        "benchmark": "ttt", "host": {"device": "cpu"}, "max_new_tokens": 512, "model": {"parameters": 1e8},
        "ttt": {"k": 3, "steps": 2, "r": 8}, "latency_ratio_ttt_vs_plain": 1.5, "plain_1_s": 2.0,
        "ttt_1": {"total_s": 3.0}, "targets": {"latency_ratio": 3.0}})
    text = rt.render(rt.load_results(tmp_path))
    (row,) = _rows_of(text, "1 question with TTT / plain answering, 512-token answers | ")
    assert row[4] == "**met**"
    assert "not the target's setting: `ttt.steps` is 2" in text
    assert "the JSON records an older target of 3" in text
    (shipped,) = _rows_of(text, "1 question with TTT / plain answering, 512-token answers, at the shipped")
    assert shipped[4] == rt.NOT_MEASURED


def test_check_mode(tmp_path):
    _write(tmp_path, "streaming_rss_cpu.json", {"benchmark": "streaming_rss", "peak_rss_growth": 0.2})
    out = tmp_path / "RESULTS.md"
    assert rt.main(["--results", str(tmp_path), "--out", str(out), "--check"]) == 1
    assert rt.main(["--results", str(tmp_path), "--out", str(out)]) == 0
    assert rt.main(["--results", str(tmp_path), "--out", str(out), "--check"]) == 0
    (row,) = _rows_of(out.read_text(), "peak Ray Train worker RSS")
    assert row[2:5] == ["+20.00% (unknown -> unknown MiB)", "<= +10%", "**not met**"]
    out.write_text(out.read_text().replace("not met", "met"))
    assert rt.main(["--results", str(tmp_path), "--out", str(out), "--check"]) == 1


def _spread(*v: float) -> dict:
    return {"min": min(v), "median": sorted(v)[len(v) // 2], "max": max(v), "all": list(v)}


def test_train_totals_and_scaling_are_read(tmp_path):
    """bench/train_overhead.py's totals (issue 18 item 3) are judged per total on the ratio of the medians; fewer than
    5 repeats is flagged and leaves the target's own row unmeasured; the scaling curve is listed."""
    totals = {"repeats": {"stack_zero3": 3, "bare_zero3": 3}, "at_least_5_repeats": False,
              "stack_zero3": {}, "bare_zero3": {}, "ratios": {}, "meets_target": {}}
    for key in ("job_wall_s", "job_cpu_s", "train_wall_s", "train_procs_cpu_s"):
        totals["stack_zero3"][key] = _spread(10.0, 11.0, 12.0)
        totals["bare_zero3"][key] = _spread(10.0, 10.0, 10.0)
        totals["ratios"][key] = {"of_medians": 1.1, "per_pair": [1.0, 1.1, 1.2], "min_pair": 1.0, "max_pair": 1.2}
        totals["meets_target"][key] = True
    _write(tmp_path, "train_overhead_cpu.json", {
        "benchmark": "train_overhead", "device": "cpu", "rows": 512, "totals": totals,
        "targets": {"vs_bare_zero3_total": 1.10},
        "scaling": {"global_batch": 8, "cpus": 2, "points": [
            {"workers": n, "train_wall_s": t, "speedup_train_wall_vs_fewest": s, "step_median_ms": m,
             "oversubscribed": n > 2} for n, t, s, m in ((1, 4.0, 1.0, 50.0), (2, 3.0, 1.333, 40.0),
                                                      (4, 5.0, 0.8, 70.0))]}})
    text = rt.render(rt.load_results(tmp_path))
    (wall,) = _rows_of(text, "stack (Ray Train + TRL + ZeRO-3) / bare DeepSpeed ZeRO-3 loop: total wall time of the "
                             "whole run, >= 5 repeats (min/median/max) | ")
    assert wall[4] == "**met**" and wall[2].startswith("1.1x (per repeat 1x-1.2x); stack 10.0 / 11.0 / 12.0 s")
    assert "`totals.at_least_5_repeats` is False" in text
    assert len(_rows_of(text, "stack (Ray Train + TRL + ZeRO-3) / bare DeepSpeed ZeRO-3 loop: total wall time of the "
                              "whole run, >= 5 repeats (min/median/max), at >= 5 repeats")) == 1
    (scale,) = _rows_of(text, "worker scaling on a fixed global batch")
    assert "at 1 / 2 / 4 workers" in scale[2] and "(4 workers oversubscribe them)" in scale[2]


def test_ttt_memory_of_8_questions_is_read(tmp_path):
    _write(tmp_path, "ttt_cpu.json", {
        "benchmark": "ttt", "host": {"device": "cpu"}, "max_new_tokens": 512, "ttt": {"k": 3, "steps": 4, "r": 8},
        "model": {"parameters": 1e8, "weights_mib": 400.0},
        "memory": {"default_allocator": {"ttt_8_growth_fraction_of_model": 0.08, "ttt_8_growth_over_plain_mib": 32.0,
                                         "ttt_8_private_growth_fraction_of_model": 0.07}},
        "targets": {"memory_growth_fraction_8": 0.05}, "meets_targets": {"memory_growth_8": False}})
    text = rt.render(rt.load_results(tmp_path))
    (row,) = _rows_of(text, "extra peak memory of TTT over plain answering, 8 concurrent questions")
    assert row[2].startswith("8.00% (+32 MiB peak RSS") and row[4] == "**not met**"
