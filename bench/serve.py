"""Serving throughput and latency through our OpenAI-compatible Ray Serve endpoint, on the tiny model.

    .venv/bin/python -m bench.serve [--engine vllm|hf] [--requests 64] [--concurrency 1,4,16] [--max-tokens 32]

Writes ``bench/results/serve_<engine>_<device>.json`` and ``.png``. Targets (issue "Ray Serve"): at concurrency 16
at least 4x the requests/s of concurrency 1, with 0 errors; TTT request latency reported against a plain request;
engine tokens/s through our endpoint against the engine alone (``--engine vllm``: vLLM's ``AsyncLLM`` driven
directly in this process with the same prompts, concurrency and sampling, after Serve is shut down).

Set-up: embedded S3, a local Ray cluster, the Serve app of ``finemed_ray.serving.app`` (one engine replica, no
autoscaling so the numbers are per replica), a retrieval index over the synthetic facts pool for the TTT requests.
Requests: chat completions on distinct questions, greedy, ``--max-tokens`` tokens (EOS disabled so every answer
has exactly that many tokens: the same work at every concurrency). Latency = client-side wall time per request.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures as cf
import json
import statistics
import time
from pathlib import Path
from typing import Any

from bench import _harness as H


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def load_run(url: str, questions: list[str], n: int, concurrency: int, max_tokens: int,
             extra: dict | None = None) -> dict[str, Any]:
    import httpx

    # One pooled client for all threads (keep-alive connections, as a real client library would hold).
    http = httpx.Client(timeout=300, limits=httpx.Limits(max_connections=concurrency,
                                                         max_keepalive_connections=concurrency))

    def one(i: int) -> tuple[float, int, int]:
        # ignore_eos: every answer exactly max_tokens long, the same work per request at every concurrency (the
        # endpoint honours it as vLLM does; the in-process baseline below sets it too).
        body = {"model": "finemed-tiny", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                "messages": [{"role": "user", "content": questions[i % len(questions)]}], **(extra or {})}
        t0 = time.perf_counter()
        r = http.post(url + "/v1/chat/completions", json=body)
        dt = time.perf_counter() - t0
        tokens = r.json().get("usage", {}).get("completion_tokens", 0) if r.status_code == 200 else 0
        return dt, r.status_code, tokens

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(n)))
    wall = time.perf_counter() - t0
    http.close()
    lat = [r[0] for r in results]
    errors = sum(r[1] != 200 for r in results)
    tokens = sum(r[2] for r in results)
    return {"concurrency": concurrency, "requests": n, "wall_s": round(wall, 3), "requests_per_s": round(n / wall, 3),
            "tokens_per_s": round(tokens / wall, 1), "p50_ms": round(1000 * percentile(lat, 0.5), 1),
            "p99_ms": round(1000 * percentile(lat, 0.99), 1), "errors": errors,
            "status_codes": sorted({r[1] for r in results})}


async def vllm_alone(model_dir: str, prompts: list[list[int]], n: int, concurrency: int, max_tokens: int) -> dict:
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.inputs import TokensPrompt
    from vllm.v1.engine.async_llm import AsyncLLM

    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=model_dir, dtype="float32", max_model_len=512,
                                                       enforce_eager=True, disable_log_stats=True))
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    sem = asyncio.Semaphore(concurrency)
    tokens = 0

    async def one(i: int) -> None:
        nonlocal tokens
        async with sem:
            async for out in engine.generate(TokensPrompt(prompt_token_ids=prompts[i % len(prompts)]), params,
                                             f"alone-{concurrency}-{i}"):
                if out.finished:
                    tokens += len(out.outputs[0].token_ids)

    try:
        await one(-1)  # warm-up
        tokens = 0
        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        wall = time.perf_counter() - t0
    finally:
        engine.shutdown()
    return {"concurrency": concurrency, "requests": n, "wall_s": round(wall, 3), "tokens_per_s": round(tokens / wall, 1),
            "requests_per_s": round(n / wall, 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", choices=("vllm", "hf"), default="vllm")
    ap.add_argument("--requests", type=int, default=192, help="requests per concurrency level")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--ttt-requests", type=int, default=4)
    ap.add_argument("--num-cpus", type=int, default=6)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    H.setup_env()
    import ray
    from ray import serve

    from finemed_ray.config import load_config
    from finemed_ray.toy.sample import sample_mcq_items, sample_sft_rows, write_jsonl
    from finemed_ray.toy.tiny_model import save_tiny_model
    from finemed_ray.serving.app import build_app
    from finemed_ray.serving.config import ServeConfig
    from finemed_ray.toy.s3_server import EmbeddedS3
    from finemed_ray.ttt.embed import EncoderSpec
    from finemed_ray.ttt.index import build_index

    levels = [int(c) for c in args.concurrency.split(",")]
    questions = [it["question"] for it in sample_mcq_items(paraphrases="heldout")]
    model_dir = H.scratch_dir("bench-serve-")
    save_tiny_model(model_dir)
    results: dict[str, Any] = {"benchmark": "serve", "engine": args.engine, "host": H.host_info(),
                               "max_tokens": args.max_tokens, "requests_per_level": args.requests,
                               "targets": {"rps_16_over_1": 4.0, "errors": 0}}
    with EmbeddedS3() as s3:
        s3.create_bucket("bench")
        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
        port = 18000 + (hash(model_dir) % 1000)
        try:
            pool = write_jsonl(sample_sft_rows(paraphrases="train", system_prompt=None), "s3://bench/serve/pool.jsonl")
            build_index(pool, "s3://bench/serve/index", EncoderSpec(), pool_kind="sft")
            cfg = load_config(ServeConfig, H.ROOT / "configs/serve_tiny.yaml", [
                f"model.path={model_dir}", f"model.engine={args.engine}", "model.device=cpu", "model.max_model_len=512",
                "ttt.enabled=true", "ttt.index=s3://bench/serve/index", "ttt.adapt.steps=1", "ttt.cache_size=0",
                "autoscaling.min_replicas=1", "autoscaling.max_replicas=1", "security.api_key_env=null",
                "batching.max_batch_size=16", f"limits.max_tokens={args.max_tokens}"])
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            serve.run(build_app(cfg), name="bench", route_prefix="/")
            url = f"http://127.0.0.1:{port}"
            load_run(url, questions, 8, 4, args.max_tokens)  # warm-up
            mon = H.Monitor(interval=2.0).start()
            levels_out = [load_run(url, questions, args.requests, c, args.max_tokens) for c in levels]
            plain = load_run(url, questions, args.ttt_requests, 1, args.max_tokens)
            ttt = load_run(url, questions, args.ttt_requests, 1, args.max_tokens, {"ttt": {"k": 3, "steps": 1}})
            results["load"] = mon.stop()
            results["levels"] = levels_out
            results["ttt"] = {"plain_p50_ms": plain["p50_ms"], "ttt_p50_ms": ttt["p50_ms"],
                              "ratio": round(ttt["p50_ms"] / plain["p50_ms"], 3), "errors": ttt["errors"],
                              "steps": 1, "k": 3, "cache": "off (every TTT request trains)"}
        finally:
            serve.shutdown()
            ray.shutdown()
    by_c = {lv["concurrency"]: lv for lv in results["levels"]}
    if 1 in by_c and 16 in by_c:
        results["rps_16_over_1"] = round(by_c[16]["requests_per_s"] / by_c[1]["requests_per_s"], 3)
    results["errors_total"] = sum(lv["errors"] for lv in results["levels"])
    if args.engine == "vllm":
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        prompts = [tok(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                               tokenize=False), add_special_tokens=False)["input_ids"] for q in questions]
        import os

        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        alone = [asyncio.run(vllm_alone(model_dir, prompts, args.requests, c, args.max_tokens)) for c in levels]
        results["vllm_alone"] = alone
        results["endpoint_vs_alone_tokens_per_s"] = {
            lv["concurrency"]: round(lv["tokens_per_s"] / a["tokens_per_s"], 3)
            for lv, a in zip(results["levels"], alone)}
    results["meets_targets"] = {"rps_16_over_1": results.get("rps_16_over_1", 0) >= 4.0,
                                "zero_errors": results["errors_total"] == 0}
    out = Path(args.out or H.RESULTS / f"serve_{args.engine}_{H.device_name()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out.with_suffix(".png"))
    print(json.dumps({k: results.get(k) for k in ("levels", "ttt", "rps_16_over_1", "endpoint_vs_alone_tokens_per_s",
                                                   "meets_targets")}, indent=1))
    print(f"wrote {out}")
    return 0


def plot(results: dict[str, Any], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    ax = fig.subplots(1, 2)
    c = [lv["concurrency"] for lv in results["levels"]]
    ax[0].plot(c, [lv["requests_per_s"] for lv in results["levels"]], "o-", label="our endpoint")
    if "vllm_alone" in results:
        ax[0].plot(c, [a["requests_per_s"] for a in results["vllm_alone"]], "s--", label="vLLM alone (AsyncLLM)")
    ax[0].plot(c, [results["levels"][0]["requests_per_s"] * x for x in c], ":", color="grey", label="linear")
    ax[0].set(xscale="log", yscale="log", xlabel="concurrency", ylabel="requests / s", title="throughput")
    ax[0].set_xticks(c, [str(x) for x in c])
    ax[0].legend(fontsize=7)
    ax[1].plot(c, [lv["p50_ms"] for lv in results["levels"]], "o-", label="p50")
    ax[1].plot(c, [lv["p99_ms"] for lv in results["levels"]], "s-", label="p99")
    ax[1].set(xscale="log", xlabel="concurrency", ylabel="latency (ms)", title="latency")
    ax[1].set_xticks(c, [str(x) for x in c])
    ax[1].legend(fontsize=7)
    fig.suptitle(f"serve ({results['engine']} engine, tiny model, {results['max_tokens']} tokens/answer, "
                 f"{results['host']['cpus']} CPUs)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
