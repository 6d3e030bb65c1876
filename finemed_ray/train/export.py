"""The final Hugging Face export of a stage: weights + tokenizer + metadata + a loss plot, published atomically."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from finemed_ray import storage

METADATA_FILE = "finemed_export.json"
LOSS_PLOT_FILE = "loss.png"


def loss_history(log_history: list[dict[str, Any]]) -> list[dict[str, float]]:
    return [
        {"step": e["step"], "loss": e["loss"], "learning_rate": e.get("learning_rate")}
        for e in log_history
        if "loss" in e and "step" in e
    ]


def plot_loss(history: list[dict[str, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # headless: workers have no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    if history:
        ax.plot([h["step"] for h in history], [h["loss"] for h in history], marker=".", label="train loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def finalize_export(local_dir: Path, export_uri: str, metadata: dict[str, Any]) -> None:
    """Write metadata and the loss plot next to the weights, then publish the directory to ``export_uri``."""
    metadata = {"created_unix": time.time(), **metadata}
    history = metadata.get("loss_history", [])
    plot_loss(history, local_dir / LOSS_PLOT_FILE, title=f"{metadata.get('stage', 'train')}: {metadata.get('run')}")
    (local_dir / METADATA_FILE).write_text(json.dumps(metadata, indent=2, default=str))
    storage.publish_dir(str(local_dir), export_uri)
