"""End-to-end demo on embedded defaults (``make demo``): no cloud account, no GPU, no model hub.

1. start an S3-compatible server on 127.0.0.1 (moto) and point the AWS variables at it;
2. build the tiny Llama-style model + locally trained tokenizer, save it to S3;
3. write a sample SFT dataset (synthetic medical facts, plus a few broken rows that get quarantined) to S3;
4. run SFT with Ray Train + DeepSpeed ZeRO-3 on a local Ray cluster, 2 CPU workers, data streamed by Ray Data;
5. reload the consolidated Hugging Face export from S3 and print a generated reply.

Extra ``key=value`` arguments override ``configs/sft_tiny.yaml``, e.g. ``python -m jobs.demo train.epochs=1``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "finemed-demo"


def run(argv: list[str] | None = None) -> dict:
    overrides = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local single-user cluster
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from finemed_ray import storage
    from finemed_ray.config import load_config
    from finemed_ray.data.sample import bad_sft_rows, sample_sft_rows, write_jsonl
    from finemed_ray.models.loading import generate_reply, load_model, load_tokenizer, resolve_model_path
    from finemed_ray.models.tiny import save_tiny_model
    from finemed_ray.train.configs import SFTJobConfig
    from finemed_ray.train.sft import SFTJob

    t0 = time.time()
    s3 = storage.EmbeddedS3(buckets=(BUCKET,))
    with s3:
        print(f"[1/5] S3 server at {s3.endpoint_url} (bucket {BUCKET})", flush=True)
        model_uri = f"s3://{BUCKET}/models/tiny"
        save_tiny_model(model_uri)
        print(f"[2/5] tiny model + tokenizer -> {model_uri}", flush=True)

        data_uri = f"s3://{BUCKET}/data/sft.jsonl"
        rows = sample_sft_rows(paraphrases="train", system_prompt=None)
        write_jsonl(rows + bad_sft_rows(), data_uri)
        print(f"[3/5] {len(rows)} conversations + {len(bad_sft_rows())} broken rows -> {data_uri}", flush=True)

        cfg = load_config(
            SFTJobConfig,
            ROOT / "configs/sft_tiny.yaml",
            [f"model.path={model_uri}", f"data.path={data_uri}", *overrides],
        )
        print(f"[4/5] SFT: {cfg.scaling.num_workers} Ray Train workers, DeepSpeed {cfg.deepspeed.config}", flush=True)
        job = SFTJob(cfg).setup()
        job.run()
        summary = job.save()

        export = cfg.output.export_path
        local = resolve_model_path(export)
        tokenizer, model = load_tokenizer(local), load_model(local)
        # One question worded as in training, one held-out paraphrase: the tiny model memorises the first; the
        # second shows how far 2 layers x 128 generalise (issue 3 measures this properly, as an MCQ accuracy).
        questions = {
            "trained wording": rows[0]["messages"][0]["content"],
            "held-out wording": sample_sft_rows(paraphrases="heldout", system_prompt=None)[0]["messages"][0]["content"],
        }
        print(f"[5/5] export {export} reloaded from S3; greedy replies:", flush=True)
        replies = {}
        for label, question in questions.items():
            messages = [{"role": "user", "content": question}]
            if cfg.data.system_prompt:
                messages.insert(0, {"role": "system", "content": cfg.data.system_prompt})
            replies[label] = {"question": question,
                              "reply": generate_reply(model, tokenizer, messages, max_new_tokens=40)}
            print(f"\n  ({label}) Q: {question}\n  A: {replies[label]['reply']}", flush=True)
        print(flush=True)
        summary.update({"demo_replies": replies, "demo_seconds": round(time.time() - t0, 1)})
        import ray

        ray.shutdown()
    return summary


def main() -> int:
    from jobs._cli import main as cli_main

    return cli_main(lambda _argv: run())


if __name__ == "__main__":
    raise SystemExit(main())
