"""Same config + same data + same worker count => the same model, bit for bit.

The demo's stage 1 reached 0.812 in one run and 0.961 in another on row-identical synthesized data. The cause was
the prepare step: Ray Data (2.60) listed and read a multi-file input (synthesis writes SFT data as Parquet
partitioned by department) in completion order, so the prepared rows, and with them the run's data order, were a
different permutation of the input files in every run (measured: 6 files prepared 4 times, 4 orders). The rest of
the stack (seeded windowed shuffle, deterministic split, ZeRO-3 over gloo on CPU) was already bit-reproducible:
two runs on a single-file input gave identical losses and weights. ``write_prepared`` now keeps the input order.

Inputs here are 8 small Parquet files, as synthesis writes them; local storage (no S3) to keep it cheap."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from finemed_ray.config import load_config
from finemed_ray.toy.sample import sample_sft_rows
from finemed_ray.train.configs import SFTJobConfig

ROOT = Path(__file__).resolve().parents[1]
N_FILES = 8
ROWS_PER_FILE = 4


@pytest.fixture(scope="module")
def multi_file_data(tmp_path_factory) -> tuple[Path, list[str]]:
    """8 Parquet files of 4 conversations each; returns the prefix and the ids in input order (files sorted)."""
    rows = sample_sft_rows(n=N_FILES * ROWS_PER_FILE, seed=0, paraphrases="train", system_prompt=None)
    prefix = tmp_path_factory.mktemp("multi-file") / "sft"
    prefix.mkdir()
    for i in range(N_FILES):
        pq.write_table(pa.Table.from_pylist(rows[i * ROWS_PER_FILE:(i + 1) * ROWS_PER_FILE]),
                       prefix / f"part-{i:02d}.parquet")
    return prefix, [r["id"] for r in rows]


def test_prepare_keeps_the_input_order(tiny_model_dir, ray_cluster, multi_file_data, tmp_path):
    """Prepared rows = input files in sorted order, rows in file order (read back the way training reads them:
    order preserved). Before the fix they came out as a different permutation of the files each run."""
    from finemed_ray.data.sft_prepare import prepare_sft, read_prepared

    prefix, input_ids = multi_file_data
    summary = prepare_sft(f"{prefix}/", str(tiny_model_dir), str(tmp_path / "run"), max_length=256)
    ds = read_prepared(summary.prepared_uri, "train")
    ds.context.execution_options.preserve_order = True
    assert [r["id"] for r in ds.iter_rows()] == input_ids, "prepared rows out of input order"


def _weights_digest(export: Path) -> str:
    from safetensors.torch import load_file

    tensors = load_file(str(export / "model.safetensors"))
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.mark.slow
def test_two_identical_runs_train_the_same_model(tiny_model_dir, ray_cluster, multi_file_data, tmp_path):
    """Two 2-worker ZeRO-3 runs of one config on the same multi-file data: same rows per step, same loss at every
    step (exact floats), same exported weights (exact bytes)."""
    from finemed_ray import storage
    from finemed_ray.train.stages.sft import SFTJob

    prefix, input_ids = multi_file_data
    results = []
    for name in ("a", "b"):
        cfg = load_config(SFTJobConfig, ROOT / "configs/sft_tiny.yaml", [
            f"run.storage_path={tmp_path}/runs", f"run.name=repro-{name}", f"model.path={tiny_model_dir}",
            f"data.path={prefix}/", f"output.export_path={tmp_path}/export-{name}", "train.report_to=[]",
            "train.epochs=2", "train.per_device_batch_size=4", "train.save_steps=1000",
        ])
        job = SFTJob(cfg).setup()
        job.run()
        job.save()
        meta = storage.read_json(f"{tmp_path}/export-{name}/finemed_export.json")
        seen = storage.read_json(f"{tmp_path}/runs/repro-{name}/samples_seen.json")
        results.append({"order": seen["global"], "per_rank": seen["per_rank"],
                        "losses": [(h["step"], h["loss"]) for h in meta["loss_history"]],
                        "weights": _weights_digest(tmp_path / f"export-{name}")})
    a, b = results
    assert len(a["losses"]) == 8 and sorted(a["order"][:len(input_ids)]) == sorted(input_ids)
    assert a["order"] == b["order"] and a["per_rank"] == b["per_rank"], "the runs trained different rows per step"
    assert a["losses"] == b["losses"], (a["losses"], b["losses"])
    assert a["weights"] == b["weights"], "same config and data, different exported weights"


def test_every_reader_keeps_the_input_order_and_a_limit_keeps_the_same_rows(ray_cluster, multi_file_data):
    """read_input (used by prepare, the TTT index build and the synthesis seed reader): rows in input order, and
    ``limit`` keeps the first rows of the first files, not whichever files finished reading first."""
    from finemed_ray.data.sft_prepare import read_input

    prefix, input_ids = multi_file_data
    files, fmt, ds = read_input(f"{prefix}/")
    assert fmt == "parquet" and files == sorted(files)
    assert [r["id"] for r in ds.iter_rows()] == input_ids
    kept = [r["id"] for r in ds.limit(ROWS_PER_FILE + 1).iter_rows()]
    assert kept == input_ids[:ROWS_PER_FILE + 1]
    # Derived datasets share the read's setting (map_batches as the index build and synthesis apply it):
    mapped = ds.limit(6).map_batches(lambda b: b, batch_format="pyarrow")
    assert [r["id"] for r in mapped.iter_rows()] == input_ids[:6]


def test_vector_index_keeps_the_order_of_the_callers_dataset(ray_cluster, tmp_path):
    """build_vector_index takes the caller's Dataset (created with the global DataContext of its time): the index
    must hold its rows in input order all the same, and the caller's dataset is left unchanged. It used to set
    preserve_order on the *global* context, which never reached the dataset's own copy (completion order)."""
    import numpy as np
    import ray.data

    from finemed_ray.ttt.index import build_vector_index

    src = tmp_path / "vectors"
    src.mkdir()
    ids = []
    for i in range(N_FILES):
        vid = [f"f{i}-r{j}" for j in range(ROWS_PER_FILE)]
        vecs = np.random.default_rng(i).standard_normal((ROWS_PER_FILE, 4)).astype("float32")
        pq.write_table(pa.table({"vid": vid, "embedding": list(vecs)}), src / f"part-{i:02d}.parquet")
        ids += vid
    vectors = ray.data.read_parquet(str(src))
    assert not vectors.context.execution_options.preserve_order  # as a user's dataset comes: completion order
    build_vector_index(vectors, str(tmp_path / "index"), dim=4, id_column="vid")
    assert pq.read_table(tmp_path / "index" / "pool.parquet").column("id").to_pylist() == ids
    assert not vectors.context.execution_options.preserve_order  # the caller's dataset is not changed


def test_split_config_keeps_the_order_of_every_split_and_leaves_the_callers_dataset(ray_cluster, multi_file_data):
    """The trainer's split (``DeterministicSplitDataConfig``): each split is a contiguous run of the input, in input
    order, and the dataset handed in keeps its own execution options (it used to share the context object that
    the split then changed)."""
    import ray.data

    from finemed_ray.train.ray_shard import DeterministicSplitDataConfig

    prefix, ids = multi_file_data
    ds = ray.data.read_parquet(str(prefix))
    before = ds.context.execution_options
    assert not before.preserve_order
    out = DeterministicSplitDataConfig(splits={"train": 2}).configure({"train": ds}, 2, None, None)
    shards = out[0]["train"]
    got = [[row["id"] for row in it.iter_rows()] for it in shards.iterators]
    assert got == [ids[: len(ids) // 2], ids[len(ids) // 2: len(ids) // 2 * 2]]
    assert ds.context.execution_options is before and not ds.context.execution_options.preserve_order
