"""Three-stage curriculum SFT (all -> one department -> one sub-department) on the tiny model, 2 ZeRO-3 workers.

Asserts on what each stage actually trained on (ids recorded by the workers), not only on exit codes."""

from __future__ import annotations

from pathlib import Path

import pytest

from finemed_ray import storage
from finemed_ray.config import load_config
from finemed_ray.toy.sample import sample_mcq_items, sample_sft_rows, write_jsonl
from finemed_ray.errors import DataError
from finemed_ray.train.recipe import RecipeConfig, run_recipe

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def curriculum(tiny_model_s3, ray_cluster, s3):
    prefix = "s3://finemed-test/curriculum"
    rows = sample_sft_rows(paraphrases="train", system_prompt=None)
    write_jsonl(rows, f"{prefix}/data/sft.jsonl")
    recipe = load_config(
        RecipeConfig,
        ROOT / "configs/recipe_curriculum_tiny.yaml",
        [
            f"base_model={tiny_model_s3}",
            f"export_root={prefix}/exports",
            f"defaults.run.storage_path={prefix}/runs",
            f"defaults.data.path={prefix}/data/sft.jsonl",
        ],
    )
    result = run_recipe(recipe)
    cfgs = recipe.stage_configs()
    seen = [
        [i for ids in storage.read_json(storage.join(c.run.storage_path, c.run.name, "samples_seen.json"))["per_rank"]
         for i in ids]
        for c in cfgs
    ]
    metas = [storage.read_json(storage.join(c.output.export_path, "finemed_export.json")) for c in cfgs]
    # Proof that it learns: multiple-choice log-likelihood accuracy on held-out question wordings.
    items = sample_mcq_items(paraphrases="heldout")
    accuracy = {name: _mcq_accuracy(uri, items) for name, uri in
                [("base", tiny_model_s3)] + [(c.run.name, c.output.export_path) for c in cfgs]}
    return {"rows": {r["id"]: r for r in rows}, "result": result, "cfgs": cfgs, "seen": seen, "metas": metas,
            "accuracy": accuracy, "items": items}


def _mcq_accuracy(model_uri: str, items: list[dict]) -> float:
    from finemed_ray.eval.loglik import mcq_loglik_accuracy
    from finemed_ray.toy.fact_scoring import synthetic_option_fact_continuations
    from finemed_ray.models.loading import load_model, load_tokenizer, resolve_model_path

    local = resolve_model_path(model_uri)
    # Each option is scored as the answer to the question (its own fact's trained answer sentence), so only a
    # model that maps the question's words to the right fact can rank the gold option first.
    return mcq_loglik_accuracy(load_model(local), load_tokenizer(local), items,
                               synthetic_option_fact_continuations)["accuracy"]


@pytest.mark.slow  # the three-stage curriculum (~4 min on 2 cores): make test-slow, run by CI
def test_curriculum_learns_the_facts_far_above_chance(curriculum):
    acc = curriculum["accuracy"]
    print("held-out MCQ accuracy:", acc)
    assert len(curriculum["items"]) == 64
    assert acc["base"] < 0.45  # the untrained model: chance is 0.25
    assert acc["curriculum-tiny-stage1-all"] >= 0.6  # measured 0.75
    assert acc["curriculum-tiny-stage3-endocrinology"] >= 0.6  # after the whole curriculum (measured 0.73)


@pytest.mark.slow  # the three-stage curriculum (~4 min on 2 cores): make test-slow, run by CI
def test_each_stage_starts_from_the_previous_export(curriculum):
    metas, cfgs = curriculum["metas"], curriculum["cfgs"]
    assert metas[0]["parent_model"].endswith("models/tiny")
    assert metas[1]["parent_model"] == cfgs[0].output.export_path
    assert metas[2]["parent_model"] == cfgs[1].output.export_path
    assert [m["stage"] for m in metas] == ["sft:stage1-all", "sft:stage2-internal-medicine",
                                           "sft:stage3-endocrinology"]
    assert all(storage.is_complete(c.output.export_path) for c in cfgs)


@pytest.mark.slow  # the three-stage curriculum (~4 min on 2 cores): make test-slow, run by CI
def test_department_filters_narrow_what_was_trained(curriculum):
    rows, seen = curriculum["rows"], curriculum["seen"]
    depts = [{(rows[i]["department"], rows[i]["subdepartment"]) for i in s} for s in seen]
    assert len({d for d, _ in depts[0]}) >= 4  # stage 1: many departments
    assert {d for d, _ in depts[1]} == {"Internal Medicine"} and len(depts[1]) > 1
    assert depts[2] == {("Internal Medicine", "Endocrinology")}
    n_im = sum(r["department"] == "Internal Medicine" for r in rows.values())
    n_endo = sum(r["subdepartment"] == "Endocrinology" for r in rows.values())
    assert len(set(seen[0])) > len(set(seen[1])) > len(set(seen[2])) > 0
    prep = [m["prepare"] for m in curriculum["metas"]]
    assert prep[1]["rows_train"] == n_im and prep[1]["rows_filtered_out"] == len(rows) - n_im
    assert prep[2]["rows_train"] == n_endo


@pytest.mark.slow  # the three-stage curriculum (~4 min on 2 cores): make test-slow, run by CI
def test_stage1_holds_out_an_eval_split_and_reports_eval_loss(curriculum):
    meta = curriculum["metas"][0]
    prep = meta["prepare"]
    assert prep["rows_eval"] > 0 and prep["rows_train"] + prep["rows_eval"] == prep["rows_valid"]
    assert 0.05 < prep["rows_eval"] / prep["rows_valid"] < 0.2
    assert meta["eval_loss"] is not None and meta["eval_loss"] > 0
    # Held-out rows are never trained on.
    assert not set(curriculum["seen"][0]) & _eval_ids(curriculum["cfgs"][0])
    assert curriculum["metas"][1]["eval_loss"] is None  # stage 2 has no eval split configured


def _eval_ids(cfg):
    import pyarrow.parquet as pq

    fs, path = storage.get_filesystem(storage.join(cfg.run.storage_path, cfg.run.name, "prepared"))
    t = pq.read_table(path, filesystem=fs, columns=["id", "split"])
    return {i for i, s in zip(t.column("id").to_pylist(), t.column("split").to_pylist()) if s == "eval"}


@pytest.mark.slow  # the three-stage curriculum (~4 min on 2 cores): make test-slow, run by CI
def test_filter_selecting_nothing_names_the_filter(curriculum, tiny_model_s3):
    from finemed_ray.data.sft_prepare import RowSelection, prepare_sft

    cfg = curriculum["cfgs"][0]
    with pytest.raises(DataError, match=r"data\.department='Cardiac Surgery'.*selects no training rows"):
        prepare_sft(cfg.data.path, tiny_model_s3, "s3://finemed-test/curriculum/empty", 64,
                    selection=RowSelection(department="Cardiac Surgery"))


def test_stage_with_a_missing_parent_fails_before_training(tiny_model_s3, s3):
    from finemed_ray.errors import ConfigError

    recipe = load_config(RecipeConfig, ROOT / "configs/recipe_curriculum_tiny.yaml", [
        f"base_model={tiny_model_s3}", "export_root=s3://finemed-test/no-such-exports",
        "defaults.run.storage_path=s3://finemed-test/no-such-runs"])
    with pytest.raises(ConfigError, match="parent export s3://finemed-test/no-such-exports/stage2.*missing"):
        run_recipe(recipe, only=["stage3-endocrinology"])
