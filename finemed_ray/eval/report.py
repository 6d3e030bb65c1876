"""Scores, confidence intervals and the evaluation report (JSON, Markdown, a bar chart, per-item predictions).

A prediction is one dict per (benchmark, item, TTT setting):
``{"benchmark", "id", "gold", "pred" (letter or None), "raw" (model output), "method" (extraction rule), "ttt"}``.
Accuracy counts every item, so an unextractable reply (``pred`` None) is wrong, and the count of those is
reported beside it: a format problem must not pass for a knowledge problem.

Intervals are Wilson score intervals (95 %): unlike the normal approximation they stay inside [0, 1] and are
honest for small n and accuracies near 0 or 1, which per-benchmark smoke runs produce.

Generative predictions also carry ``cut_off`` (the token budget ended the reply): its count and rate are reported
beside the no-answer count, so a budget too small for the model's reasoning is not read as ignorance.

Published figures (:func:`load_baselines`, a YAML file such as ``configs/baselines/medical_8b.yaml``) are shown in
their own table, labelled quoted, not measured, each with its source: they come with their own prompts and
scoring and are context, not a like-for-like comparison.

:func:`write_report` writes ``report.json``, ``report.md``, ``accuracy.png``, ``predictions.jsonl`` and
``results_lm_eval.json`` (the layout of lm-evaluation-harness results files, :func:`lm_eval_results`) under a local
directory or an ``s3://`` prefix (through :mod:`finemed_ray.storage`).
"""

from __future__ import annotations

import io
import json
import math
import re
import time
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import Field, field_validator, model_validator

from finemed_ray import storage
from finemed_ray.config import StrictModel
from finemed_ray.errors import ConfigError, DataError

__all__ = ["SETTINGS", "lm_eval_results", "load_baselines", "load_report", "score", "wilson_interval",
           "write_report"]

SETTINGS = ("no_ttt", "ttt")  # report keys of the two test-time-training settings
_LABELS = {"no_ttt": "without TTT", "ttt": "with TTT"}
_REQUIRED = ("benchmark", "id", "gold", "pred", "ttt")
LM_EVAL_FILE = "results_lm_eval.json"
REPORT_FILES = ("report.json", "report.md", "accuracy.png", "predictions.jsonl", LM_EVAL_FILE)


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for ``k`` successes in ``n`` trials; ``(0.0, 1.0)`` when ``n == 0`` (no information)."""
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"wilson_interval: need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    z2 = z * z
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _setting(ttt: Any) -> str:
    return "ttt" if bool(ttt) else "no_ttt"


def _check(predictions: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    rows = list(predictions)
    if not rows:
        raise DataError("no predictions to score")
    seen: dict[tuple[str, str, str], int] = {}
    for i, p in enumerate(rows):
        if not isinstance(p, Mapping):
            raise DataError(f"prediction {i}: expected a dict, got {type(p).__name__}")
        missing = [k for k in _REQUIRED if k not in p]
        if missing:
            raise DataError(f"prediction {i}: missing {', '.join(missing)}")
        if not isinstance(p["gold"], str) or not p["gold"]:
            raise DataError(f"prediction {i} ({p['benchmark']}/{p['id']}): gold {p['gold']!r} is not a letter")
        key = (str(p["benchmark"]), str(p["id"]), _setting(p["ttt"]))
        if key in seen:
            raise DataError(
                f"prediction {i}: duplicate {key[0]}/{key[1]} ({_LABELS[key[2]]}); first at prediction {seen[key]}"
            )
        seen[key] = i
    return rows


def _is_correct(p: Mapping[str, Any]) -> bool:
    return p["pred"] is not None and str(p["pred"]).upper() == str(p["gold"]).upper()


def score(predictions: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per benchmark (sorted) and TTT setting: ``{"n", "correct", "accuracy", "ci95": {"low", "high"},
    "unextractable", "no_answer_rate", "chance"}`` (generated replies also ``"cut_off", "cut_off_rate"``); with
    both settings also ``"delta"`` (TTT minus no-TTT accuracy) and ``"paired"`` (McNemar's exact test on the
    same items); with categories on the items, ``"categories"``: category -> setting -> the same tally.
    DataError for an empty list, a malformed prediction or a duplicate (benchmark, id, ttt)."""
    rows = _check(predictions)
    groups: dict[str, dict[str, list[Mapping[str, Any]]]] = {}
    for p in rows:
        groups.setdefault(str(p["benchmark"]), {}).setdefault(_setting(p["ttt"]), []).append(p)
    out: dict[str, dict[str, Any]] = {}
    for bench in sorted(groups):
        entry: dict[str, Any] = {}
        for setting in SETTINGS:
            if setting in groups[bench]:
                entry[setting] = _tally(groups[bench][setting])
        if all(s in entry for s in SETTINGS):
            entry["delta"] = entry["ttt"]["accuracy"] - entry["no_ttt"]["accuracy"]
            paired = _paired(groups[bench]["no_ttt"], groups[bench]["ttt"])
            if paired is not None:
                entry["paired"] = paired
        categories = sorted({str(p["category"]) for p in rows if p["benchmark"] == bench and p.get("category")})
        if categories:
            entry["categories"] = {
                c: {s: _tally([p for p in groups[bench][s] if p.get("category") == c])
                    for s in SETTINGS if any(p.get("category") == c for p in groups[bench].get(s, []))}
                for c in categories}
        out[bench] = entry
    return out


def _tally(preds: list[Mapping[str, Any]]) -> dict[str, Any]:
    """n, correct, accuracy with its Wilson 95% CI, unextractable count and rate, the chance level (mean of
    1/options over the items; None when the predictions do not say how many options an item had), and for
    generated replies ``cut_off`` / ``cut_off_rate`` (replies the token budget ended)."""
    n, k = len(preds), sum(_is_correct(p) for p in preds)
    none = sum(p["pred"] is None for p in preds)
    low, high = wilson_interval(k, n)
    opts = [p.get("n_options") for p in preds]
    chance = sum(1 / o for o in opts) / n if all(isinstance(o, int) and o > 0 for o in opts) else None
    out = {"n": n, "correct": k, "accuracy": k / n, "ci95": {"low": low, "high": high}, "unextractable": none,
           "no_answer_rate": none / n, "chance": chance}
    # Only generated replies can be cut off; log-likelihood predictions carry no flag and get no count.
    flags = [p.get("cut_off") for p in preds]
    if any(f is not None for f in flags):
        out["cut_off"] = sum(bool(f) for f in flags)
        out["cut_off_rate"] = out["cut_off"] / n
    return out


def _paired(no_ttt: list[Mapping[str, Any]], ttt: list[Mapping[str, Any]]) -> dict[str, Any] | None:
    """With vs without TTT on the same items: McNemar's exact test (None when the item sets differ)."""
    from finemed_ray.eval.stats import paired_comparison

    try:
        return paired_comparison([{"id": p["id"], "correct": _is_correct(p)} for p in no_ttt],
                                 [{"id": p["id"], "correct": _is_correct(p)} for p in ttt])
    except ValueError:
        return None


# ------------------------------------------------------------------------------------------------ baseline
def load_report(uri: str) -> dict[str, Any]:
    """A ``report.json`` written by :func:`write_report`: give the file or the directory / prefix holding it."""
    path = uri if uri.endswith(".json") else storage.join(uri, "report.json")
    data = storage.read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("scores"), dict):
        raise DataError(f"{path}: not an evaluation report (no 'scores' mapping)")
    return data


def _baseline_deltas(scores: Mapping[str, Any], baseline: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """benchmark -> setting -> {"delta", "baseline_accuracy", "baseline_setting"}: each setting is compared with
    the same setting of the baseline, or with the baseline's only/no-TTT result when it lacks that setting."""
    base_scores = baseline.get("scores", {})
    out: dict[str, dict[str, Any]] = {}
    for bench, entry in scores.items():
        base = base_scores.get(bench)
        if not isinstance(base, Mapping):
            continue
        for setting in SETTINGS:
            if setting not in entry:
                continue
            ref = setting if setting in base else ("no_ttt" if "no_ttt" in base else ("ttt" if "ttt" in base else None))
            if ref is None:
                continue
            acc = base[ref]["accuracy"]
            out.setdefault(bench, {})[setting] = {
                "delta": entry[setting]["accuracy"] - acc, "baseline_accuracy": acc, "baseline_setting": ref,
            }
    return out


# ------------------------------------------------------------------------------------------------ published figures
class PublishedFigure(StrictModel):
    """One accuracy a source published for one model on one benchmark (or one category of it)."""

    model: str = Field(min_length=1, description="The model the figure is for, as the source names it.")
    benchmark: str = Field(
        min_length=1, description="Benchmark name as in our report (medqa, medmcqa, pubmedqa, mmlu_medical, ...)."
    )
    category: str | None = Field(None, description="A category of the benchmark (e.g. an MMLU subject); null = all.")
    accuracy: float = Field(ge=0, le=100, description="Accuracy in percent, as the source prints it.")
    source: str = Field(min_length=1, description="Where the figure is printed: paper + arXiv id + table, or card.")
    url: str = Field(min_length=1, description="Link to the source (paper, model card or results file).")
    setting: str | None = Field(None, description="The source's own evaluation setting, when it states one.")

    @field_validator("model", "benchmark", "source", "url")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value.strip()


class PublishedFigures(StrictModel):
    """A file of published figures (``configs/baselines/*.yaml``)."""

    figures: list[PublishedFigure] = Field(min_length=1, description="The quoted figures, each with its source.")

    @model_validator(mode="after")
    def _unique(self) -> PublishedFigures:
        seen: dict[tuple[str, str, str | None], int] = {}
        for i, f in enumerate(self.figures):
            key = (f.model, f.benchmark, f.category)
            if key in seen:
                raise ValueError(f"figures.{i}: {f.model} on {f.benchmark}"
                                 f"{'/' + f.category if f.category else ''} is already figures.{seen[key]}")
            seen[key] = i
        return self


def load_baselines(uri: str) -> dict[str, Any]:
    """``{"source": uri, "figures": [...]}`` from a YAML file of published figures (local or s3://).
    ConfigError naming the file and the bad key when the file does not validate."""
    import yaml

    from finemed_ray.config import validate

    try:
        data = yaml.safe_load(storage.read_text(uri))
    except yaml.YAMLError as exc:
        raise ConfigError(f"baselines file {uri}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"baselines file {uri}: expected a mapping with a 'figures' list, got "
                          f"{type(data).__name__}")
    parsed = validate(PublishedFigures, data, source=f"baselines file {uri}")
    return {"source": uri, "figures": [f.model_dump() for f in parsed.figures]}


def _measured(scores: Mapping[str, Any], figure: Mapping[str, Any], setting: str) -> Mapping[str, Any] | None:
    """Our tally beside a quoted figure: the same benchmark (and category, when the figure has one)."""
    entry = scores.get(figure["benchmark"]) or {}
    if figure.get("category"):
        entry = (entry.get("categories") or {}).get(figure["category"]) or {}
    return entry.get(setting)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_published(report: Mapping[str, Any]) -> list[str]:
    """Markdown lines of the quoted-figures table: our measured accuracy beside each figure a source published
    for the same benchmark, in columns labelled apart, with the source of every figure."""
    published = report.get("published") or {}
    figures = published.get("figures") or []
    if not figures:
        return []
    scores = report["scores"]
    settings = [s for s in SETTINGS if any(s in e for e in scores.values())]
    order = {b: i for i, b in enumerate(scores)}  # grouped by benchmark, in the report's order; stable within
    shown = sorted((f for f in figures if f["benchmark"] in scores),
                   key=lambda f: (order[f["benchmark"]], f.get("category") or ""))
    lines = ["## Published figures (quoted, not measured)", "",
             f"Quoted from the sources named ({published.get('source') or 'given as a dict'}), each under its own "
             "prompt, shot count and scoring: not measured here, and not comparable like-for-like with the "
             "measured figures.", ""]
    head = ["benchmark"] + [f"measured here, {_LABELS[s]}" for s in settings] + [
        "model (published)", "accuracy (quoted, not measured)", "source"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for f in shown:
        name = f["benchmark"] + (f" / {f['category']}" if f.get("category") else "")
        ours = [_acc_cell(m) if (m := _measured(scores, f, s)) else "–" for s in settings]
        setting = f" ({_cell(f['setting'])})" if f.get("setting") else ""
        lines.append("| " + " | ".join([_cell(name), *ours, _cell(f["model"]), f"{f['accuracy']:g}%{setting}",
                                        f"[{_cell(f['source'])}]({f['url']})"]) + " |")
    missing = sorted({f["benchmark"] for f in figures} - set(scores))
    if missing:
        lines += ["", f"{len(figures) - len(shown)} quoted figures are for benchmarks not in this run: "
                  f"{', '.join(missing)}."]
    return lines + [""]


# ------------------------------------------------------------------------------------------------ lm-eval layout
LM_EVAL_TASK_VERSION = 1.0  # our prompt + scoring protocol of a task; bump when either changes


def _lm_eval_task(bench: str, setting: str) -> tuple[str, str]:
    """(task name, alias): the plain run keeps the benchmark's name, the TTT run is its own task."""
    return (bench, bench) if setting == "no_ttt" else (f"{bench}_ttt", f"{bench} (with TTT)")


def _acc_stderr(correct: int, n: int) -> float | str:
    """lm-eval's ``mean_stderr`` of 0/1 scores: sample standard deviation (n - 1) over sqrt(n); "N/A" below 2."""
    if n < 2:
        return "N/A"
    p = correct / n
    return math.sqrt(p * (1 - p) / (n - 1))


def _lm_eval_model(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The results file's ``config``: which model ran, on which engine, with which generation settings."""
    engine = meta.get("engine") or {}
    backend, model = engine.get("backend"), engine.get("model")
    args = f"model={model},base_url={engine.get('base_url')}" if backend == "http" else f"pretrained={model}"
    generate = (meta.get("scoring") or {}).get("method", "generate") == "generate"
    seeds = {(f or {}).get("seed") for f in (meta.get("few_shot") or {}).values()}
    return {"model": backend, "model_args": args if model else None, "batch_size": engine.get("batch_size"),
            "batch_sizes": [], "device": None, "use_cache": None,
            "gen_kwargs": {"max_gen_toks": engine.get("max_tokens"), "temperature": engine.get("temperature"),
                           "do_sample": bool(engine.get("temperature"))} if generate and engine else None,
            "fewshot_seed": seeds.pop() if len(seeds) == 1 else None}


def lm_eval_results(report: Mapping[str, Any]) -> dict[str, Any]:
    """The report in the layout of an lm-evaluation-harness results file (``results``, ``configs``,
    ``versions``, ``n-shot``, ``higher_is_better``, ``n-samples``, ``config``, ``git_hash``, ``date``), so tools
    that read those files read ours. Each benchmark is a task (``acc,none`` and ``acc_stderr,none``); with TTT,
    ``<benchmark>_ttt`` is a task of its own."""
    meta = report.get("meta") or {}
    generate = (meta.get("scoring") or {}).get("method", "generate") == "generate"
    out: dict[str, Any] = {key: {} for key in ("results", "group_subtasks", "configs", "versions", "n-shot",
                                              "higher_is_better", "n-samples")}
    for bench, entry in report["scores"].items():
        shots = (meta.get("few_shot") or {}).get(bench) or {}
        for setting in (s for s in SETTINGS if s in entry):
            task, alias = _lm_eval_task(bench, setting)
            tally = entry[setting]
            out["results"][task] = {"alias": alias, "acc,none": tally["accuracy"],
                                    "acc_stderr,none": _acc_stderr(tally["correct"], tally["n"])}
            out["group_subtasks"][task] = []
            out["configs"][task] = {
                "task": task, "dataset_path": (meta.get("paths") or {}).get(bench), "test_split": "test",
                "output_type": "generate_until" if generate else "multiple_choice",
                "num_fewshot": shots.get("k", 0), "fewshot_split": shots.get("split_path"),
                "fewshot_config": {"sampler": "random", "seed": shots.get("seed")} if shots.get("k") else None,
                "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
                "metadata": {"version": LM_EVAL_TASK_VERSION, "ttt": setting == "ttt"}}
            out["versions"][task] = LM_EVAL_TASK_VERSION
            out["n-shot"][task] = shots.get("k", 0)
            out["higher_is_better"][task] = {"acc": True}
            out["n-samples"][task] = {"original": (meta.get("rows") or {}).get(bench, tally["n"]),
                                      "effective": tally["n"]}
    model = (meta.get("engine") or {}).get("model")
    out.update({
        "config": _lm_eval_model(meta), "git_hash": meta.get("git_hash"), "date": meta.get("date", time.time()),
        "model_name": model, "model_name_sanitized": re.sub(r'["<>:/|\\?*\[\]]+', "__", model) if model else None,
        "total_evaluation_time_seconds": str(meta["total_seconds"]) if "total_seconds" in meta else None})
    return out


# ------------------------------------------------------------------------------------------------ rendering
def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _pp(x: float) -> str:
    return f"{100 * x:+.1f} pp"


def _acc_cell(s: Mapping[str, Any]) -> str:
    return f"{_pct(s['accuracy'])} (95% CI {100 * s['ci95']['low']:.1f}–{100 * s['ci95']['high']:.1f})"


def render_markdown(report: Mapping[str, Any]) -> str:
    """The ``report.md`` text: a summary table, then one table per benchmark with the settings side by side."""
    scores = report["scores"]
    deltas = report.get("baseline", {}).get("deltas", {}) if report.get("baseline") else {}
    settings = [s for s in SETTINGS if any(s in e for e in scores.values())]
    lines = ["# Evaluation report", ""]
    meta = report.get("meta") or {}
    for key, value in meta.items():
        lines.append(f"- **{key}**: {value}")
    if report.get("baseline"):
        lines.append(f"- **baseline**: {report['baseline'].get('source') or '(given as a dict)'}")
    if meta or report.get("baseline"):
        lines.append("")

    head = ["benchmark"] + [_LABELS[s] for s in settings]
    both = len(settings) == 2
    if both:
        head.append("Δ TTT")
    lines += ["## Summary", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for bench, entry in scores.items():
        cells = [bench] + [_acc_cell(entry[s]) if s in entry else "–" for s in settings]
        if both:
            cells.append(_pp(entry["delta"]) if "delta" in entry else "–")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines += render_published(report)

    for bench, entry in scores.items():
        present = [s for s in SETTINGS if s in entry]
        head = ["metric"] + [_LABELS[s] for s in present]
        if "delta" in entry:
            head.append("Δ (TTT − no TTT)")
        rows = [
            ["accuracy"] + [_acc_cell(entry[s]) for s in present],
            ["correct / n"] + [f"{entry[s]['correct']} / {entry[s]['n']}" for s in present],
            ["unextractable"] + [f"{entry[s]['unextractable']} ({_pct(entry[s]['no_answer_rate'])})"
                                 for s in present],
            ["chance"] + [_pct(entry[s]["chance"]) if entry[s].get("chance") is not None else "–" for s in present],
        ]
        cut = any("cut_off" in entry[s] for s in present)
        if cut:  # generated replies: how many the token budget ended, beside the no-answer count
            rows.append(["cut off at max tokens"] + [
                f"{entry[s]['cut_off']} ({_pct(entry[s]['cut_off_rate'])})" if "cut_off" in entry[s] else "–"
                for s in present])
        if "delta" in entry:
            unx = entry["ttt"]["unextractable"] - entry["no_ttt"]["unextractable"]
            paired = entry.get("paired")
            rows[0].append(_pp(entry["delta"]) + (f" (McNemar exact p={paired['p_value']:.3g}, gained "
                                                  f"{paired['gained']}, lost {paired['lost']})" if paired else ""))
            rows[1].append("")
            rows[2].append(f"{unx:+d}")
            rows[3].append("")
            if cut:
                rows[4].append(f"{entry['ttt'].get('cut_off', 0) - entry['no_ttt'].get('cut_off', 0):+d}")
        if bench in deltas:
            row = ["Δ vs baseline"]
            for s in present:
                d = deltas[bench].get(s)
                row.append(f"{_pp(d['delta'])} (baseline {_pct(d['baseline_accuracy'])})" if d else "–")
            if "delta" in entry:
                row.append("")
            rows.append(row)
        lines += [f"## {bench}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        lines.append("")
        if entry.get("categories"):
            lines += [f"### {bench} by category", "", "| category | " + " | ".join(_LABELS[s] for s in present)
                      + " |", "|" + "---|" * (len(present) + 1)]
            for cat, per in entry["categories"].items():
                cells = [f"{_acc_cell(per[s])}, n={per[s]['n']}" if s in per else "–" for s in present]
                lines.append(f"| {cat} | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)


def _err(x: float) -> float:
    """An error-bar length: the Wilson bound at 0 % or 100 % can sit a rounding error past the accuracy, and
    matplotlib refuses negative lengths."""
    return max(0.0, x)


def render_chart(report: Mapping[str, Any]) -> bytes:
    """``accuracy.png``: grouped bars per benchmark (each setting, and the baseline when given) with 95% CI bars."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    scores = report["scores"]
    benches = list(scores)
    series: list[tuple[str, list[float], list[float], list[float]]] = []  # label, acc, err-low, err-high
    base = (report.get("baseline") or {}).get("scores") or {}
    if base:
        acc, lo, hi = [], [], []
        for b in benches:
            ref = base.get(b, {})
            s = ref.get("no_ttt") or ref.get("ttt")
            acc.append(s["accuracy"] if s else math.nan)
            lo.append(_err(s["accuracy"] - s["ci95"]["low"]) if s else 0.0)
            hi.append(_err(s["ci95"]["high"] - s["accuracy"]) if s else 0.0)
        series.append(("baseline", acc, lo, hi))
    for setting in SETTINGS:
        if not any(setting in scores[b] for b in benches):
            continue
        acc, lo, hi = [], [], []
        for b in benches:
            s = scores[b].get(setting)
            acc.append(s["accuracy"] if s else math.nan)
            lo.append(_err(s["accuracy"] - s["ci95"]["low"]) if s else 0.0)
            hi.append(_err(s["ci95"]["high"] - s["accuracy"]) if s else 0.0)
        series.append((_LABELS[setting], acc, lo, hi))

    fig = Figure(figsize=(max(4.0, 1.6 * len(benches) + 2), 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(series)
    for j, (label, acc, lo, hi) in enumerate(series):
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(benches))]
        ax.bar(xs, acc, width, yerr=[lo, hi], capsize=3, label=label)
    ax.set_xticks(range(len(benches)))
    ax.set_xticklabels(benches, rotation=20, ha="right")
    ax.set_ylim(0, 1.0)
    ax.set_ylabel("accuracy (95% Wilson CI)")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(series), fontsize="small", frameon=False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _prediction_lines(rows: Iterable[Mapping[str, Any]]) -> str:
    out = []
    for p in rows:
        line = {
            "benchmark": p["benchmark"], "id": str(p["id"]), "ttt": bool(p["ttt"]), "prediction": p["pred"],
            "gold": p["gold"], "correct": _is_correct(p), "method": p.get("method"), "raw": p.get("raw"),
        }
        # Anything else the runner recorded per item (TTT neighbours, distances, timings, token counts) is kept.
        line.update({k: v for k, v in p.items() if k not in line and k != "pred"})
        out.append(json.dumps(line, ensure_ascii=False, default=str))
    return "\n".join(out) + "\n"


def write_report(
    out_uri: str,
    predictions: Iterable[Mapping[str, Any]],
    *,
    baseline: Mapping[str, Any] | str | None = None,
    meta: Mapping[str, Any] | None = None,
    published: Mapping[str, Any] | str | None = None,
) -> dict[str, Any]:
    """Score ``predictions`` and write the report files under ``out_uri`` (local dir or s3:// prefix).

    ``baseline``: a report dict (as :func:`load_report` returns) or the URI of one; adds "Δ vs baseline" rows.
    ``published``: figures quoted from the literature (as :func:`load_baselines` returns, or the URI of such a
    YAML file); rendered in their own table, labelled quoted, not measured.
    Returns the ``report.json`` content."""
    rows = _check(predictions)
    scores = score(rows)
    if isinstance(published, str):
        published = load_baselines(published)
    report: dict[str, Any] = {"meta": dict(meta or {}), "scores": scores, "baseline": None,
                              "published": dict(published) if published else None, "files": list(REPORT_FILES)}
    if baseline is not None:
        source = baseline if isinstance(baseline, str) else None
        base = load_report(baseline) if isinstance(baseline, str) else dict(baseline)
        if not isinstance(base.get("scores"), Mapping):
            raise DataError("baseline: not an evaluation report (no 'scores' mapping)")
        report["baseline"] = {"source": source, "scores": base["scores"], "deltas": _baseline_deltas(scores, base)}
    storage.write_text(storage.join(out_uri, "predictions.jsonl"), _prediction_lines(rows))
    storage.write_bytes(storage.join(out_uri, "accuracy.png"), render_chart(report))
    storage.write_text(storage.join(out_uri, "report.md"), render_markdown(report))
    storage.write_json(storage.join(out_uri, LM_EVAL_FILE), lm_eval_results(report))
    storage.write_json(storage.join(out_uri, "report.json"), report)  # last: its presence means the rest is there
    return report
