"""The demo's steps and measurements (``jobs/demo.py`` tells the story; the work is here).

Every training stage is measured on the same held-out questions (:func:`heldout_items`: every fact asked in both
wordings that no training row uses, 128 four-option items, chance 0.25) in two ways:

* ``accuracy``: the model *generates* its reply (greedy, up to :data:`MAX_NEW_TOKENS`); a reasoning reply is read
  from its ``## Summarization``, and the answer is the one option its conclusion states
  (:mod:`finemed_ray.eval.generative`). This is the mode every stage trains: direct answers for the curriculum
  stages, reasoning then answer for reasoning SFT and DPO.
* ``direct_loglik``: which option's direct-answer sentence the model finds most likely right after the question
  (:func:`finemed_ray.eval.loglik.synthetic_option_fact_continuations`). Kept as a second, labelled column: it
  is the format reasoning SFT trains away from and DPO's rejected side pushes down, so it falls after those stages
  by design and says little about what the model answers.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

MAX_NEW_TOKENS = 384  # the longest training reasoning answer is ~230 tokens of the tiny tokenizer
SYSTEM_PROMPT = "You are a helpful professional doctor."


# ------------------------------------------------------------------------------------------------ data
def heldout_items() -> list[dict[str, Any]]:
    from finemed_ray.toy.sample import sample_mcq_items

    return sample_mcq_items(paraphrases="heldout", every_paraphrase=True)


def heldout_pairs() -> list[dict[str, Any]]:
    """Held-out preference pairs in the training pairs' format: the pipeline's DPO prompt (question + its
    step-by-step instruction, :func:`finemed_ray.synth.prompts.dpo_prompt`) after the system prompt training adds;
    chosen = the reasoning answer, rejected = a direct answer, wrong for half of the pairs."""
    from finemed_ray.toy.sample import sample_dpo_rows
    from finemed_ray.synth.prompts import dpo_prompt

    rows = []
    for r in sample_dpo_rows(paraphrases="heldout", system_prompt=SYSTEM_PROMPT):
        question = r["prompt"][-1]["content"]
        rows.append({**r, "prompt": [{"role": "system", "content": SYSTEM_PROMPT}, *dpo_prompt(question)]})
    return rows


def parameter_count(model_uri: str) -> str:
    from finemed_ray.models.loading import load_model, resolve_model_path

    n = sum(p.numel() for p in load_model(resolve_model_path(model_uri)).parameters())
    return f"{n / 1e6:.1f}M"


# ------------------------------------------------------------------------------------------------ synthesis
def synthesize(root: str, overrides: list[str]) -> dict[str, Any]:
    from finemed_ray.toy.synthesis import synthesize_demo_data

    t0 = time.time()
    m = synthesize_demo_data(f"{root}/synth", f"{root}/synth-inputs", overrides=overrides)
    out = {k: v["rows"] for k, v in m["outputs"].items()}
    decontam = next((s for s in m["steps"] if s["step"] == "decontaminate"), {"dropped": 0})
    dropped = sum(s["dropped"] for s in m["steps"])
    teacher = m["teacher"]
    who = ("OFFLINE teacher (rule-based, not an LLM)" if teacher["offline"] else f"teacher {teacher['model']}")
    counts = f"{m['docs']} docs -> {out.get('sft', 0)} / {out.get('reasoning', 0)} / {out.get('dpo', 0)}"
    line = (f"{m['docs']} seed docs, {who}, {teacher['requests_served']} teacher requests; kept "
            f"{m['kept_by_kind']}; {dropped} docs quarantined with a reason ({decontam['dropped']} removed by "
            f"decontamination against the held-out questions)\n"
            f"    -> {out.get('sft', 0)} SFT dialogues (partitioned by department), {out.get('reasoning', 0)} "
            f"reasoning dialogues, {out.get('dpo', 0)} DPO pairs, {out.get('quarantine', 0)} quarantine rows; "
            f"manifest {m['uris']['manifest']}")
    return {"line": line, "counts": counts, "seconds": round(time.time() - t0, 1), "uri": f"{root}/synth",
            "outputs": out, "teacher": teacher, "decontaminated": decontam["dropped"], **m["uris"]}


# ------------------------------------------------------------------------------------------------ training
def describe_stage(spec: Any, cfg: Any) -> str:
    what = {"stage1-all": "curriculum SFT 1: all medical dialogues",
            "reasoning": "reasoning SFT: long ## Thought / ## Summarization answers",
            "dpo": "DPO: chosen = reasoning answer, rejected = direct answer (half of them wrong), against a frozen "
                   "copy of the reasoning model"}.get(spec.name)
    if what is None:
        d = cfg.data
        what = f"curriculum SFT: only {d.subdepartment or d.department}" + (f" ({d.department})" if d.subdepartment
                                                                           else "")
    t = cfg.train
    return (f"{spec.name}: {what}; {t.epochs} epochs, lr {t.learning_rate:g}, Ray Train + DeepSpeed ZeRO-3 on "
            f"{cfg.scaling.num_workers} CPU workers")


def train_stage(recipe: Any, name: str) -> dict[str, Any]:
    from finemed_ray.train.recipe import run_recipe

    return run_recipe(recipe, only=[name])["stages"][0]


# ------------------------------------------------------------------------------------------------ measuring
def measure(model_uri: str, items: list[dict[str, Any]]) -> dict[str, Any]:
    """Generated-answer accuracy (the primary figure) and direct-answer log-likelihood accuracy of one export."""
    from finemed_ray.eval.generative import mcq_generation_accuracy
    from finemed_ray.eval.loglik import mcq_loglik_accuracy
    from finemed_ray.toy.fact_scoring import synthetic_option_fact_continuations
    from finemed_ray.models.loading import load_for_generation, resolve_model_path

    model, tokenizer = load_for_generation(resolve_model_path(model_uri))
    gen = mcq_generation_accuracy(model, tokenizer, items, system_prompt=SYSTEM_PROMPT,
                                  max_new_tokens=MAX_NEW_TOKENS, batch_size=64)
    direct = mcq_loglik_accuracy(model, tokenizer, items, synthetic_option_fact_continuations,
                                 system_prompt=SYSTEM_PROMPT)
    return {**gen, "direct_loglik": direct["accuracy"]}


def brief(m: dict[str, Any]) -> dict[str, Any]:
    keys = ("accuracy", "n", "correct", "chance", "no_answer_rate", "cut_off_rate", "reasoning_rate",
            "max_new_tokens", "direct_loglik")
    return {k: m[k] for k in keys} | {"example_reply": m["predictions"][0]["reply"][:400]}


def accuracy_text(m: dict[str, Any]) -> str:
    return (f"accuracy {m['accuracy']:.3f} (n={m['n']}, chance {m['chance']:.2f}; reasoning replies "
            f"{m['reasoning_rate']:.0%}, no answer {m['no_answer_rate']:.0%}, cut off {m['cut_off_rate']:.0%}); "
            f"direct-answer log-likelihood {m['direct_loglik']:.3f}")


def paired(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    from finemed_ray.eval.stats import paired_comparison

    return paired_comparison(before["predictions"], after["predictions"])


def stage_line(trained: dict[str, Any], before: dict[str, Any], after: dict[str, Any]) -> str:
    d = trained["data"]
    p = paired(before, after)
    kept = d.get("rows_train", d["rows_valid"]) + d.get("rows_eval", 0)
    fault = ""
    if trained.get("resumed_from_step") is not None:  # Ray Train restarted the workers after a fault
        fault = (f"\n    a worker failed; Ray Train restarted the run and it resumed exactly from its checkpoint at "
                 f"step {trained['resumed_from_step']} (details in the log)")
    return (f"{kept} of {d['rows_valid']} valid rows ({d.get('rows_filtered_out', 0)} outside the stage's department, "
            f"{d['rows_quarantined']} quarantined), {trained['global_step']} steps, loss "
            f"{trained['first_loss']:.2f} -> {trained['last_loss']:.2f}\n"
            f"    held-out accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f} (n={after['n']}, chance "
            f"{after['chance']:.2f}, McNemar p={p['p_value']:.2g}; reasoning replies {after['reasoning_rate']:.0%}, "
            f"no answer {after['no_answer_rate']:.0%}, cut off {after['cut_off_rate']:.0%})\n"
            f"    direct-answer log-likelihood {before['direct_loglik']:.3f} -> {after['direct_loglik']:.3f} "
            f"(second column: the format reasoning SFT and DPO train away from)" + fault)


def preference(cfg: Any, reference_uri: str) -> dict[str, Any]:
    """DPO's implicit reward on held-out pairs, the trained policy against its frozen reference (its parent)."""
    from finemed_ray.eval.preference import preference_metrics
    from finemed_ray.models.loading import load_model, load_tokenizer, resolve_model_path

    policy_dir = resolve_model_path(cfg.output.export_path)
    out = preference_metrics(load_model(policy_dir), load_model(resolve_model_path(reference_uri)),
                             load_tokenizer(policy_dir), heldout_pairs(), beta=cfg.dpo.beta)
    return out


def preference_text(p: dict[str, Any]) -> str:
    return (f"held-out pairs (n={p['n']}): preference accuracy 0 -> {p['preference_accuracy']:.3f}, reward margin "
            f"0 -> {p['reward_margin']:.2f} (the reference scores 0 and 0 by definition; chance accuracy 0.5)")


# ------------------------------------------------------------------------------------------------ claims
def claims(stages: list[dict[str, Any]], chain: dict[str, Any], ttt: dict[str, Any]) -> list[dict[str, Any]]:
    """What the method promises, each checked on this run's held-out figures (issue 15's criteria), with a
    plain met / NOT met. "Keeps" = not significantly lower (McNemar exact p >= 0.05, paired on the same questions);
    "not lower by more than 2 points" is a point estimate (one question is 0.8 points at n=128)."""
    by = {st["stage"]: st for st in stages}
    out = []
    r = by.get("reasoning")
    if r:
        p = r["paired_vs_previous"]
        met = p["after"] >= p["before"] or p["p_value"] >= 0.05
        out.append({"claim": "reasoning SFT keeps or raises answer accuracy (reason, then answer)", "met": met,
                    "detail": f"{p['before']:.3f} -> {p['after']:.3f}, McNemar p={p['p_value']:.2g}"
                              + ("" if met else "; significantly lower")})
    d = by.get("dpo")
    if d:
        p, pref = d["paired_vs_previous"], d["preference"]
        met = pref["preference_accuracy"] > 0.5 and pref["reward_margin"] > 0 and p["after"] >= p["before"] - 0.02
        out.append({"claim": "DPO raises held-out preference accuracy and margin, answers not lower by > 2 points",
                    "met": met, "detail": f"preference accuracy {pref['preference_accuracy']:.3f}, margin "
                                          f"{pref['reward_margin']:.2f}; answers {p['before']:.3f} -> {p['after']:.3f}"})
    if chain:
        met = chain["after"] >= chain["before"] - 0.02
        out.append({"claim": "the final model answers at least as well as the curriculum-SFT model (-2 points)",
                    "met": met, "detail": f"{chain['before']:.3f} -> {chain['after']:.3f}, McNemar p="
                                          f"{chain['p_value']:.2g}"})
    if ttt:
        out.append({"claim": "TTT gives a significant lift (McNemar p < 0.05)", "met": bool(ttt["significant"]),
                    "detail": f"{ttt['no_ttt']:.3f} -> {ttt['ttt']:.3f}, p={ttt['p_value']:.3g}"})
    return out


def claims_text(items: list[dict[str, Any]]) -> str:
    lines = ["Claims, checked on this run (why a claim can miss on this 0.9M-parameter model: README, 'What each "
             "stage teaches the tiny model'):"]
    lines += [f"  [{'met' if c['met'] else 'NOT met'}] {c['claim']}: {c['detail']}" for c in items]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ TTT
def evaluate_ttt(model_uri: str, pool_uri: str, root: str, items: list[dict[str, Any]]) -> dict[str, Any]:
    """Index the DPO pool, then ``jobs/evaluate.py``'s library path on the held-out questions, without and with TTT
    at the shipped adaptation defaults (``configs/eval_tiny.yaml``), answers generated; McNemar on the pairs."""
    from finemed_ray import storage
    from finemed_ray.config import load_config
    from finemed_ray.eval.config import EvalJobConfig
    from finemed_ray.eval.runner import Evaluation
    from finemed_ray.eval.stats import paired_comparison
    from finemed_ray.ttt.embed import EncoderSpec
    from finemed_ray.ttt.index import build_index

    t0 = time.time()
    index_uri = f"{root}/index"
    built = build_index(pool_uri, index_uri, EncoderSpec(), pool_kind="dpo")
    items_uri = f"{root}/eval/heldout_mcq.jsonl"
    storage.write_text(items_uri, "".join(json.dumps(i) + "\n" for i in items))
    bench = [{"name": "facts-heldout", "path": items_uri, "kind": "mcq"}]
    report_uri = f"{root}/eval/report"
    cfg = load_config(EvalJobConfig, Path(__file__).resolve().parents[1] / "configs/eval_tiny.yaml", [
        f"engine.model={model_uri}", f"engine.max_tokens={MAX_NEW_TOKENS}", "engine.extra={num_cpus: 1}",
        f"output.path={report_uri}", f"benchmarks={json.dumps(bench)}", "prompt.mode=question",
        "scoring.method=generate", "ttt.enabled=true", f"ttt.index={index_uri}"])
    report = Evaluation(cfg).run()
    preds = [json.loads(line) for line in storage.read_text(f"{report_uri}/predictions.jsonl").splitlines() if line]
    p = paired_comparison([x for x in preds if not x["ttt"]], [x for x in preds if x["ttt"]])
    s = report["scores"]["facts-heldout"]
    significant = p["p_value"] < 0.05 and p["delta"] > 0
    verdict = ("TTT's lift is significant (p < 0.05)" if significant else
               "TTT did NOT give a significant lift here (p >= 0.05)" if p["delta"] >= 0 else
               "TTT LOWERED accuracy here" + (" (significant, p < 0.05)" if p["p_value"] < 0.05 else " (not significant)"))
    a = cfg.ttt.adapt
    line = (f"index: {built.rows_indexed} DPO-pool rows ({built.rows_quarantined} quarantined) -> {index_uri}\n"
            f"    held-out accuracy without TTT {p['before']:.3f} -> with TTT {p['after']:.3f} (n={p['n']}, chance "
            f"0.25; gained {p['gained']}, lost {p['lost']}; McNemar exact p={p['p_value']:.3g}): {verdict}\n"
            f"    TTT per question: k={a.k} neighbours, {a.steps} LoRA steps at lr {a.lr:g}; report -> "
            f"{report_uri}/report.md")
    return {"line": line, "no_ttt": p["before"], "ttt": p["after"], "p_value": p["p_value"], "gained": p["gained"],
            "lost": p["lost"], "n": p["n"], "significant": significant, "verdict": verdict, "index": index_uri,
            "report": report_uri, "no_answer": {k: s[k]["unextractable"] / s[k]["n"] for k in ("no_ttt", "ttt")},
            "seconds": round(time.time() - t0, 1)}


# ------------------------------------------------------------------------------------------------ serving
def _reply_form(text: str) -> str:
    from finemed_ray.eval.generative import final_answer

    answer, form = final_answer(text, cut_off=False)
    return form if answer is not None or form != "direct" else "empty"


def _indent(text: str, pad: str = "      ") -> str:
    return "\n".join(pad + line for line in text.strip().splitlines())


def serve_and_ask(model_dir: str, index_uri: str, question: str) -> dict[str, Any]:
    from openai import OpenAI
    from ray import serve

    from finemed_ray.config import load_config
    from finemed_ray.models.loading import resolve_model_path
    from finemed_ray.serving.app import build_app
    from finemed_ray.serving.config import ServeConfig

    t0 = time.time()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cfg = load_config(ServeConfig, Path(__file__).resolve().parents[1] / "configs/serve_tiny.yaml", [
        f"model.path={resolve_model_path(model_dir)}", "model.device=cpu", "model.max_model_len=512",
        "ttt.enabled=true", f"ttt.index={index_uri}", "ttt.num_cpus=0.5", "security.api_key_env=null",
        f"http.port={port}", "autoscaling.max_replicas=1", "resources.ingress_num_cpus=0.1"])
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(cfg), name="demo", route_prefix="/")
        url = f"http://127.0.0.1:{port}/v1"
        client = OpenAI(base_url=url, api_key="none", max_retries=0, timeout=300)
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]
        plain = client.chat.completions.create(model=cfg.model.id, messages=messages, max_tokens=MAX_NEW_TOKENS,
                                               temperature=0)
        ttt = client.chat.completions.create(model=cfg.model.id, messages=messages, max_tokens=MAX_NEW_TOKENS,
                                             temperature=0, extra_body={"ttt": {"k": 3, "steps": 2}})
        info = ttt.model_extra["ttt"]
        p_text, t_text = plain.choices[0].message.content, ttt.choices[0].message.content
        line = (f"{url} (model {cfg.model.id})\n    Q: {question}\n    plain reply:\n{_indent(p_text)}\n"
                f"    TTT reply ({len(info['neighbours'])} neighbours, trained in {info['train_seconds']:.2f} s):\n"
                f"{_indent(t_text)}")
        return {"line": line, "url": url, "question": question, "plain": p_text, "ttt": t_text,
                "plain_form": _reply_form(p_text), "ttt_form": _reply_form(t_text), "ttt_info": info,
                "finish_reasons": [plain.choices[0].finish_reason, ttt.choices[0].finish_reason],
                "usage": plain.usage.model_dump(), "seconds": round(time.time() - t0, 1)}
    finally:
        serve.shutdown()


# ------------------------------------------------------------------------------------------------ outputs
def copy_outputs(root: str, final: str, synth: dict[str, Any], ttt: dict[str, Any], summary: dict[str, Any],
                 out_dir: Path) -> list[str]:
    """Copy from the (temporary) S3 server what a user opens afterwards; returns the local paths."""
    from finemed_ray import storage

    copied = []
    targets = {"model": final, "eval": ttt["report"], "synthesis": synth["uri"]}
    for name, uri in targets.items():
        local = out_dir / name
        storage.download_dir(uri, str(local))
        copied.append(str(local))
    for st in summary.get("stages", []):
        q = (st.get("train") or {}).get("data", {}).get("quarantine_uri")
        if q and storage.exists(q):
            local = out_dir / "quarantine" / st["stage"]
            storage.download_dir(q, str(local))
            copied.append(str(local))
    return copied


def next_steps(out_dir: Path, summary: dict[str, Any]) -> str:
    extra = ", quarantine/ (rows training refused)" if (out_dir / "quarantine").exists() else ""
    return (f"\nOutputs in {out_dir}: model/ (Hugging Face export: vLLM and transformers load it), eval/ (report.md, "
            f"accuracy.png, predictions.jsonl), synthesis/ (datasets, quarantine/, manifest.json){extra}, "
            f"summary.json, demo.log\n"
            f"Next steps:\n"
            f"  serve it:      python -m jobs.serve --config configs/serve_tiny.yaml model.path={out_dir}/model\n"
            f"  a real teacher: python -m jobs.demo synth.teachers.models.main.base_url=http://HOST:8000/v1 "
            f"synth.teachers.models.main.model=MODEL  (see configs/synth_demo.yaml)\n"
            f"  your cluster:  ray job submit --working-dir . -- python -m jobs.train_recipe --config "
            f"configs/recipe_finemed_8b.yaml  (README: 'Running on a Ray cluster')\n"
            f"  KubeRay:       deploy/kuberay/ (RayJob per stage, RayService for serving; deploy/README.md)")
