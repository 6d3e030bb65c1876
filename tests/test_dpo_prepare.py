"""Ray Data DPO preparation (finemed_ray.data.dpo_prepare) against the embedded S3 server and the tiny model."""

from __future__ import annotations

import uuid
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest

from finemed_ray import storage
from finemed_ray.data.dpo_prepare import TOKEN_COLUMNS, fit_pair, prepare_dpo, read_prepared_dpo
from finemed_ray.toy.sample import bad_dpo_rows, sample_dpo_rows, write_jsonl
from finemed_ray.data.sft_prepare import RowSelection
from finemed_ray.errors import ConfigError, DataError
from finemed_ray.schemas import to_table

MAX_LENGTH = 512  # every sample pair fits (prompt+chosen is at most ~300 tiny-tokenizer tokens)

# bad row id -> a word its quarantine reason must contain
EXPECTED_REASONS = {
    "bad-chosen-equals-rejected": "identical",
    "bad-empty-prompt": "prompt: empty conversation",
    "bad-empty-chosen": "chosen: the assistant message is empty",
    "bad-empty-user": "prompt: the user message is empty",
    "bad-missing-rejected": "rejected: missing",
    "bad-chosen-user-role": "chosen: must hold assistant messages only",
    "bad-unknown-role": "'wizard' is not one of",
    "bad-prompt-ends-with-assistant": "prompt: the last message must be from the user",
    "bad-prompt-string": "prompt: expected a list",
    "bad-json": "invalid JSON",
}


def _rows(ds) -> list[dict]:
    out = []
    for batch in ds.iter_batches(batch_format="pyarrow"):
        out.extend(batch.to_pylist())
    return out


def _read_parquet_dir(uri: str) -> list[dict]:
    fs, path = storage.get_filesystem(uri)
    return pq.read_table(path, filesystem=fs).to_pylist()


def _render(tok, messages, gen=False):
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


def _ids(tok, messages, gen=False):
    enc = tok.apply_chat_template(messages, tokenize=True, return_dict=True, add_generation_prompt=gen)
    return list(enc["input_ids"])


@pytest.fixture(scope="module")
def prepared(ray_cluster, s3, tiny_model_dir):
    """One prepare run over all train pairs + the broken rows, with a 25% eval split."""
    prefix = f"s3://finemed-test/dpo-prepare-{uuid.uuid4().hex[:8]}"
    rows = sample_dpo_rows(seed=0)
    data_uri = write_jsonl(rows + bad_dpo_rows(), f"{prefix}/data/pairs.jsonl")
    summary = prepare_dpo(data_uri, str(tiny_model_dir), f"{prefix}/run", max_length=MAX_LENGTH,
                          selection=RowSelection(eval_fraction=0.25))
    return SimpleNamespace(rows={r["id"]: r for r in rows}, summary=summary, prefix=prefix,
                           prepared=_read_parquet_dir(summary.prepared_uri))


def _good(prepared) -> list[dict]:
    return [r for r in prepared.prepared if r["error"] is None]


def test_counts_and_quarantine_reasons(prepared):
    s, n_good, n_bad = prepared.summary, len(prepared.rows), len(bad_dpo_rows())
    assert (s.rows_in, s.rows_valid, s.rows_quarantined) == (n_good + n_bad, n_good, n_bad)
    assert s.rows_train + s.rows_eval == n_good and s.rows_filtered_out == 0 and s.rows_truncated == 0
    assert 0.1 * n_good < s.rows_eval < 0.4 * n_good
    assert sum(s.quarantine_reasons.values()) == n_bad
    assert s.quarantine_reasons["invalid JSON"] == 1 and s.quarantine_reasons["prompt"] >= 4
    assert sum(s.departments.values()) == n_good
    assert s.tokens_train == sum(r["num_tokens"] for r in _good(prepared) if r["split"] == "train")
    assert s.prepared_uri == f"{prepared.prefix}/run/prepared"

    quarantine = _read_parquet_dir(s.quarantine_uri)
    assert len(quarantine) == n_bad and {q["dataset"] for q in quarantine} == {s.input_uri}
    by_id = {}
    for q in quarantine:
        bad_id = next(k for k in EXPECTED_REASONS if f'"{k}"' in q["raw"])
        by_id[bad_id] = q["reason"]
    assert set(by_id) == set(EXPECTED_REASONS)
    for bad_id, expected in EXPECTED_REASONS.items():
        assert expected in by_id[bad_id], (bad_id, by_id[bad_id])

    # The split is the stable id hash of RowSelection, as for SFT. read_prepared_dpo (one Ray Data read; the
    # split is just its filter value) returns that split's good rows with TRL's columns.
    evals = _rows(read_prepared_dpo(s.prepared_uri, "eval"))
    train = [r for r in _good(prepared) if r["split"] == "train"]
    assert (len(train), len(evals)) == (s.rows_train, s.rows_eval)
    assert set(evals[0]) == {"id", *TOKEN_COLUMNS}
    good = {r["id"]: r for r in _good(prepared)}
    assert all(r[c] == good[r["id"]][c] for r in evals for c in TOKEN_COLUMNS)
    sel = RowSelection(eval_fraction=0.25)
    assert all(sel.split_of(r["id"], None, None) == "train" for r in train)
    assert all(sel.split_of(r["id"], None, None) == "eval" for r in evals)
    assert {r["id"] for r in train + evals} == set(prepared.rows)


def test_tokens_decode_to_rendered_chat_and_prompt_is_a_prefix(prepared, tiny_tokenizer):
    tok = tiny_tokenizer
    for r in _good(prepared):
        row = prepared.rows[r["id"]]
        # The prompt tokens are the prompt rendered alone with the generation prompt...
        assert r["prompt_ids"] == _ids(tok, row["prompt"], gen=True)
        assert tok.decode(r["prompt_ids"]) == _render(tok, row["prompt"], gen=True)
        for key in ("chosen", "rejected"):
            full = _render(tok, row["prompt"] + row[key])
            # ...and a prefix of each full render, whose rest is the completion with its end-of-turn token.
            assert r["prompt_ids"] + r[f"{key}_ids"] == _ids(tok, row["prompt"] + row[key])
            assert tok.decode(r["prompt_ids"] + r[f"{key}_ids"]) == full
            assert tok.decode(r[f"{key}_ids"]).startswith(row[key][0]["content"] + tok.eos_token)
        assert r["chosen_ids"] != r["rejected_ids"] and r["truncated"] is False
        assert r["num_tokens"] == sum(len(r[c]) for c in TOKEN_COLUMNS)
        assert (r["prompt_tokens"], r["chosen_tokens"], r["rejected_tokens"]) == tuple(len(r[c]) for c in TOKEN_COLUMNS)


def test_ids_match_trl_dpo_tokenisation_and_collator(prepared, tiny_tokenizer):
    """Our columns are exactly what TRL 1.16's DPOTrainer._prepare_dataset would compute from the raw rows, and
    its DataCollatorForPreference consumes them as they are."""
    import datasets
    from trl.trainer.dpo_trainer import DataCollatorForPreference, DPOTrainer

    tok = tiny_tokenizer
    ours = {r["id"]: r for r in _good(prepared)}
    raw = [{k: prepared.rows[i][k] for k in ("id", "prompt", "chosen", "rejected")} for i in sorted(ours)[:24]]
    args = SimpleNamespace(dataset_num_proc=None, max_length=MAX_LENGTH, truncation_mode="keep_start")
    trl_ds = DPOTrainer._prepare_dataset(SimpleNamespace(_tokenizer=tok), datasets.Dataset.from_list(raw), tok,
                                         args, "train")
    for ex in trl_ds:
        for c in TOKEN_COLUMNS:
            assert ex[c] == ours[ex["id"]][c], (ex["id"], c)

    batch = [ours[r["id"]] for r in raw[:4]]
    collated = DataCollatorForPreference(pad_token_id=tok.pad_token_id, max_length=MAX_LENGTH)(
        [{c: ex[c] for c in TOKEN_COLUMNS} for ex in batch])
    n = len(batch)
    assert collated["input_ids"].shape[0] == 2 * n
    assert collated["completion_mask"][:n].sum(1).tolist() == [len(ex["chosen_ids"]) for ex in batch]
    assert collated["completion_mask"][n:].sum(1).tolist() == [len(ex["rejected_ids"]) for ex in batch]


def test_overlong_truncate_vs_drop(ray_cluster, s3_prefix, tiny_model_dir, tiny_tokenizer):
    tok = tiny_tokenizer
    rows = sample_dpo_rows(seed=5)[:40]
    data_uri = write_jsonl(rows, f"{s3_prefix}/pairs.jsonl")
    max_length, max_prompt = 240, 36
    lengths = {}
    for r in rows:
        p = len(_ids(tok, r["prompt"], gen=True))
        lengths[r["id"]] = (p, len(_ids(tok, r["prompt"] + r["chosen"])) - p,
                            len(_ids(tok, r["prompt"] + r["rejected"])) - p)
    long_prompt = {i for i, (p, _, _) in lengths.items() if p > max_prompt}
    long_pair = {i for i, (p, c, j) in lengths.items() if min(p, max_prompt) + max(c, j) > max_length}
    assert long_prompt and long_pair and long_prompt - long_pair and long_pair - long_prompt  # both cases occur
    overlong = long_prompt | long_pair

    trunc = prepare_dpo(data_uri, str(tiny_model_dir), f"{s3_prefix}/trunc", max_length=max_length,
                        max_prompt_length=max_prompt, overlong="truncate")
    assert (trunc.rows_valid, trunc.rows_truncated, trunc.rows_quarantined) == (len(rows), len(overlong), 0)
    prepared = _read_parquet_dir(trunc.prepared_uri)
    assert {r["id"] for r in prepared if r["truncated"]} == overlong
    source = {r["id"]: r for r in rows}
    for r in prepared:
        full_prompt = _ids(tok, source[r["id"]]["prompt"], gen=True)
        assert r["prompt_tokens"] == len(full_prompt)
        assert len(r["prompt_ids"]) <= max_prompt
        assert r["prompt_ids"] == full_prompt[-max_prompt:]  # the end of the prompt (question + header) is kept
        for key in ("chosen", "rejected"):
            assert len(r["prompt_ids"]) + len(r[f"{key}_ids"]) <= max_length
            full = _ids(tok, source[r["id"]]["prompt"] + source[r["id"]][key])
            assert r[f"{key}_ids"] == full[len(full_prompt):][: len(r[f"{key}_ids"])]  # completion start kept
            assert r[f"{key}_tokens"] == len(full) - len(full_prompt)

    drop = prepare_dpo(data_uri, str(tiny_model_dir), f"{s3_prefix}/drop", max_length=max_length,
                       max_prompt_length=max_prompt, overlong="drop")
    assert (drop.rows_valid, drop.rows_truncated) == (len(rows) - len(overlong), 0)
    assert drop.quarantine_reasons == {"overlong": len(overlong)}
    reasons = [q["reason"] for q in _read_parquet_dir(drop.quarantine_uri)]
    assert sum("max_prompt_length=36" in x for x in reasons) == len(long_prompt)
    assert sum("max_length=240" in x for x in reasons) == len(overlong - long_prompt)

    with pytest.raises(ConfigError, match="overlong"):
        prepare_dpo(data_uri, str(tiny_model_dir), f"{s3_prefix}/x", max_length=200, overlong="clip")
    with pytest.raises(ConfigError, match="max_prompt_length"):
        prepare_dpo(data_uri, str(tiny_model_dir), f"{s3_prefix}/x", max_length=200, max_prompt_length=200)


def test_fit_pair_limits():
    ids = {"prompt_ids": [1, 2, 3, 4], "chosen_ids": [5, 6, 7, 8], "rejected_ids": [5, 6, 9]}
    assert fit_pair(ids, 8, None, "drop") == (ids, False, None)
    assert fit_pair(ids, 7, None, "truncate") == (
        {"prompt_ids": [1, 2, 3, 4], "chosen_ids": [5, 6, 7], "rejected_ids": [5, 6, 9]}, True, None)
    assert fit_pair(ids, 7, None, "drop")[2] == "overlong: prompt+chosen has 8 tokens > max_length=7"
    assert fit_pair(ids, 7, 2, "truncate") == (
        {"prompt_ids": [3, 4], "chosen_ids": [5, 6, 7, 8], "rejected_ids": [5, 6, 9]}, True, None)
    assert fit_pair(ids, 7, 2, "drop")[2] == "overlong: prompt has 4 tokens > max_prompt_length=2"
    # A prompt that fills max_length leaves no completion token: quarantined whatever the policy (TRL drops it too).
    for policy in ("truncate", "drop"):
        assert "leaving no room for a completion within max_length=4" in fit_pair(ids, 4, None, policy)[2]
    # Cut to the shared start, the completions would be identical: no preference signal left.
    assert fit_pair(ids, 6, None, "truncate")[2].startswith("overlong: chosen and rejected are identical")


def test_parquet_input_filters_and_errors(ray_cluster, s3_prefix, tiny_model_dir):
    rows = sample_dpo_rows(seed=1)[:48]
    table = to_table(rows, "dpo")
    fs, path = storage.get_filesystem(f"{s3_prefix}/pq/pairs.parquet")
    pq.write_table(table, path, filesystem=fs)

    # A department filter applies as for SFT: other departments' rows are valid but "filtered".
    dept = "Surgery"
    n_dept = sum(r["department"] == dept for r in rows)
    assert 0 < n_dept < len(rows)
    s = prepare_dpo(f"{s3_prefix}/pq", str(tiny_model_dir), f"{s3_prefix}/run", max_length=MAX_LENGTH,
                    selection=RowSelection(department="surgery"))
    assert (s.rows_valid, s.rows_quarantined, s.rows_filtered_out) == (len(rows), 0, len(rows) - n_dept)
    assert s.rows_train == n_dept
    kept = {r["id"] for r in _read_parquet_dir(s.prepared_uri) if r["split"] == "train"}
    assert kept == {r["id"] for r in rows if r["department"] == dept}

    with pytest.raises(DataError, match=r"data.department='Dermatology'.*selects no training rows"):
        prepare_dpo(f"{s3_prefix}/pq", str(tiny_model_dir), f"{s3_prefix}/run", max_length=MAX_LENGTH,
                    selection=RowSelection(department="Dermatology"))

    bad_uri = write_jsonl(bad_dpo_rows(), f"{s3_prefix}/bad/pairs.jsonl")
    with pytest.raises(DataError, match="no valid preference rows"):
        prepare_dpo(bad_uri, str(tiny_model_dir), f"{s3_prefix}/bad-run", max_length=MAX_LENGTH)
    assert len(_read_parquet_dir(f"{s3_prefix}/bad-run/quarantine")) == len(bad_dpo_rows())

    empty_uri = f"{s3_prefix}/empty/pairs.jsonl"
    storage.write_text(empty_uri, "\n")
    with pytest.raises(DataError, match=f"{empty_uri}: no rows"):
        prepare_dpo(empty_uri, str(tiny_model_dir), f"{s3_prefix}/empty-run", max_length=MAX_LENGTH)
    with pytest.raises(DataError, match="dataset not found"):
        prepare_dpo(f"{s3_prefix}/missing", str(tiny_model_dir), f"{s3_prefix}/x", max_length=MAX_LENGTH)
