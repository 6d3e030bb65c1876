"""Shared pieces of the benchmarks in ``bench/`` (not a benchmark itself).

* :func:`setup_env` / :func:`host_info`: the offline, quiet environment and the machine description every result
  JSON carries, including :func:`provenance` (the command, git commit, machine and date of the run), which
  ``bench/results_table.py`` prints next to each figure in ``bench/RESULTS.md``.
* :class:`Monitor`: a background sampler of the machine while a benchmark runs. It records the load average at
  start and end, the CPU seconds used by *our* process tree (this driver and its descendants: the local Ray
  cluster, its workers) versus everything else on the machine (other people's jobs), and, optionally, the memory
  of our Ray Train worker processes (``ray::RayTrainWorker...``; other Ray clusters on the machine are ignored
  because only descendants of this driver count).
* :func:`sft_config` / :func:`run_sft`: one real ``SFTJob`` (Ray Data prepare, Ray Train, TRL, DeepSpeed) on
  the embedded S3, returning its export metadata and the per-step wall times read back from its TensorBoard log.
* :func:`synthetic_conversations`: SFT rows with a log-normal length distribution, built only from the
  package's own medical text (for benchmarks that must not depend on files outside the repository).
"""

from __future__ import annotations

import glob
import math
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

ENV_DEFAULTS = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "RAY_AUTH_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_USAGE_STATS_ENABLED": "0",
    "DS_ACCELERATOR": "cpu",
}


def setup_env() -> None:
    for k, v in ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)


def scratch_dir(prefix: str) -> str:
    """A fresh temporary directory removed when the process exits (bench models are 0.4-1.6 GB: leftovers in
    /tmp fill the disk after a few runs)."""
    import atexit
    import shutil

    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, True)
    return path


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0).replace(" ", "_") if torch.cuda.is_available() else "cpu"


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def provenance(device: str | None = None, cpu_model: str | None = None) -> dict[str, Any]:
    """Where a result comes from: ``command`` (as typed, interpreter shortened to its name), ``commit`` (HEAD of
    this checkout; ``worktree_dirty``: tracked files outside bench/results/ differed from it, so the code measured
    is HEAD plus local changes), ``machine`` (accelerator, CPU model, core count) and ``date`` (UTC, when the run
    recorded it). A field that cannot be found is None, never guessed."""
    argv = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    if argv:
        argv[0] = os.path.basename(argv[0])
    head = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)bench/results")
    cpus = os.cpu_count()
    machine = ", ".join(str(x) for x in (device, cpu_model, f"{cpus} CPUs" if cpus else None) if x)
    return {
        "command": shlex.join(argv) if argv else None,
        "commit": head.strip() if head else None,
        "worktree_dirty": bool(status.strip()) if status is not None else None,
        "machine": machine or None,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def host_info() -> dict[str, Any]:
    import ray
    import torch
    import transformers
    import trl

    try:
        import deepspeed

        ds = deepspeed.__version__
    except Exception:  # pragma: no cover - deepspeed is a dependency, but keep the JSON writable without it
        ds = None
    cpu_model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    device = device_name()
    return {
        "provenance": provenance(device, cpu_model),
        "device": device,
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads_driver": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "deepspeed": ds,
        "ray": ray.__version__,
        # Inherited by the local Ray cluster's workers (allocator and threading knobs change memory and speed).
        "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(("MALLOC_", "OMP_", "MKL_"))},
    }


# ------------------------------------------------------------------------------------------------ monitor
WORKER_TITLE = "ray::RayTrainWorker"
ENV_KEYS_OF_INTEREST = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_",
                        "MALLOC_TRIM_THRESHOLD_")
_STATUS_KEYS = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem")


def _proc_status_kib(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM (the kernel's own peak RSS of the process) / RssAnon / RssFile / RssShmem, in KiB."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                key = line.split(":", 1)[0]
                if key in _STATUS_KEYS:
                    out[key] = int(line.split()[1])
    except OSError:
        pass
    return out


def _proc_env(pid: int, keys: tuple[str, ...]) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return {}
    env = dict(kv.decode(errors="replace").split("=", 1) for kv in raw if b"=" in kv)
    return {k: env[k] for k in keys if k in env}


class Monitor:
    """Samples the machine every ``interval`` seconds in a daemon thread, from ``start()`` to ``stop()``.

    CPU accounting: each sample reads every process's cumulative CPU time; a process is *ours* when this driver
    is among its ancestors. ``foreign_cpu_seconds`` is the CPU time other processes used between start and stop
    (processes that start and end between two samples are missed), and ``foreign_cpu_share`` divides it by the
    machine's capacity over the interval (wall x cores). ``system_busy_cpu_seconds`` comes from /proc/stat and
    includes everything.

    ``track_workers=True`` also records, per Ray Train worker process of ours, the peak of VmRSS seen in samples,
    the kernel's VmHWM (true peak RSS, no sampling gap), the RssAnon/RssShmem split at that peak and a trace of
    (wall time, VmRSS KiB). Fork children of a worker (same title, parent is a worker) are not counted."""

    def __init__(self, interval: float = 1.0, track_workers: bool = False):
        self.interval = interval
        self.track_workers = track_workers
        self.root = os.getpid()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="bench-monitor")
        self._cpu_first: dict[tuple[int, float], float] = {}
        self._cpu_last: dict[tuple[int, float], float] = {}
        self._ours: set[tuple[int, float]] = set()
        self.workers: dict[int, dict[str, Any]] = {}
        self.load_samples: list[float] = []
        # (time, own cpu s, foreign cpu s, load1, own cpu s without this driver process itself, CPU s of the
        # sampling thread so far)
        self.timeline: list[tuple[float, float, float, float, float, float]] = []
        self.sampler_cpu = 0.0
        self.samples = 0

    # -- sampling
    def _sample(self) -> None:
        import psutil

        now = time.time()  # one timestamp per pass, shared by every process sampled in it

        procs = {}
        for p in psutil.process_iter(["pid", "ppid", "cpu_times", "create_time"]):
            info = p.info
            if info["cpu_times"] is None or info["create_time"] is None:
                continue
            procs[info["pid"]] = info
        parent = {pid: info["ppid"] for pid, info in procs.items()}

        def is_ours(pid: int) -> bool:
            seen = 0
            while pid and seen < 64:
                if pid == self.root:
                    return True
                pid = parent.get(pid, 0)
                seen += 1
            return False

        for pid, info in procs.items():
            key = (pid, info["create_time"])
            cpu = info["cpu_times"].user + info["cpu_times"].system
            if key not in self._cpu_first:
                # A process already running at the first sample counts from then; one born later from zero.
                self._cpu_first[key] = cpu if self.samples == 0 else 0.0
            self._cpu_last[key] = cpu
            if key not in self._ours and is_ours(pid):
                self._ours.add(key)
        if self.track_workers:
            for pid in procs:
                if not is_ours(pid):
                    continue
                try:
                    cmd = " ".join(psutil.Process(pid).cmdline())
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                if not cmd.startswith(WORKER_TITLE):
                    continue
                try:  # a worker's short-lived fork children (before exec) carry its title too: skip them
                    if " ".join(psutil.Process(parent.get(pid, 0)).cmdline()).startswith(WORKER_TITLE):
                        continue
                except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
                    pass
                st = _proc_status_kib(pid)
                if not st:
                    continue
                w = self.workers.setdefault(pid, {"pid": pid, "peak_rss_sampled_kib": 0, "samples": 0,
                                                  "env": _proc_env(pid, ENV_KEYS_OF_INTEREST)})
                w["samples"] += 1
                w["title_last"] = cmd[:80]
                w["vm_hwm_kib"] = max(w.get("vm_hwm_kib", 0), st.get("VmHWM", 0))
                if st.get("VmRSS", 0) >= w["peak_rss_sampled_kib"]:
                    w["peak_rss_sampled_kib"] = st.get("VmRSS", 0)
                    w["at_peak"] = {k: st.get(k) for k in ("RssAnon", "RssFile", "RssShmem")}
                ct = procs[pid]["cpu_times"]
                # (wall time, VmRSS KiB, CPU seconds of the whole process: all its threads)
                w.setdefault("trace", []).append((now, st.get("VmRSS", 0), ct.user + ct.system))
        own = foreign = root = 0.0
        for key, last in self._cpu_last.items():
            delta = max(0.0, last - self._cpu_first.get(key, 0.0))
            if key in self._ours:
                own += delta
                if key[0] == self.root:
                    root = delta
            else:
                foreign += delta
        load1 = os.getloadavg()[0]
        self.load_samples.append(load1)
        # This sampler's own CPU (it runs in the driver, whose CPU counts as ours): callers subtract it.
        if threading.current_thread() is self._thread:
            self.sampler_cpu = time.thread_time()
        self.timeline.append((now, own, foreign, load1, own - root, self.sampler_cpu))
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._sample()
            except Exception:  # a process vanishing mid-read must not kill the monitor
                pass
            self._stop.wait(self.interval)

    def window(self, t0: float, t1: float) -> dict[str, Any]:
        """Foreign CPU share and load between two wall times (widened to the enclosing samples)."""
        tl = self.timeline
        if len(tl) < 2:
            return {}
        before = [s for s in tl if s[0] <= t0] or tl[:1]
        after = [s for s in tl if s[0] >= t1] or tl[-1:]
        a, b = before[-1], after[0]
        span = max(b[0] - a[0], 1e-9)
        cores = os.cpu_count() or 1
        inside = [s[3] for s in tl if a[0] <= s[0] <= b[0]]
        return {
            "window_seconds": round(span, 1),
            "window": [a[0], b[0]],
            "own_cpu_seconds_excl_driver": round(b[4] - a[4], 3),
            "foreign_cpu_share": round((b[2] - a[2]) / (span * cores), 3),
            "own_cpu_share": round((b[1] - a[1]) / (span * cores), 3),
            "load1_max": round(max(inside), 2) if inside else None,
        }

    @staticmethod
    def _busy() -> float:
        import psutil

        t = psutil.cpu_times()
        return t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0) + getattr(t, "steal", 0)

    def start(self) -> "Monitor":
        self.t_start = time.time()
        self.load_start = os.getloadavg()
        self.busy_start = self._busy()
        self._sample()
        self._thread.start()
        return self

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join(timeout=30)
        try:
            self._sample()
        except Exception:
            pass
        wall = time.time() - self.t_start
        cores = os.cpu_count() or 1
        busy = self._busy() - self.busy_start
        ours = foreign = 0.0
        for key, last in self._cpu_last.items():
            delta = max(0.0, last - self._cpu_first.get(key, 0.0))
            if key in self._ours:
                ours += delta
            else:
                foreign += delta
        load_end = os.getloadavg()
        share = foreign / (wall * cores) if wall > 0 else 0.0
        return {
            "wall_seconds": round(wall, 1),
            "cpu_count": cores,
            "loadavg_start": [round(x, 2) for x in self.load_start],
            "loadavg_end": [round(x, 2) for x in load_end],
            "load1_max_during": round(max(self.load_samples or [0.0]), 2),
            "own_cpu_seconds": round(ours, 1),
            "foreign_cpu_seconds": round(foreign, 1),
            "foreign_cpu_share": round(share, 3),
            "system_busy_cpu_seconds": round(busy, 1),
            **load_verdict(share, self.load_start[0], load_end[0], cores),
        }


HIGH_FOREIGN_SHARE = 0.2


def load_verdict(foreign_share: float, load1_start: float, load1_end: float, cores: int) -> dict[str, Any]:
    """``high_load`` when other processes used more than 20% of the machine's CPU capacity while we measured.

    The load average is recorded but not the criterion: it lags by minutes (a burst that just ended still shows)
    and counts our own processes (2 workers + Ray + the driver make 3-5 on their own)."""
    high = foreign_share > HIGH_FOREIGN_SHARE
    detail = ("other processes used %.0f%% of the machine's CPU capacity during the measurement; load average "
              "(1 min) %.2f at start, %.2f at end, on %d cores" % (100 * foreign_share, load1_start, load1_end, cores))
    return {
        "high_load": high,
        "high_load_rule": "foreign_cpu_share > %.2f" % HIGH_FOREIGN_SHARE,
        "note": ("HIGH LOAD: " + detail + "; wall-clock timings are slowed and noisier than on an idle machine")
        if high else ("load from other processes was low: " + detail),
    }


# ------------------------------------------------------------------------------------------------- SFT jobs
def sft_config(name: str, overrides: list[str], rows_uri: str, workers: int = 2, bucket: str = "bench"):
    """A validated ``SFTJobConfig`` from configs/sft_tiny.yaml for a run named ``name`` on the embedded S3."""
    import torch

    from finemed_ray.config import load_config
    from finemed_ray.train.configs import SFTJobConfig

    gpu = torch.cuda.is_available()
    return load_config(
        SFTJobConfig,
        ROOT / "configs/sft_tiny.yaml",
        [
            f"model.path=s3://{bucket}/models/tiny",
            f"data.path={rows_uri}",
            f"run.storage_path=s3://{bucket}/runs",
            f"run.name={name}",
            f"output.export_path=s3://{bucket}/exports/{name}",
            f"scaling.num_workers={workers}",
            f"scaling.use_gpu={str(gpu).lower()}",
            f"ray.local_num_cpus={max(4, workers + 2)}",
            "train.save_steps=100000",
            "train.logging_steps=1",
            *overrides,
        ],
    )


def tensorboard_step_times(tb_uri: str) -> dict[int, float]:
    """{global step: wall time of its first TensorBoard event} from rank 0's uploaded log.

    With ``logging_steps=1`` the HF TensorBoard callback writes the step's scalars in ``on_log``, right after
    the optimizer step (and after the loss ``.item()`` that synchronises it), so consecutive differences are
    the wall time of one whole optimizer step as the trainer runs it: data fetch + collation + forward +
    backward + gradient communication + optimizer + callbacks + logging."""
    from finemed_ray import storage
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    times: dict[int, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-tb-") as tmp:
        storage.download_dir(tb_uri, tmp)
        for path in sorted(glob.glob(os.path.join(tmp, "**", "events.out.tfevents*"), recursive=True)):
            for ev in EventFileLoader(path).Load():
                if not ev.HasField("summary") or ev.step <= 0:
                    continue
                tags = [v.tag for v in ev.summary.value]
                if not any(t.startswith("train/") for t in tags):
                    continue
                times[ev.step] = min(times.get(ev.step, ev.wall_time), ev.wall_time)
    return times


def step_durations(times: dict[int, float] | list[float]) -> list[float]:
    """Durations of steps 2..S from end-of-step timestamps (step 1 has no start mark)."""
    if isinstance(times, dict):
        steps = sorted(times)
        if steps != list(range(steps[0], steps[0] + len(steps))):
            raise ValueError(f"TensorBoard log misses steps: {steps}")
        marks = [times[s] for s in steps]
    else:
        marks = list(times)
    return [b - a for a, b in zip(marks, marks[1:])]


def steps_done(marks: list[float], t: float) -> float:
    """Optimizer steps completed at wall time ``t`` (fractional, linear between end-of-step marks)."""
    import bisect

    i = bisect.bisect_right(marks, t)  # steps fully done
    if i == 0 or i == len(marks) or marks[i] <= marks[i - 1]:
        return float(i)
    return i + (t - marks[i - 1]) / (marks[i] - marks[i - 1])  # plus the part of the step under way


def worker_cpu_per_step(monitor: "Monitor", marks: list[float], t0: float, t1: float) -> dict[str, Any] | None:
    """CPU seconds the Ray Train workers (summed) spent per optimizer step between wall times t0 and t1, from the
    monitor's per-worker (time, rss, cpu) samples; steps are interpolated between the end-of-step marks."""
    per_time: dict[float, float] = {}
    for w in monitor.workers.values():
        for t, _, cpu in w.get("trace", []):
            if t0 <= t <= t1:
                per_time.setdefault(t, 0.0)
    times = sorted(per_time)
    if len(times) < 2:
        return None
    ta, tb = times[0], times[-1]
    cpu = 0.0
    for w in monitor.workers.values():
        tr = {t: c for t, _, c in w.get("trace", [])}
        if ta in tr and tb in tr:
            cpu += tr[tb] - tr[ta]
    steps = steps_done(marks, tb) - steps_done(marks, ta)
    if steps <= 0:
        return None
    return {"cpu_ms_per_step": round(1000 * cpu / steps, 2), "steps": round(steps, 2), "seconds": round(tb - ta, 2)}


def summarize_durations(durations: list[float], skip: int) -> dict[str, Any]:
    """Median/mean/p10/p90 of step durations, skipping the first ``skip`` (warm-up: allocator, first gathers)."""
    d = durations[skip:] if len(durations) > skip + 2 else durations
    q = statistics.quantiles(d, n=10) if len(d) >= 2 else [d[0]] * 9
    return {
        "steps_timed": len(d),
        "skipped_first": len(durations) - len(d),
        "median_ms": round(1000 * statistics.median(d), 2),
        "mean_ms": round(1000 * statistics.fmean(d), 2),
        "p10_ms": round(1000 * q[0], 2),
        "p90_ms": round(1000 * q[-1], 2),
    }


def run_sft(cfg) -> dict[str, Any]:
    """Run one ``SFTJob`` to the end; returns its summary, export metadata, wall time and TensorBoard step times."""
    from finemed_ray import storage
    from finemed_ray.train.stages.sft import SFTJob

    t0 = time.time()
    job = SFTJob(cfg).setup()
    job.run()
    summary = job.save()
    wall = time.time() - t0
    meta = storage.read_json(storage.join(cfg.output.export_path, "finemed_export.json"))
    tb = None
    if "tensorboard" in cfg.train.report_to:
        tb = tensorboard_step_times(storage.join(cfg.run.storage_path, cfg.run.name, "tensorboard"))
    seen = storage.read_json(storage.join(cfg.run.storage_path, cfg.run.name, "samples_seen.json"))
    return {"summary": summary, "meta": meta, "wall_seconds": wall, "tb_times": tb, "samples_seen": seen}


def read_prepared_rows(prepared_uri: str) -> dict[str, dict[str, list[int]]]:
    """{id: {"input_ids", "labels"}} of the good training rows of a prepared dataset (driver-side, for replays)."""
    import pyarrow.dataset as pads

    from finemed_ray import storage

    fs, path = storage.get_filesystem(prepared_uri)
    table = pads.dataset(path, filesystem=fs, format="parquet").to_table(
        columns=["id", "input_ids", "labels", "split", "error"]
    )
    out = {}
    for row in table.to_pylist():
        if row["error"] is None and row["split"] == "train":
            out[row["id"]] = {"input_ids": row["input_ids"], "labels": row["labels"]}
    return out


def rank_batches(seen_per_rank: list[list[str]], batch: int, rows_per_worker: int) -> list[list[list[str]]]:
    """[global step][rank] -> the ids that rank trained on in that step (epochs restart the batching)."""
    steps: list[list[list[str]]] = []
    for r, ids in enumerate(seen_per_rank):
        k = 0
        for start in range(0, len(ids), rows_per_worker):
            epoch_ids = ids[start:start + rows_per_worker]
            for b in range(0, len(epoch_ids), batch):
                if len(steps) <= k:
                    steps.append([[] for _ in seen_per_rank])
                steps[k][r] = epoch_ids[b:b + batch]
                k += 1
    return steps


# ------------------------------------------------------------------------------------------ synthetic data
def synthetic_conversations(n: int, seed: int = 0, median_words: float = 120.0, sigma: float = 0.9,
                            max_words: int = 1500) -> list[dict[str, Any]]:
    """``n`` SFT rows whose assistant answers have log-normally distributed lengths (median ``median_words``).

    Text is the package's own medical sentences (the tiny tokenizer's corpus), so no external files are read."""
    from finemed_ray.toy.sample import _GENERAL_MEDICAL_TEXT, sample_sft_rows

    sentences = [s for s in _GENERAL_MEDICAL_TEXT.splitlines() if s.strip()]
    base = sample_sft_rows(n=n, seed=seed)
    rng = random.Random(seed)
    rows = []
    for i, row in enumerate(base):
        words = min(max_words, max(3, int(rng.lognormvariate(math.log(median_words), sigma))))
        text: list[str] = []
        while sum(len(s.split()) for s in text) < words:
            text.append(rng.choice(sentences))
        answer = " ".join(" ".join(text).split()[:words])
        messages = [m for m in row["messages"] if m["role"] != "assistant"]
        messages.append({"role": "assistant", "content": answer})
        rows.append({**row, "id": f"syn-{i:06d}", "messages": messages})
    return rows
