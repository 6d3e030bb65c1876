"""The synthesis response cache (``finemed_ray.synth.cache.run_cached_step``) on Ray Data with a real HTTP teacher:
every request row answered exactly once with its other columns kept, new requests sent to the teacher and stored
before use, cached ones joined from the cache (no teacher call), on local storage and on S3."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from finemed_ray import storage
from finemed_ray.synth.cache import StepStats, cached_keys, request_key, run_cached_step
from finemed_ray.toy.scripted_teacher import ScriptedTeacherServer
from finemed_ray.synth.teachers import TeacherSpec, make_teacher


def echo(messages: list[dict]) -> str:
    return "echo: " + messages[-1]["content"]


def request_rows(doc_ids: range, n_sub: int = 1) -> list[dict]:
    rows = []
    for d in doc_ids:
        for sub in range(n_sub):
            messages = [{"role": "user", "content": f"question {d}.{sub}"}]
            rows.append({"doc_id": f"d{d}", "state": json.dumps({"n": d}), "sub": sub, "n_sub": n_sub,
                         "messages": messages, "key": request_key("step", "v1", "t", messages)})
    return rows


def requests_dataset(rows: list[dict]):
    """Three blocks, the last one emptied by a filter (a map over an input bundle with no rows yields a block
    without columns, which the cached step must not hand on to a shuffle)."""
    import ray.data
    from ray.data.expressions import col

    for r in rows[2 * (len(rows) // 3):]:
        r["drop"] = True
    for r in rows:
        r.setdefault("drop", False)
    ds = ray.data.from_items(rows, override_num_blocks=3).filter(expr=~col("drop")).drop_columns(["drop"])
    return ds, [r for r in rows if not r["drop"]]


@pytest.fixture(scope="module")
def server():
    with ScriptedTeacherServer(echo) as srv:
        yield srv


@pytest.mark.parametrize("where", ["local", "s3"])
def test_cached_step_answers_once_then_reuses_the_cache(ray_cluster, server, tmp_path, where):
    cache_uri = str(tmp_path / "cache" / "step") if where == "local" else "s3://finemed-test/cache-test/step"
    storage.delete(cache_uri)
    teacher = make_teacher(TeacherSpec(backend="http", model="echo", base_url=server.base_url, batch_size=4,
                                       concurrency=2, max_retries=0, extra={"num_workers": 2}))

    def run(rows):
        ds, kept = requests_dataset(rows)
        cached = cached_keys(cache_uri)
        stats = StepStats(step="step", teacher="echo")
        before = server.request_count
        out = run_cached_step(ds, "step", teacher, cache_uri, stats)
        blocks = [b.metadata.num_rows for bundle in out.iter_internal_ref_bundles() for b in bundle.blocks]
        assert blocks and min(blocks) > 0  # no empty (column-less) block is handed on
        got = out.take_all()
        assert len(got) == len(kept) == stats.requests
        by_key = {r["key"]: r for r in got}
        assert len(by_key) == len(got)  # every request row exactly once
        for want in kept:
            row = by_key[want["key"]]
            assert (row["doc_id"], row["state"], row["sub"], row["n_sub"]) == \
                (want["doc_id"], want["state"], want["sub"], want["n_sub"])
            assert row["text"] == echo(want["messages"]) and row["error"] is None and row["completion_tokens"] > 0
        hits = sum(r["key"] in cached for r in kept)
        assert (stats.cache_hits, stats.teacher_calls) == (hits, len(kept) - hits)
        assert server.request_count - before == stats.teacher_calls  # cached requests never reach the teacher
        assert cached_keys(cache_uri) == cached | {r["key"] for r in kept}  # stored before use, each key once
        return out, kept, stats

    _, _, first = run(request_rows(range(12)))
    assert first.teacher_calls == 8 and first.cache_hits == 0
    files = storage.list_files(cache_uri)
    assert files and all(f.endswith(".parquet") for f in files)  # no temp file left behind

    # A rerun with more documents, some with two requests: only the requests not cached reach the teacher; the
    # others come from the cache. Both kinds of rows have one schema (they are unioned), which a groupby shuffles.
    rows = request_rows(range(12)) + request_rows(range(100, 106), n_sub=2)
    out, kept, second = run(rows)
    assert second.cache_hits > 0 and second.teacher_calls > 0
    groups = out.groupby("doc_id").map_groups(lambda g: pa.table({"doc_id": [g.column("doc_id")[0].as_py()],
                                                                  "n": [g.num_rows]}), batch_format="pyarrow")
    want = {}
    for r in kept:
        want[r["doc_id"]] = want.get(r["doc_id"], 0) + 1
    assert {r["doc_id"]: r["n"] for r in groups.take_all()} == want

    _, kept, third = run(rows)
    assert third.teacher_calls == 0 and third.cache_hits == len(kept)


def test_same_request_from_two_documents_is_answered_for_both_on_a_rerun(ray_cluster, server, tmp_path):
    """Two documents making the very same request (e.g. the same generated question) in one run: both are sent and
    stored; a rerun answers both from the cache with one response per key (no duplicated rows)."""
    import ray.data

    cache_uri = str(tmp_path / "cache" / "dup")
    teacher = make_teacher(TeacherSpec(backend="http", model="echo", base_url=server.base_url, batch_size=4,
                                       max_retries=0, extra={"num_workers": 1}))
    rows = request_rows(range(4))
    twin = {**rows[0], "doc_id": "twin"}
    rows.append(twin)
    for expect_calls in (5, 0):
        stats = StepStats(step="dup", teacher="echo")
        before = server.request_count
        got = run_cached_step(ray.data.from_items(rows), "dup", teacher, cache_uri, stats).take_all()
        assert server.request_count - before == stats.teacher_calls == expect_calls
        assert sorted(r["doc_id"] for r in got) == sorted(r["doc_id"] for r in rows)
        assert all(r["text"] == echo(r["messages"]) for r in got)
