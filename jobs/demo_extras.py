"""Steps 6-8 of the demo (``jobs/demo.py``): TTT index, evaluation with and without TTT, serving."""

from __future__ import annotations

import json
import socket
from typing import Any

def index_pool(pool_uri: str, out_uri: str) -> str:
    from finemed_ray.ttt.embed import EncoderSpec
    from finemed_ray.ttt.index import build_index

    summary = build_index(pool_uri, out_uri, EncoderSpec(), pool_kind="dpo")
    print(f"[6/8] TTT index over the DPO pool: {summary.rows_indexed} rows indexed, {summary.rows_quarantined} "
          f"quarantined ({summary.quarantine_reasons}) -> {out_uri}", flush=True)
    return out_uri


def evaluate_with_ttt(model_uri: str, index_uri: str, out_uri: str) -> dict[str, Any]:
    from pathlib import Path

    from finemed_ray import storage
    from finemed_ray.config import load_config
    from finemed_ray.data.sample import sample_mcq_items
    from finemed_ray.eval.config import EvalJobConfig
    from finemed_ray.eval.runner import Evaluation

    items_uri = f"{out_uri}/heldout_facts.jsonl"
    storage.write_text(items_uri, "\n".join(json.dumps(i) for i in sample_mcq_items(paraphrases="heldout")) + "\n")
    bench = [{"name": "facts-heldout", "path": items_uri, "kind": "mcq"}]
    cfg = load_config(EvalJobConfig, Path(__file__).resolve().parents[1] / "configs/eval_tiny.yaml", [
        f"engine.model={model_uri}", f"output.path={out_uri}/report", f"benchmarks={json.dumps(bench)}",
        "engine.extra={num_cpus: 1}", "prompt.mode=question", "scoring.method=loglik", "scoring.continuation=text",
        "ttt.enabled=true", f"ttt.index={index_uri}", "ttt.adapt.steps=4", "ttt.adapt.lr=1.0e-3"])
    report = Evaluation(cfg).run()
    s = report["scores"]["facts-heldout"]
    print(f"[7/8] evaluation on {s['no_ttt']['n']} held-out questions (log-likelihood): without TTT "
          f"{s['no_ttt']['accuracy']:.3f}, with TTT {s['ttt']['accuracy']:.3f} -> {out_uri}/report/report.md\n"
          f"  (an illustration on a tiny model whose facts are already trained; the controlled proof that TTT adds "
          f"knowledge is tests/test_evaluate_ttt.py)", flush=True)
    return {"no_ttt": s["no_ttt"]["accuracy"], "ttt": s["ttt"]["accuracy"], "report": f"{out_uri}/report"}


def serve_and_ask(model_dir: str, index_uri: str, question: str) -> dict[str, Any]:
    from pathlib import Path

    from openai import OpenAI
    from ray import serve

    from finemed_ray.config import load_config
    from finemed_ray.serving.app import build_app
    from finemed_ray.serving.config import ServeConfig

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cfg = load_config(ServeConfig, Path(__file__).resolve().parents[1] / "configs/serve_tiny.yaml", [
        f"model.path={model_dir}", "model.device=cpu", "model.max_model_len=512", "ttt.enabled=true",
        f"ttt.index={index_uri}", "ttt.num_cpus=0.5", "security.api_key_env=null", f"http.port={port}",
        "autoscaling.max_replicas=1", "resources.ingress_num_cpus=0.1"])
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(cfg), name="demo", route_prefix="/")
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=300)
        messages = [{"role": "system", "content": "You are a helpful professional doctor."},  # as in training
                    {"role": "user", "content": question}]
        plain = client.chat.completions.create(model=cfg.model.id, messages=messages, max_tokens=40, temperature=0)
        ttt = client.chat.completions.create(model=cfg.model.id, messages=messages, max_tokens=40, temperature=0,
                                             extra_body={"ttt": {"k": 3, "steps": 2}})
        info = ttt.model_extra["ttt"]
        print(f"[8/8] served at http://127.0.0.1:{port}/v1 (vLLM engine on CPU)\n  Q: {question}\n"
              f"  plain: {plain.choices[0].message.content}\n  TTT:   {ttt.choices[0].message.content}\n"
              f"  TTT neighbours: {[n['id'] for n in info['neighbours']]}, trained in {info['train_seconds']:.2f} s",
              flush=True)
        return {"plain": plain.choices[0].message.content, "ttt": ttt.choices[0].message.content, "ttt_info": info,
                "usage": plain.usage.model_dump()}
    finally:
        serve.shutdown()
