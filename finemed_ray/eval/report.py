"""Scores, confidence intervals and the evaluation report (JSON, Markdown, a bar chart, per-item predictions).

A prediction is one dict per (benchmark, item, TTT setting):
``{"benchmark", "id", "gold", "pred" (letter or None), "raw" (model output), "method" (extraction rule), "ttt"}``.
Accuracy counts every item, so an unextractable reply (``pred`` None) is wrong, and the count of those is
reported beside it: a format problem must not pass for a knowledge problem.

Intervals are Wilson score intervals (95 %): unlike the normal approximation they stay inside [0, 1] and are
honest for small n and accuracies near 0 or 1, which per-benchmark smoke runs produce.

:func:`write_report` writes ``report.json``, ``report.md``, ``accuracy.png`` and ``predictions.jsonl`` under a
local directory or an ``s3://`` prefix (through :mod:`finemed_ray.storage`).
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

from finemed_ray import storage
from finemed_ray.errors import DataError

__all__ = ["SETTINGS", "load_report", "score", "wilson_interval", "write_report"]

SETTINGS = ("no_ttt", "ttt")  # report keys of the two test-time-training settings
_LABELS = {"no_ttt": "without TTT", "ttt": "with TTT"}
_REQUIRED = ("benchmark", "id", "gold", "pred", "ttt")
REPORT_FILES = ("report.json", "report.md", "accuracy.png", "predictions.jsonl")


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
    "unextractable", "no_answer_rate", "chance"}``; with both settings also ``"delta"`` (TTT minus no-TTT
    accuracy) and ``"paired"`` (McNemar's exact test on the same items); with categories on the items,
    ``"categories"``: category -> setting -> the same tally.
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
    """n, correct, accuracy with its Wilson 95% CI, unextractable count and rate, and the chance level (mean of
    1/options over the items; None when the predictions do not say how many options an item had)."""
    n, k = len(preds), sum(_is_correct(p) for p in preds)
    none = sum(p["pred"] is None for p in preds)
    low, high = wilson_interval(k, n)
    opts = [p.get("n_options") for p in preds]
    chance = sum(1 / o for o in opts) / n if all(isinstance(o, int) and o > 0 for o in opts) else None
    return {"n": n, "correct": k, "accuracy": k / n, "ci95": {"low": low, "high": high}, "unextractable": none,
            "no_answer_rate": none / n, "chance": chance}


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

    for bench, entry in scores.items():
        present = [s for s in SETTINGS if s in entry]
        head = ["metric"] + [_LABELS[s] for s in present]
        if "delta" in entry:
            head.append("Δ (TTT − no TTT)")
        rows = [
            ["accuracy"] + [_acc_cell(entry[s]) for s in present],
            ["correct / n"] + [f"{entry[s]['correct']} / {entry[s]['n']}" for s in present],
            ["unextractable"] + [str(entry[s]["unextractable"]) for s in present],
            ["chance"] + [_pct(entry[s]["chance"]) if entry[s].get("chance") is not None else "–" for s in present],
        ]
        if "delta" in entry:
            unx = entry["ttt"]["unextractable"] - entry["no_ttt"]["unextractable"]
            paired = entry.get("paired")
            rows[0].append(_pp(entry["delta"]) + (f" (McNemar exact p={paired['p_value']:.3g}, gained "
                                                  f"{paired['gained']}, lost {paired['lost']})" if paired else ""))
            rows[1].append("")
            rows[2].append(f"{unx:+d}")
            rows[3].append("")
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
            lo.append(s["accuracy"] - s["ci95"]["low"] if s else 0.0)
            hi.append(s["ci95"]["high"] - s["accuracy"] if s else 0.0)
        series.append(("baseline", acc, lo, hi))
    for setting in SETTINGS:
        if not any(setting in scores[b] for b in benches):
            continue
        acc, lo, hi = [], [], []
        for b in benches:
            s = scores[b].get(setting)
            acc.append(s["accuracy"] if s else math.nan)
            lo.append(s["accuracy"] - s["ci95"]["low"] if s else 0.0)
            hi.append(s["ci95"]["high"] - s["accuracy"] if s else 0.0)
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
) -> dict[str, Any]:
    """Score ``predictions`` and write the report files under ``out_uri`` (local dir or s3:// prefix).

    ``baseline``: a report dict (as :func:`load_report` returns) or the URI of one; adds "Δ vs baseline" rows.
    Returns the ``report.json`` content."""
    rows = _check(predictions)
    scores = score(rows)
    report: dict[str, Any] = {"meta": dict(meta or {}), "scores": scores, "baseline": None,
                              "files": list(REPORT_FILES)}
    if baseline is not None:
        source = baseline if isinstance(baseline, str) else None
        base = load_report(baseline) if isinstance(baseline, str) else dict(baseline)
        if not isinstance(base.get("scores"), Mapping):
            raise DataError("baseline: not an evaluation report (no 'scores' mapping)")
        report["baseline"] = {"source": source, "scores": base["scores"], "deltas": _baseline_deltas(scores, base)}
    storage.write_text(storage.join(out_uri, "predictions.jsonl"), _prediction_lines(rows))
    storage.write_bytes(storage.join(out_uri, "accuracy.png"), render_chart(report))
    storage.write_text(storage.join(out_uri, "report.md"), render_markdown(report))
    storage.write_json(storage.join(out_uri, "report.json"), report)  # last: its presence means the rest is there
    return report
