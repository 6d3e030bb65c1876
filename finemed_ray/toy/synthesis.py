"""The demo's training data from the real synthesis pipeline, with the OFFLINE TEACHER (rule-based, not an LLM).

:func:`synthesize_demo_data` writes the seed corpus (:mod:`finemed_ray.toy.seed_corpus`) and the held-out MCQ items
(the decontamination benchmark) under ``work_uri``, starts :func:`finemed_ray.toy.offline_teacher.OfflineTeacherServer`
on 127.0.0.1, runs :class:`finemed_ray.synth.pipeline.SynthesisPipeline` with ``configs/synth_demo.yaml`` on Ray
Data, stops the server and returns the manifest with the output URIs. The server lives in this (the driver's)
process, so the Ray cluster must run on this machine (a local cluster, or one the caller started here).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from finemed_ray import storage

log = logging.getLogger(__name__)

__all__ = ["DEMO_CONFIG", "heldout_benchmark_rows", "synthesize_demo_data"]

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "synth_demo.yaml"
BENCHMARK_NAME = "heldout_mcq"


def heldout_benchmark_rows() -> list[dict[str, Any]]:
    """The decontamination benchmark: the held-out MCQ items (``sample_mcq_items(paraphrases="heldout")``, first,
    so a hit names the MCQ item) and then every held-out question wording of every fact (paraphrases 3 and 4), so
    no held-out wording can reach the training data whichever held-out items an evaluation asks."""
    from finemed_ray.toy import sample

    rows = sample.sample_mcq_items(paraphrases="heldout")
    for kind, table in (("drug", sample.DRUG_INDICATIONS), ("test", sample.DISEASE_TESTS)):
        for i, fact in enumerate(table):
            for p in sample.HELDOUT_PARAPHRASES:
                rows.append({"id": f"heldout-{kind}-{i:02d}-p{p}", "question": sample._question(kind, fact, p)})
    return rows


def synthesize_demo_data(out_uri: str, work_uri: str, *, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Run the synthesis pipeline on the demo's seed corpus with the offline teacher.

    ``work_uri`` (local or ``s3://``) receives ``seeds.jsonl`` (the seed corpus) and ``heldout_mcq.jsonl`` (the
    decontamination benchmark, :func:`heldout_benchmark_rows`); ``out_uri`` the pipeline's outputs:
    ``sft/`` (Parquet, hive-partitioned by ``part_department=/part_subdepartment=``), ``reasoning/``, ``dpo/``,
    ``quarantine/``, ``cache/`` and ``manifest.json``. ``overrides`` (``key=value``, as on the command line) are
    applied after the demo's own, so they may change anything, e.g. point ``teachers.models.main`` at a real teacher.

    Ray: uses the caller's Ray if it is initialised; otherwise starts a local cluster (``ray.address`` /
    ``ray.local_num_cpus`` of the config, as ``jobs/synthesize.py`` does) and shuts it down before returning.

    Returns the pipeline's manifest (``docs``, ``kept_by_kind``, ``steps`` with the drops per step and reason,
    ``outputs`` with rows per dataset, teacher calls, ...) plus ``uris`` (sft, reasoning, dpo, quarantine, manifest,
    seeds, benchmark) and ``teacher`` (model name, what it is, requests it served).
    """
    import ray

    from finemed_ray.config import load_config
    from finemed_ray.toy.sample import write_jsonl
    from finemed_ray.synth.config import SynthJobConfig
    from finemed_ray.synth.pipeline import SynthesisPipeline
    from finemed_ray.toy.offline_teacher import MODEL_NAME, OfflineTeacherServer
    from finemed_ray.toy.seed_corpus import write_seed_corpus

    t0 = time.time()
    seeds_uri = storage.join(work_uri, "seeds.jsonl")
    bench_uri = storage.join(work_uri, f"{BENCHMARK_NAME}.jsonl")
    write_seed_corpus(seeds_uri, with_broken_lines=True)  # two bad lines: quarantined at read, with a reason
    write_jsonl(heldout_benchmark_rows(), bench_uri)

    started_ray = False
    with OfflineTeacherServer() as server:
        cfg = load_config(SynthJobConfig, DEMO_CONFIG, [
            f"input.path={seeds_uri}", f"output.path={out_uri}", f"teachers.models.main.base_url={server.base_url}",
            f"decontamination.benchmarks={{{BENCHMARK_NAME}: {bench_uri}}}", *overrides])
        offline = all(t.model == MODEL_NAME for t in cfg.teachers.models.values())
        storage.check_writable(cfg.output.path)
        if offline:
            # Cached responses are keyed by the teacher's URL, and the offline teacher gets a new port every run:
            # an old cache can never be hit, so drop it instead of letting it grow.
            storage.delete(storage.join(cfg.output.path, "cache"))
        if not ray.is_initialized():
            from finemed_ray.cluster import ensure_ray_address

            ensure_ray_address(cfg.ray.address, cfg.ray.local_num_cpus)
            started_ray = True
        try:
            log.info("synthesis with the OFFLINE TEACHER (rule-based, not an LLM) at %s: %s -> %s",
                     server.base_url, seeds_uri, cfg.output.path)
            manifest = SynthesisPipeline(cfg).run()
        finally:
            if started_ray:
                ray.shutdown()
        served = server.request_count
    outputs = manifest["outputs"]
    result = dict(manifest)
    result["uris"] = {name: outputs[name]["uri"] for name in ("sft", "reasoning", "dpo", "quarantine")}
    result["uris"].update(manifest=storage.join(cfg.output.path, "manifest.json"), seeds=seeds_uri,
                          benchmark=bench_uri)
    result["teacher"] = {"model": MODEL_NAME if offline else cfg.teachers.models[cfg.teachers.default].model,
                         "offline": offline,
                         "what": "rule-based offline teacher (finemed_ray/toy/offline_teacher.py), not an LLM"
                         if offline else "the teachers of the config", "requests_served": served}
    log.info("synthesis done in %.1f s: %s", time.time() - t0,
             json.dumps({k: v["rows"] for k, v in outputs.items()}))
    return result
