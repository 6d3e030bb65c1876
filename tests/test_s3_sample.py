"""`serve-s3 --sample` (`make s3-sample`): a running S3 server holding the demo's inputs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=15)


@pytest.mark.slow  # includes the demo's synthesis run on a local Ray cluster (~1-2 min)
@pytest.mark.timeout(420)
def test_serve_s3_sample_uploads_the_demo_inputs(tmp_path: Path) -> None:
    import boto3

    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    err = open(tmp_path / "stderr.txt", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "finemed_ray.toy.s3_server", "serve-s3", "--port", "0", "--bucket", "finemed-demo",
         "--sample"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True)
    lines: list[str] = []
    ready = threading.Event()

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith("# ready: "):
                ready.set()

    threading.Thread(target=reader, daemon=True).start()
    try:
        deadline = time.monotonic() + 360
        while not ready.wait(0.5):
            assert proc.poll() is None, "server exited: " + (tmp_path / "stderr.txt").read_text()[-3000:]
            assert time.monotonic() < deadline, "no '# ready:' line in 360 s:\n" + "\n".join(lines)
        exports = dict(line[len("export "):].split("=", 1) for line in lines if line.startswith("export "))
        assert {"AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"} <= set(exports)
        endpoint = exports["AWS_ENDPOINT_URL_S3"]
        assert lines[-1] == f"# ready: {endpoint}"
        for uri in ("s3://finemed-demo/models/tiny", "s3://finemed-demo/data/sft.jsonl",
                    "s3://finemed-demo/data/reasoning.jsonl", "s3://finemed-demo/data/dpo.jsonl",
                    "s3://finemed-demo/data/heldout_mcq.jsonl"):
            assert any(line.startswith("#") and line.endswith(" " + uri) for line in lines), uri

        client = boto3.session.Session().client(
            "s3", endpoint_url=endpoint, aws_access_key_id=exports["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=exports["AWS_SECRET_ACCESS_KEY"], region_name=exports["AWS_REGION"])
        keys = {o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket="finemed-demo")
                for o in page.get("Contents", [])}
        for key in ("models/tiny/config.json", "models/tiny/tokenizer.json", "models/tiny/model.safetensors",
                    "data/sft.jsonl", "data/reasoning.jsonl", "data/dpo.jsonl", "data/heldout_mcq.jsonl",
                    "synth/manifest.json"):
            assert key in keys, (key, sorted(keys))
        # what configs/recipe_finemed_tiny.yaml trains on: the synthesized datasets
        assert any(k.startswith("synth/sft/part_department=") and k.endswith(".parquet") for k in keys)
        assert any(k.startswith("synth/dpo/") and k.endswith(".parquet") for k in keys)

        def body(key: str) -> list[str]:
            return client.get_object(Bucket="finemed-demo", Key=key)["Body"].read().decode().splitlines()

        from finemed_ray.toy.sample import bad_sft_rows, sample_mcq_items, sample_sft_rows

        assert len(body("data/sft.jsonl")) == len(sample_sft_rows(paraphrases="train", system_prompt=None)) + len(
            bad_sft_rows())
        mcq = [json.loads(line) for line in body("data/heldout_mcq.jsonl")]
        assert mcq == sample_mcq_items(paraphrases="heldout")
        try:
            from finemed_ray.toy.seed_corpus import seed_corpus_rows
        except ModuleNotFoundError:
            assert "seeds/seed_corpus.jsonl" not in keys
        else:
            assert len(body("seeds/seed_corpus.jsonl")) == len(seed_corpus_rows())
    finally:
        _stop(proc)
        err.close()
    assert proc.returncode == 0  # SIGTERM is a clean stop
