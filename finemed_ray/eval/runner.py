"""The evaluation job: benchmark items -> Ray Data batch inference -> extracted answers -> report.

Items become rows (``key``, ``messages``, benchmark, id, gold, options); the model answers through the same engine
interface the synthesis teachers and serving use (``finemed_ray.synth.teachers``: ``hf`` transformers, ``vllm``
through ``ray.data.llm``, or any OpenAI-compatible ``http`` endpoint). Answers are read with
:func:`finemed_ray.eval.extract.extract_answer` (from the ``## Summarization`` part of a reasoning reply), then by
the one option text the answer states (:func:`finemed_ray.eval.generative.match_option`); an unextractable
answer is wrong and counted, and so is every reply the token budget (``engine.max_tokens``) cut off.

``benchmarks[].few_shot`` puts ``k`` worked examples from a dev split before every question of that benchmark
(:func:`few_shot_examples`; drawn once, with a fixed seed, never one of the evaluated questions).

``scoring.method=loglik`` picks the option with the highest log-likelihood instead (small models that cannot follow
an answer format), on the transformers engine.

With ``ttt.enabled`` each Ray Data batch of questions is embedded, its neighbours are retrieved from the index
(``jobs/build_index.py``), one LoRA adapter per question is trained on them in one batched pass
(:mod:`finemed_ray.ttt.adapt`), and the questions are answered through their own adapters. The base weights are
never written (``ttt.verify_base`` hashes them around every batch). ``ttt.compare`` also runs the plain model,
so the report has both columns and the delta.

TTT runs on the transformers engine (:class:`EvalWorker`: adapters applied through hooks) or, with
``engine.backend=vllm``, on serving's path (:class:`VLLMTTTWorker`): the adapters are trained with torch on a
transformers copy of the base and the whole batch is answered in one vLLM call, each question through its own
``LoRARequest``; there the no-TTT column comes from the same engine, in the same batches.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from finemed_ray import storage
from finemed_ray.errors import DataError, FinemedError
from finemed_ray.eval.benchmarks import BenchmarkSet, MCQItem, load_benchmarks
from finemed_ray.eval.config import EvalJobConfig
from finemed_ray.eval.report import load_baselines

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ rows
def item_messages(item: MCQItem, cfg: dict, examples: Sequence[MCQItem] = ()) -> list[dict[str, str]]:
    """The chat messages for ``item``: system prompt, the few-shot ``examples`` as turns, then the question."""
    from finemed_ray.eval.prompting import build_messages

    scoring = cfg["scoring"]
    # Log-likelihood scores a fixed continuation: the examples answer in that same form.
    continuation = scoring["continuation"] if scoring["method"] == "loglik" else None
    return build_messages(item, mode=cfg["prompt"]["mode"], system_prompt=cfg["prompt"]["system_prompt"],
                          examples=examples, continuation=continuation)


def few_shot_examples(specs: Sequence[Any], sets: dict[str, BenchmarkSet]) -> dict[str, list[MCQItem]]:
    """benchmark -> its worked examples: ``few_shot.k`` items of the spec's dev split (``few_shot.split_path``),
    drawn with ``few_shot.seed``, none of them a question of the evaluated set. Benchmarks with k = 0 get []."""
    from finemed_ray.eval.benchmarks import load_benchmark
    from finemed_ray.eval.prompting import draw_examples

    out: dict[str, list[MCQItem]] = {}
    for spec in specs:
        shots = getattr(spec, "few_shot", None)
        if shots is None or shots.k == 0:
            out[spec.name] = []
            continue
        dev = load_benchmark(f"{spec.name}/dev", shots.split_path, kind=spec.kind)
        try:
            out[spec.name] = draw_examples(dev.items, shots.k, shots.seed, exclude=sets[spec.name].items)
        except DataError as exc:
            raise DataError(f"benchmark {spec.name!r}: {exc} ({shots.split_path})") from None
    return out


# Fields a benchmark row may carry that group its items for the report (MMLU-Pro `category`, MedMCQA
# `subject_name`, MMLU `subject`, MedQA `meta_info`, then the primary `department` of the project's own MCQ rows,
# e.g. the demo's held-out questions); the first one present wins.
CATEGORY_FIELDS = ("category", "subject_name", "subject", "meta_info", "department")


def item_category(item: MCQItem) -> str:
    """The item's category for the per-category report, or "" when its benchmark has none."""
    for key in CATEGORY_FIELDS:
        value = item.extra.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return ""


def item_rows(sets: dict[str, BenchmarkSet], cfg: dict,
              examples: dict[str, list[MCQItem]] | None = None) -> list[dict[str, Any]]:
    rows = []
    for name, bset in sets.items():
        shots = (examples or {}).get(name, [])
        for item in bset:
            rows.append({"key": f"{name}:{item.id}", "benchmark": name, "id": item.id, "gold": item.answer,
                         "question": item.question, "options": json.dumps(item.options, ensure_ascii=False),
                         "kind": item.kind, "messages": item_messages(item, cfg, shots),
                         "n_options": len(item.options), "category": item_category(item)})
    return rows


def _item_fields(row: dict) -> dict[str, Any]:
    """What every prediction carries besides the answer: option count (for the chance level) and category."""
    return {"n_options": row.get("n_options") or len(json.loads(row["options"])),
            "category": row.get("category") or None}


def _item(row: dict) -> MCQItem:
    return MCQItem(id=row["id"], question=row["question"], options=json.loads(row["options"]), answer=row["gold"],
                   benchmark=row["benchmark"], kind=row["kind"], extra={})


def cut_off(text: str | None, completion_tokens: int | None, max_tokens: int) -> bool | None:
    """Whether the token budget ended the reply (what vLLM and OpenAI report as finish_reason "length"): the
    engines record the tokens generated, not why generation stopped, so a reply that used the whole budget counts
    as cut off. None when nothing was generated (an error) or the count is unknown."""
    if text is None or completion_tokens is None:
        return None
    return int(completion_tokens) >= max_tokens


def _prediction(row: dict, text: str | None, error: str | None, ttt: bool, *, max_tokens: int,
                completion_tokens: int | None = None, **extra: Any) -> dict[str, Any]:
    from finemed_ray.eval.extract import extract_answer
    from finemed_ray.eval.generative import final_answer, match_option

    options = json.loads(row["options"])
    truncated = cut_off(text, completion_tokens, max_tokens)
    if text is None:
        pred, method = None, "error"
    else:
        # A reasoning reply ("## Thought ... ## Summarization ...") is read from its conclusion only: the Thought
        # may name ruled-out options. No conclusion = no answer. A conclusion that states one option's text in a
        # sentence ("Metformin is used to treat type 2 diabetes.": a model trained to answer in sentences) is read
        # by that text; free prose is not (there, an option's text is often mentioned without being chosen).
        answer, form = final_answer(text, cut_off=bool(truncated))
        if answer is None:
            pred, method = None, form
        else:
            got = extract_answer(answer, options)
            pred, method = got.letter, got.method
            if pred is None and form == "reasoning":
                pred = match_option(answer, list(options.items()))
                method = "stated_option_text" if pred else "none"
    return {"benchmark": row["benchmark"], "id": row["id"], "gold": row["gold"], "pred": pred,
            "raw": text if text is not None else f"<error: {error}>", "method": method, "ttt": ttt,
            "completion_tokens": completion_tokens, "cut_off": truncated, **_item_fields(row), **extra}


# ------------------------------------------------------------------------------------------------ workers
class EvalWorker:
    """Ray Data actor on the transformers engine: log-likelihood scoring and/or TTT (one adapter per question).
    TTT on vLLM: :class:`VLLMTTTWorker`."""

    def __init__(self, cfg: dict, ttt: bool):
        from finemed_ray.synth.teachers import make_teacher

        self.cfg = cfg
        self.ttt = ttt
        self.teacher = make_teacher(cfg["engine"])
        self.model, self.tokenizer = self.teacher.load()
        self.model.eval()
        if ttt:
            from finemed_ray.ttt.adapt import TTTConfig
            from finemed_ray.ttt.index import load_index_and_encoder

            self.adapt_cfg = TTTConfig(**cfg["ttt"]["adapt"])
            self.index, self.encoder = load_index_and_encoder(cfg["ttt"]["index"])

    def _digest(self) -> str | None:
        from finemed_ray.ttt.adapt import weights_digest

        return weights_digest(self.model) if self.cfg["ttt"]["verify_base"] else None

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        before = self._digest()
        if self.ttt and self.adapt_cfg.method == "full":
            preds, info = self._full_parameter(rows)
        else:
            lora, info = self._adapt(rows) if self.ttt else (None, [{} for _ in rows])
            preds = self._answer(rows, lora)
        if before is not None and self._digest() != before:
            raise FinemedError("TTT changed the base model's weights (ttt.verify_base): this is a bug")
        return _pred_table([{**p, **i} for p, i in zip(preds, info)])

    def _adapt(self, rows: list[dict]):
        from finemed_ray.ttt.adapt import adapt_lora

        t0 = time.time()
        neighbours, distances = self.index.neighbours([r["question"] for r in rows], self.adapt_cfg.k, self.encoder,
                                                      **self.adapt_cfg.retrieval_kwargs())
        t_retrieve = time.time() - t0
        res = adapt_lora(self.model, self.tokenizer, [r["key"] for r in rows], neighbours, self.adapt_cfg)
        info = [{"ttt_neighbours": [n.get("id") for n in nb], "ttt_distances": [round(float(d), 5) for d in dist],
                 "ttt_retrieve_s": round(t_retrieve / len(rows), 4), "ttt_train_s": round(res.seconds / len(rows), 4),
                 "ttt_batch": len(rows), "ttt_loss_first": res.losses[0] if res.losses else None,
                 "ttt_loss_last": res.losses[-1] if res.losses else None}
                for nb, dist in zip(neighbours, distances)]
        return res.lora, info

    def _answer(self, rows: list[dict], lora) -> list[dict]:
        return self._loglik(rows, lora) if self.cfg["scoring"]["method"] == "loglik" else self._generate(rows, lora)

    def _full_parameter(self, rows: list[dict]):
        """The paper's variant: one question at a time, all weights updated, then restored bit for bit."""
        from finemed_ray.ttt.adapt import full_update

        neighbours, distances = self.index.neighbours([r["question"] for r in rows], self.adapt_cfg.k, self.encoder,
                                                      **self.adapt_cfg.retrieval_kwargs())
        preds, info = [], []
        for row, nb, dist in zip(rows, neighbours, distances):
            with full_update(self.model, self.tokenizer, nb, self.adapt_cfg) as res:
                preds += self._answer([row], None)
            info.append({"ttt_neighbours": [n.get("id") for n in nb], "ttt_distances": [float(d) for d in dist],
                         "ttt_train_s": round(res.seconds, 4), "ttt_batch": 1,
                         "ttt_loss_first": res.losses[0] if res.losses else None,
                         "ttt_loss_last": res.losses[-1] if res.losses else None})
        return preds, info

    def _loglik(self, rows: list[dict], lora) -> list[dict]:
        import contextlib

        import torch

        from finemed_ray.eval.loglik import score_choices
        from finemed_ray.eval.prompting import option_continuations

        sc = self.cfg["scoring"]
        out = []
        attach = lora.attached() if lora is not None else contextlib.nullcontext()
        with attach:
            for q, row in enumerate(rows):
                if lora is not None:
                    lora.row_adapter = torch.tensor([q])
                conts = option_continuations(_item(row), style=sc["continuation"])
                messages = [m for m in row["messages"] if m["role"] != "system"]
                scores = score_choices(self.model, self.tokenizer, messages, [c for _, c in conts],
                                       system_prompt=self.cfg["prompt"]["system_prompt"], normalize=sc["normalize"])
                best = max(range(len(conts)), key=lambda j: (scores[j], -j))
                out.append({"benchmark": row["benchmark"], "id": row["id"], "gold": row["gold"],
                            "pred": conts[best][0], "raw": json.dumps(dict(zip([k for k, _ in conts], scores))),
                            "method": "loglik", "ttt": self.ttt, **_item_fields(row)})
        return out

    def _generate(self, rows: list[dict], lora) -> list[dict]:
        requests = [{"key": r["key"], "messages": r["messages"], "adapter": q} for q, r in enumerate(rows)]
        results = self.teacher.generate(requests, lora=lora)
        max_tokens = self.cfg["engine"]["max_tokens"]
        return [_prediction(r, res["text"], res["error"], self.ttt, max_tokens=max_tokens,
                            completion_tokens=res["completion_tokens"]) for r, res in zip(rows, results)]


PRED_KEYS = ("benchmark", "id", "gold", "pred", "raw", "method", "ttt")


def _pred_table(out: list[dict]) -> pa.Table:
    return pa.Table.from_pylist([{**{k: o[k] for k in PRED_KEYS}, "extra": json.dumps(
        {k: v for k, v in o.items() if k not in PRED_KEYS}, default=str)} for o in out])


class VLLMTTTWorker:
    """Ray Data actor for TTT on vLLM (``engine.backend=vllm``), the path serving takes.

    Per batch of questions: the neighbours are retrieved as in :class:`EvalWorker`, one LoRA adapter per question is
    trained on this actor's transformers copy of the base (serving's
    :func:`finemed_ray.serving.ttt_service.train_adapter_payloads`, same keys and seeds as the transformers path),
    and the whole batch is answered in one call to serving's :class:`finemed_ray.serving.engines.VLLMEngine`, each
    question through its own ``LoRARequest`` (a peft directory on local disk; ``max_loras`` = batch + 1, so one LoRA
    slot stays free: the vLLM CPU bug in ENVIRONMENT.md). With ``plain`` the same call also answers every question
    without an adapter: the no-TTT column, from the same engine and the same batches.

    ``ttt.verify_base``: the training copy is hashed around every batch, and (greedy decoding) the batch is also
    answered without adapters before training and after the TTT call; those answers and the plain answers given
    beside the adapters must be identical, or the batch fails. On a GPU the training copy sits on the engine's GPU:
    vLLM gets ``gpu_memory_utilization`` 0.5 unless ``engine.extra.engine_kwargs`` sets it."""

    def __init__(self, cfg: dict, device: str, plain: bool):
        from finemed_ray.models.loading import resolve_model_path
        from finemed_ray.serving.engines import VLLMEngine
        from finemed_ray.serving.ttt_service import load_trainer
        from finemed_ray.synth.teachers import TeacherSpec, _LoopThread
        from finemed_ray.ttt.adapt import TTTConfig
        from finemed_ray.ttt.index import load_index_and_encoder

        self.cfg = cfg
        self.plain = plain
        self.spec = TeacherSpec.model_validate(cfg["engine"])
        opts = self.spec.parsed_extra()
        self.sampling = dict(opts.sampling_params)
        self.adapt_cfg = TTTConfig(**cfg["ttt"]["adapt"])
        engine_kwargs = dict(opts.engine_kwargs)
        dtype = engine_kwargs.pop("dtype", "auto")
        max_model_len = engine_kwargs.pop("max_model_len", 2048)
        local = resolve_model_path(self.spec.model)  # s3:// -> one local copy for both the trainer and vLLM
        # The adapters train on a copy in the engine's dtype (float32 for "auto", as serving's TTT trainer).
        self.model, self.tokenizer = load_trainer(local, dtype if dtype in ("float32", "bfloat16", "float16")
                                                  else "float32")
        if device == "gpu":
            import torch

            if torch.cuda.is_available():
                self.model.to("cuda")
            engine_kwargs.setdefault("gpu_memory_utilization", 0.5)
        else:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{opts.cpu_kvcache_gib:g}")
        self.index, self.encoder = load_index_and_encoder(cfg["ttt"]["index"])
        self.loop = _LoopThread()  # AsyncLLM lives on one event loop; this synchronous actor runs it on a thread

        async def start() -> VLLMEngine:
            return VLLMEngine(local, dtype=dtype, max_model_len=max_model_len, device=device,
                              enable_lora=True, adapters_in_flight=self.adapt_cfg.batch_questions,
                              max_lora_rank=self.adapt_cfg.r, engine_kwargs=engine_kwargs)

        self.engine = self.loop.run(start())
        self.batches = 0

    def _requests(self, rows: list[dict], adapters: list[dict | None], tag: str) -> list:
        from finemed_ray.serving.engines import GenRequest

        s = self.sampling
        return [GenRequest(request_id=f"{tag}-{self.batches}-{i}-{r['key']}", messages=r["messages"],
                           max_tokens=self.spec.max_tokens, temperature=self.spec.temperature,
                           top_p=s.get("top_p", 1.0), seed=s.get("seed"), stop=list(s.get("stop") or []),
                           adapter=a) for i, (r, a) in enumerate(zip(rows, adapters))]

    def _generate(self, reqs: list) -> list:
        """One engine call for all of ``reqs``; a request that fails is an error row, not a failed batch."""
        return self.loop.run(self.engine.generate_batch(reqs, return_exceptions=True))

    def _adapter_id(self, row: dict, neighbours: list[dict]) -> str:
        import hashlib

        blob = json.dumps({"key": row["key"], "ids": [n.get("id") for n in neighbours],
                           "cfg": self.adapt_cfg.model_dump(mode="json")}, sort_keys=True, default=str)
        return "ttt-" + hashlib.sha256(blob.encode()).hexdigest()[:24]

    def __call__(self, batch: pa.Table) -> pa.Table:
        from finemed_ray.serving.ttt_service import train_adapter_payloads
        from finemed_ray.ttt.adapt import weights_digest

        rows = batch.to_pylist()
        n = len(rows)
        self.batches += 1
        verify = self.cfg["ttt"]["verify_base"]
        digest = weights_digest(self.model) if verify else None
        compare_answers = verify and self.spec.temperature == 0  # sampled answers differ run to run anyway
        t0 = time.time()
        neighbours, distances = self.index.neighbours([r["question"] for r in rows], self.adapt_cfg.k, self.encoder,
                                                      **self.adapt_cfg.retrieval_kwargs())
        t_retrieve = time.time() - t0
        before = self._generate(self._requests(rows, [None] * n, "base-before")) if compare_answers else None
        t1 = time.time()
        payloads, res = train_adapter_payloads(
            self.model, self.tokenizer, [r["key"] for r in rows], neighbours, self.adapt_cfg,
            [self._adapter_id(r, nb) for r, nb in zip(rows, neighbours)], base_model_name=self.spec.model)
        t_train = time.time() - t1
        with_plain = self.plain or compare_answers
        t2 = time.time()
        results = self._generate(self._requests(rows, payloads, "ttt")
                                 + (self._requests(rows, [None] * n, "plain") if with_plain else []))
        t_generate = time.time() - t2
        ttt_res, plain_res = results[:n], results[n:]
        after = self._generate(self._requests(rows, [None] * n, "base-after")) if compare_answers else None
        if digest is not None and weights_digest(self.model) != digest:
            raise FinemedError("TTT changed the weights of the training copy (ttt.verify_base): this is a bug")
        if compare_answers:
            texts = [[_text(x) for x in got] for got in (before, plain_res, after)]
            bad = [rows[i]["key"] for i in range(n) if len({t[i] for t in texts}) != 1]
            if bad:
                raise FinemedError(f"vLLM answered {bad} differently without an adapter before TTT, beside the "
                                   f"adapters, and after (ttt.verify_base): the adapters leaked into plain requests")

        max_tokens = self.spec.max_tokens
        out = []
        for q, (row, r) in enumerate(zip(rows, ttt_res)):
            info = {"ttt_neighbours": [x.get("id") for x in neighbours[q]],
                    "ttt_distances": [round(float(d), 5) for d in distances[q]],
                    "ttt_retrieve_s": round(t_retrieve / n, 4), "ttt_train_s": round(t_train / n, 4),
                    "ttt_generate_s": round(t_generate / n, 4), "ttt_batch": n,
                    "ttt_loss_first": res.losses[0] if res.losses else None,
                    "ttt_loss_last": res.losses[-1] if res.losses else None,
                    "ttt_engine": "vllm", "ttt_adapter": payloads[q]["id"]}
            out.append(_result_prediction(row, r, True, max_tokens, info))
        if self.plain:
            for q, (row, r) in enumerate(zip(rows, plain_res)):
                info = ({"vllm_base_before": _text(before[q]), "vllm_base_after": _text(after[q])}
                        if before is not None else {})
                out.append(_result_prediction(row, r, False, max_tokens, info))
        return _pred_table(out)

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
            self.loop.close(wait=False)


def _text(result: Any) -> str | None:
    return None if isinstance(result, BaseException) else result.text


def _result_prediction(row: dict, result: Any, ttt: bool, max_tokens: int, info: dict) -> dict:
    """A :class:`finemed_ray.serving.engines.GenResult` (or the exception of its request) -> a prediction row."""
    if isinstance(result, BaseException):
        return {**_prediction(row, None, f"vllm: {type(result).__name__}: {result}", ttt, max_tokens=max_tokens),
                **info}
    return {**_prediction(row, result.text, None, ttt, max_tokens=max_tokens,
                          completion_tokens=result.completion_tokens), **info}


# ------------------------------------------------------------------------------------------------ the job
class Evaluation:
    def __init__(self, cfg: EvalJobConfig):
        self.cfg = cfg
        self.cfg_dict = cfg.model_dump(mode="json")

    def load(self) -> dict[str, BenchmarkSet]:
        return load_benchmarks(self.cfg.benchmarks)

    def predict(self, rows: list[dict], ttt: bool, plain: bool = False) -> list[dict]:
        """Predictions for ``rows`` with or without TTT; on TTT with vLLM, ``plain`` adds the no-TTT ones (same
        engine, same batches)."""
        import ray.data

        ds = ray.data.from_items(rows)
        engine = self.cfg.engine
        if ttt and engine.backend == "vllm":
            out = self._vllm_ttt(ds, plain).take_all()
            return [{**{k: r[k] for k in PRED_KEYS}, **json.loads(r["extra"])} for r in out]
        if not ttt and self.cfg.scoring.method == "generate":
            from finemed_ray.synth.teachers import make_teacher

            teacher = make_teacher(engine)
            answered = teacher.map_dataset(ds).take_all()
            return [_prediction(r, r["text"], r["error"], False, max_tokens=engine.max_tokens,
                                completion_tokens=r.get("completion_tokens")) for r in answered]
        num_cpus = engine.parsed_extra().num_cpus  # an hf engine here: loglik and TTT on hf
        out = ds.map_batches(
            EvalWorker, fn_constructor_kwargs={"cfg": self.cfg_dict, "ttt": ttt}, batch_format="pyarrow",
            batch_size=self.cfg.ttt.adapt.batch_questions if ttt else engine.batch_size,
            compute=ray.data.ActorPoolStrategy(size=engine.concurrency), num_cpus=num_cpus).take_all()
        preds = []
        for r in out:
            extra = json.loads(r.pop("extra"))
            preds.append({**{k: r[k] for k in PRED_KEYS}, **extra})
        return preds

    def _vllm_ttt(self, ds: Any, plain: bool) -> Any:
        import ray.data

        from finemed_ray.synth.teachers import VllmTeacher

        spec = self.cfg.engine
        opts = spec.parsed_extra()
        device = VllmTeacher(spec).resolve_device()
        if device == "gpu":
            kw = opts.engine_kwargs
            resources: dict[str, Any] = {"num_gpus": int(kw.get("tensor_parallel_size", 1))
                                         * int(kw.get("pipeline_parallel_size", 1))}
        else:
            resources = {"num_cpus": opts.engine_num_cpus}
        if opts.runtime_env:
            resources["runtime_env"] = opts.runtime_env
        return ds.map_batches(
            VLLMTTTWorker, fn_constructor_kwargs={"cfg": self.cfg_dict, "device": device, "plain": plain},
            batch_format="pyarrow", batch_size=self.cfg.ttt.adapt.batch_questions,
            compute=ray.data.ActorPoolStrategy(size=spec.concurrency), **resources)

    def run(self) -> dict[str, Any]:
        from finemed_ray.eval.report import write_report

        t0 = time.time()
        # Read the published figures first: a bad file must fail before hours of inference, not after.
        published = load_baselines(self.cfg.baselines) if self.cfg.baselines else None
        sets = self.load()
        examples = few_shot_examples(self.cfg.benchmarks, sets)
        rows = item_rows(sets, self.cfg_dict, examples)
        timings: dict[str, float] = {}
        predictions: list[dict] = []
        settings = ([False] if not self.cfg.ttt.enabled else ([False, True] if self.cfg.ttt.compare else [True]))
        if self.cfg.ttt.enabled and self.cfg.engine.backend == "vllm":
            # one engine load: the no-TTT answers come from the TTT workers' engine, in the same batches
            t = time.time()
            predictions += self.predict(rows, True, plain=self.cfg.ttt.compare)
            timings["ttt_and_no_ttt" if self.cfg.ttt.compare else "ttt"] = round(time.time() - t, 2)
            settings = []
        for ttt in settings:
            t = time.time()
            predictions += self.predict(rows, ttt)
            timings["ttt" if ttt else "no_ttt"] = round(time.time() - t, 2)
        engine = self.cfg.engine
        meta = {
            "name": self.cfg.name,
            "engine": {"backend": engine.backend, "model": engine.model, "max_tokens": engine.max_tokens,
                       "temperature": engine.temperature, "batch_size": engine.batch_size},
            "scoring": self.cfg_dict["scoring"], "prompt": self.cfg_dict["prompt"],
            "ttt": self.cfg_dict["ttt"] if self.cfg.ttt.enabled else None, "seconds": timings,
            "skipped": {name: [{"line": l, "id": i, "reason": r} for l, i, r in s.skipped] for name, s in sets.items()},
            "items": {name: len(s) for name, s in sets.items()},
            # valid rows in each file before `limit` (lm-eval's n-samples "original") and the dataset read
            "rows": {name: s.total_rows - len(s.skipped) for name, s in sets.items()},
            "paths": {b.name: b.path for b in self.cfg.benchmarks},
            "few_shot": {b.name: {**b.few_shot.model_dump(), "example_ids": [e.id for e in examples[b.name]]}
                         for b in self.cfg.benchmarks},
            "date": t0, "git_hash": git_hash(), "total_seconds": round(time.time() - t0, 2),
        }
        baseline = self.cfg.output.baseline
        if baseline and not baseline.endswith(".json"):
            baseline = storage.join(baseline, "report.json")
        report = write_report(self.cfg.output.path, predictions, baseline=baseline, meta=meta, published=published)
        return report


def git_hash() -> str | None:
    """The short commit of the code that ran (as lm-eval records it), or None outside a git checkout."""
    import subprocess
    from pathlib import Path

    try:
        out = subprocess.run(["git", "describe", "--always"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None
