"""Issue 16, "no secret in any log": training, evaluation and serving run with recognisable dummy secrets (the S3
secret key, the serving API key), then every byte they left behind is searched for them.

The whole scenario runs in ONE subprocess (its driver is written to tmp_path) so that its environment holds the
dummy values and nothing else's: the session's shared S3/Ray fixtures use other credentials. The product starts its
own local Ray cluster (``finemed_ray.train.driver.ensure_ray``: forwarded variables go to workers through a
private file, only the file's path in the logged runtime env), with ``RAY_TMPDIR`` pointing at a fresh, short
directory so the Ray session directory (logs, runtime env agent logs, GCS files, sockets) is known.

Searched afterwards, in this process: every file under the Ray temp dir, every object of every bucket of the S3
server (listed and read through boto3 with the dummy credentials), the subprocess's stdout/stderr, every file under
tmp_path (the job log dir, local model/outputs, the summaries the driver wrote). The scenario's own results are
checked too (an export with config.json, an evaluation report, 200 for the right key, 401 for a wrong one, workers
that really received the S3 secret), so the test cannot pass by having run nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "finemed-secrets"

DRIVER = r'''
import json, os, socket, sys, time
from pathlib import Path

ROOT = Path(sys.argv[1]); WORK = Path(sys.argv[2]); BUCKET = sys.argv[3]; WRONG_KEY = sys.argv[4]
sys.path.insert(0, str(ROOT))
result = {}

def dump():
    (WORK / "result.json").write_text(json.dumps(result, indent=1, default=str))

from finemed_ray import storage
from finemed_ray.config import load_config
from finemed_ray.toy.sample import sample_mcq_items, sample_sft_rows, write_jsonl
from finemed_ray.toy.tiny_model import save_tiny_model

prefix = f"s3://{BUCKET}/scenario"
# inputs on S3, written with the dummy secret in the environment
model_local = WORK / "tiny-model"
save_tiny_model(str(model_local))
storage.publish_dir(str(model_local), f"{prefix}/models/tiny")
data_uri = write_jsonl(sample_sft_rows(n=16, seed=0, paraphrases="train", system_prompt=None), f"{prefix}/data/sft.jsonl")
mcq_uri = write_jsonl(sample_mcq_items()[:4], f"{prefix}/bench/mcq.jsonl")

# (1) SFT: the product starts the local Ray cluster (ensure_ray -> worker_env private file)
from finemed_ray.train.configs import SFTJobConfig
from finemed_ray.train.stages.sft import SFTJob
export = f"{prefix}/export"
cfg = load_config(SFTJobConfig, ROOT / "configs/sft_tiny.yaml", [
    f"run.storage_path={prefix}/runs", f"model.path={prefix}/models/tiny", f"data.path={data_uri}",
    f"output.export_path={export}", "train.report_to=[]", "train.epochs=1", "train.max_steps=2",
    "train.per_device_batch_size=4", "train.save_steps=50", "scaling.num_workers=2", "ray.local_num_cpus=4",
    "run.name=sft-secrets"])
job = SFTJob(cfg).setup()
job.run()
summary = job.save()
print("SFT summary:", json.dumps(summary, default=str), flush=True)
result["sft_summary"] = summary
result["export_config_json"] = storage.exists(f"{export}/config.json")
dump()

import ray

@ray.remote(num_cpus=0)
def worker_matches(digest_s3, digest_api):
    import hashlib
    h = lambda v: hashlib.sha256((v or "").encode()).hexdigest()
    return {"s3_secret_matches": h(os.environ.get("AWS_SECRET_ACCESS_KEY")) == digest_s3,
            "api_key_matches": h(os.environ.get("FINEMED_API_KEY")) == digest_api,
            "env_file_var_set": bool(os.environ.get("FINEMED_WORKER_ENV_FILE"))}

import hashlib
h = lambda v: hashlib.sha256(v.encode()).hexdigest()
result["worker_env"] = ray.get(worker_matches.remote(h(os.environ["AWS_SECRET_ACCESS_KEY"]), h(os.environ["FINEMED_API_KEY"])))
dump()

# (2) evaluation on the export
from finemed_ray.eval.config import EvalJobConfig
from finemed_ray.eval.runner import Evaluation
eval_out = f"{prefix}/eval"
ecfg = load_config(EvalJobConfig, ROOT / "configs/eval_tiny.yaml", [
    f"engine.model={export}", f"output.path={eval_out}",
    "benchmarks=" + json.dumps([{"name": "mcq", "path": mcq_uri, "kind": "mcq", "limit": 4}]),
    "engine.max_tokens=8", "engine.extra={num_cpus: 1}"])
report = Evaluation(ecfg).run()
print("eval scores:", json.dumps(report.get("scores"), default=str), flush=True)
result["eval_scores"] = report.get("scores")
result["eval_report_json"] = storage.exists(f"{eval_out}/report.json")
dump()

# (3) serving with the API key from FINEMED_API_KEY
import httpx
from ray import serve
from finemed_ray.serving.app import build_app
from finemed_ray.serving.config import ServeConfig
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
scfg = load_config(ServeConfig, ROOT / "configs/serve_tiny.yaml", [
    f"model.path={export}", "model.engine=hf", "model.device=cpu", "model.max_model_len=512",
    "security.api_key_env=FINEMED_API_KEY", "autoscaling.max_replicas=1", "limits.max_tokens=16",
    "resources.ingress_num_cpus=0.1", "resources.engine_num_cpus=1", f"http.port={port}"])
serve.start(http_options={"host": "127.0.0.1", "port": port})
serve.run(build_app(scfg), name="secrets", route_prefix="/")
url = f"http://127.0.0.1:{port}/v1/chat/completions"
body = {"model": "finemed-tiny", "messages": [{"role": "user", "content": "What is metformin for?"}],
        "max_tokens": 8, "temperature": 0}
with httpx.Client(timeout=120) as http:
    ok = http.post(url, json=body, headers={"Authorization": "Bearer " + os.environ["FINEMED_API_KEY"]})
    bad = http.post(url, json=body, headers={"Authorization": "Bearer " + WRONG_KEY})
    none = http.post(url, json=body)
result["serve"] = {"ok_status": ok.status_code, "ok_body": ok.text, "bad_status": bad.status_code,
                   "bad_body": bad.text, "bad_headers": dict(bad.headers), "ok_headers": dict(ok.headers),
                   "none_status": none.status_code, "none_body": none.text}
print("serve statuses:", ok.status_code, bad.status_code, none.status_code, flush=True)
print("unauthorised reply:", bad.text, flush=True)
dump()
# let access logs be written, then stop everything cleanly so every log is flushed
time.sleep(2)
serve.shutdown()
session_dir = ray._private.worker._global_node.get_session_dir_path()
result["session_dir"] = session_dir
dump()
ray.shutdown()
result["done"] = True
dump()
print("scenario done", flush=True)
'''


def _find(needle: bytes, blob: bytes) -> list[int]:
    out, i = [], blob.find(needle)
    while i >= 0 and len(out) < 5:
        out.append(i)
        i = blob.find(needle, i + 1)
    return out


def _scan_tree(root: Path, needles: dict[str, bytes], hits: list[str], seen: list[int]) -> None:
    for p in root.rglob("*"):
        try:
            if p.is_symlink() or not p.is_file():
                continue
            data = p.read_bytes()
        except OSError:
            continue
        seen[0] += 1
        for name, needle in needles.items():
            for pos in _find(needle, data):
                ctx = data[max(0, pos - 120): pos + len(needle) + 60].decode("utf-8", "replace")
                hits.append(f"{name} in file {p} @ {pos}: ...{ctx}...")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_no_secret_in_any_log_output_or_object(tmp_path):
    import boto3

    from finemed_ray.toy.s3_server import EmbeddedS3

    s3_secret = "S3SECRET-" + uuid.uuid4().hex
    api_key = "APIKEY-" + uuid.uuid4().hex
    wrong_key = "WRONGKEY-" + uuid.uuid4().hex
    access_key = "AKIDSECRETS" + uuid.uuid4().hex[:8].upper()
    needles = {"S3 secret": s3_secret.encode(), "API key": api_key.encode(), "wrong API key": wrong_key.encode()}

    # Ray's sockets live under the temp dir: keep the path short (AF_UNIX paths are limited to ~107 bytes).
    ray_tmp = Path(tempfile.mkdtemp(prefix="fsec-", dir="/tmp"))
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "driver.py").write_text(DRIVER)

    server = EmbeddedS3(buckets=(BUCKET,)).start()  # moto checks no signature: any credentials work
    try:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("AWS_", "FINEMED_", "RAY_ADDRESS", "RAY_TMPDIR"))}
        env.update(server.env)
        env.update({
            "AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": s3_secret, "FINEMED_API_KEY": api_key,
            "RAY_TMPDIR": str(ray_tmp), "FINEMED_LOG_DIR": str(tmp_path / "job-logs"),
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_AUTH_MODE": "disabled", "DS_ACCELERATOR": "cpu",
            "TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0", "RAY_TRAIN_V2_ENABLED": "1",
            "PYTHONUNBUFFERED": "1",
        })
        t0 = time.time()
        proc = subprocess.run([sys.executable, str(tmp_path / "driver.py"), str(ROOT), str(work), BUCKET, wrong_key],
                              cwd=str(ROOT), env=env, capture_output=True, timeout=780)
        elapsed = time.time() - t0
        (tmp_path / "driver.stdout").write_bytes(proc.stdout)
        (tmp_path / "driver.stderr").write_bytes(proc.stderr)
        result_file = work / "result.json"
        result = json.loads(result_file.read_text()) if result_file.is_file() else {}
        assert proc.returncode == 0 and result.get("done"), (
            f"scenario failed (rc={proc.returncode}, {elapsed:.0f}s, result={result})\n"
            f"--- stderr tail ---\n{proc.stderr.decode('utf-8', 'replace')[-6000:]}")

        # ---- the scenario really ran
        assert result["export_config_json"], "training produced no export with config.json"
        assert result["eval_report_json"], "evaluation wrote no report.json"
        assert result["eval_scores"]["mcq"]["no_ttt"]["n"] == 4, result["eval_scores"]
        assert result["worker_env"] == {"s3_secret_matches": True, "api_key_matches": True,
                                        "env_file_var_set": True}, result["worker_env"]
        srv = result["serve"]
        assert srv["ok_status"] == 200, srv
        assert json.loads(srv["ok_body"])["choices"], srv
        assert srv["bad_status"] == 401 and srv["none_status"] == 401, srv
        assert "error" in json.loads(srv["bad_body"]), srv

        # ---- the S3 bucket(s): list every bucket, read every object, with the dummy credentials
        client = boto3.session.Session().client("s3", endpoint_url=server.endpoint_url, aws_access_key_id=access_key,
                                                 aws_secret_access_key=s3_secret, region_name="us-east-1")
        hits: list[str] = []
        n_objects = 0
        keys_seen: set[str] = set()
        for bucket in [b["Name"] for b in client.list_buckets()["Buckets"]]:
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
                for obj in page.get("Contents", []):
                    n_objects += 1
                    keys_seen.add(obj["Key"])
                    got = client.get_object(Bucket=bucket, Key=obj["Key"])
                    blob = got["Body"].read() + json.dumps(got.get("Metadata", {})).encode() + obj["Key"].encode()
                    for name, needle in needles.items():
                        for pos in _find(needle, blob):
                            ctx = blob[max(0, pos - 120): pos + len(needle) + 60].decode("utf-8", "replace")
                            hits.append(f"{name} in s3://{bucket}/{obj['Key']} @ {pos}: ...{ctx}...")
        assert any(k.endswith("export/config.json") for k in keys_seen), sorted(keys_seen)[:50]
        assert any(k.endswith("eval/report.json") for k in keys_seen), sorted(keys_seen)[:50]
        assert any("/runs/" in k for k in keys_seen), "no Ray Train run storage objects were searched"

        # ---- the Ray temp dir (the whole session dir, its logs, the runtime env agent's logs)
        session = Path(result["session_dir"])
        assert session.is_dir() and ray_tmp in session.parents, (session, ray_tmp)
        logs = session / "logs"
        runtime_env_logs = list(logs.rglob("runtime_env*"))
        assert runtime_env_logs, f"no runtime_env logs under {logs}: {sorted(p.name for p in logs.iterdir())[:80]}"
        # the runtime env Ray logged carries the private file's path, never the forwarded values themselves
        logged = b"".join(p.read_bytes() for p in logs.rglob("*") if p.is_file())
        assert b"FINEMED_WORKER_ENV_FILE" in logged, "the worker env file's path was not seen in Ray's logs"
        seen = [0]
        _scan_tree(ray_tmp, needles, hits, seen)
        n_ray_files = seen[0]
        assert n_ray_files > 20, f"only {n_ray_files} files under {ray_tmp}"

        # ---- every local file of the test: job logs, local model, summaries, driver stdout/stderr
        _scan_tree(tmp_path, needles, hits, seen)
        for name, blob in (("stdout", proc.stdout), ("stderr", proc.stderr)):
            for nname, needle in needles.items():
                for pos in _find(needle, blob):
                    hits.append(f"{nname} in driver {name} @ {pos}: "
                                f"...{blob[max(0, pos - 120): pos + 60].decode('utf-8', 'replace')}...")
        # the unauthorised reply must echo neither key (also checked above through result.json under tmp_path)
        for nname, needle in needles.items():
            assert needle.decode() not in srv["bad_body"] and needle.decode() not in json.dumps(srv["bad_headers"]), nname

        assert not hits, f"{len(hits)} secret occurrence(s) ({n_objects} S3 objects, {seen[0]} files searched):\n" + \
            "\n".join(hits[:40])
        assert n_objects > 10
    finally:
        server.stop()
        shutil.rmtree(ray_tmp, ignore_errors=True)
