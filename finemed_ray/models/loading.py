"""Load a model / tokenizer from a local directory, an ``s3://`` prefix, or a hub id, failing with ModelError.

S3 prefixes are downloaded once into the local cache (:func:`finemed_ray.storage.materialize_local`); local
directories must hold a ``config.json``; anything else is passed to ``from_pretrained`` as a hub id (offline
machines then need it in the HF cache).

Errors name the path the user gave: given the local cache copy of an ``s3://`` model (as callers that resolved the
path first do), they name its ``s3://`` URI (read from the cache's marker file), with the cache path after it.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

from finemed_ray.errors import FinemedError, ModelError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DTYPES = ("float32", "bfloat16", "float16", "auto")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _looks_local(path: str) -> bool:
    # A hub id is "name" or "org/name"; anything absolute, relative-explicit, ~-based or deeper is a local path.
    return (
        os.path.isabs(path)
        or path.startswith((".", "~"))
        or path.count("/") > 1
        or os.sep != "/" and os.sep in path
        or os.path.exists(path)
    )


def display_path(path: str) -> str:
    """``path`` as the user knows it: a local cache copy of an ``s3://`` model -> ``"s3://... (local copy <path>)"``;
    anything else unchanged."""
    from finemed_ray import storage

    try:
        if isinstance(path, str) and os.path.isdir(path):
            with open(os.path.join(path, storage.CACHE_MARKER), encoding="utf-8") as fh:
                uri = json.load(fh).get("uri")
            if isinstance(uri, str) and uri:
                return f"{uri} (local copy {path})"
    except (OSError, ValueError, AttributeError):
        pass
    return path


def resolve_model_path(path: str, required: tuple[str, ...] = ("config.json",)) -> str:
    """A path ``from_pretrained`` can load: s3:// -> local cache copy; local dirs checked; hub ids unchanged.

    ``required``: the local directory must contain at least one of these files (``config.json`` by default).
    """
    from finemed_ray import storage

    if not isinstance(path, str) or not path.strip():
        raise ModelError(f"model path {path!r}: empty; give a local directory, an s3:// prefix or a hub id")
    if storage.is_s3(path):
        try:
            local = storage.materialize_local(path)
        except FinemedError as exc:
            raise ModelError(f"{path}: cannot download the model: {exc}") from exc
        source = f"{path} (downloaded to {local})"
    elif _looks_local(path):
        local = os.path.expanduser(path)
        shown = display_path(local)
        source = shown if shown != local else path
    else:
        return path  # hub id
    if not os.path.isdir(local):
        what = "is a file, not a model directory" if os.path.exists(local) else "does not exist"
        raise ModelError(f"{source}: {what}")
    if not any(os.path.isfile(os.path.join(local, name)) for name in required):
        raise ModelError(
            f"{source}: no {' or '.join(required)} in this directory; not a saved transformers model "
            "(save one with save_pretrained)"
        )
    return local


def load_tokenizer(path: str, require_chat_template: bool = True) -> PreTrainedTokenizerBase:
    """``AutoTokenizer`` from ``path`` (local, s3:// or hub id); pad defaults to eos when the tokenizer has none."""
    from transformers import AutoTokenizer

    local = resolve_model_path(path, required=("config.json", *_TOKENIZER_FILES))
    shown = display_path(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(local)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds; the user needs the path
        raise ModelError(f"{shown}: cannot load tokenizer: {type(exc).__name__}: {exc}") from exc
    if require_chat_template and not getattr(tokenizer, "chat_template", None):
        raise ModelError(
            f"{shown}: tokenizer has no chat template; use a chat/instruct model or add a chat_template "
            "to its tokenizer_config.json"
        )
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(f"{shown}: tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _torch_dtype(dtype: str) -> Any:
    import torch

    if dtype not in DTYPES:
        raise ModelError(f"dtype={dtype!r}: expected one of {', '.join(DTYPES)}")
    return "auto" if dtype == "auto" else getattr(torch, dtype)


def load_model(path: str, dtype: str = "float32") -> PreTrainedModel:
    """``AutoModelForCausalLM`` from ``path`` (local, s3:// or hub id) in ``dtype``, in eval mode."""
    from transformers import AutoModelForCausalLM

    torch_dtype = _torch_dtype(dtype)
    local = resolve_model_path(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(local, dtype=torch_dtype)
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"{display_path(path)}: cannot load model: {type(exc).__name__}: {exc}") from exc
    model.eval()
    return model


def load_for_generation(path: str, dtype: str = "float32", onednn_linear: bool = True) -> tuple[Any, Any]:
    """``(model, tokenizer)`` set up for batched generation: left padding, eval mode, and on CPU float32 the oneDNN
    small-batch linears (:mod:`finemed_ray.models.cpu_linear`; no weight copy) unless ``onednn_linear`` is off."""
    from finemed_ray.models.cpu_linear import use_small_batch_linears

    tokenizer = load_tokenizer(path)
    tokenizer.padding_side = "left"
    model = load_model(path, dtype=dtype)
    if onednn_linear:
        use_small_batch_linears(model)  # acts only on CPU float32 inputs without autograd, at run time
    return model, tokenizer


def generate_left_padded(
    model: Any,
    prompts: list[list[int]],
    pad_id: int,
    max_new_tokens: int,
    temperature: float = 0.0,
    sampling: dict[str, Any] | None = None,
    lora: Any = None,
    row_adapter: list[int] | None = None,
) -> list[list[int]]:
    """The new tokens of ``model.generate`` for a batch of prompt token ids, left-padded together (greedy when
    ``temperature`` is 0; ``sampling``: more ``generate`` arguments for sampled decoding, e.g. ``top_p``).
    ``lora``: a :class:`finemed_ray.ttt.adapt.BatchedLoRA` over ``model``, attached for the
    call; ``row_adapter[i]`` is row i's adapter (-1 = none). Rows run to ``max_new_tokens``: callers cut at stops."""
    import contextlib

    import torch

    width = max(len(ids) for ids in prompts)
    input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in prompts], dtype=torch.long)
    attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompts], dtype=torch.long)
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "pad_token_id": pad_id}
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, **(sampling or {}))
    else:  # silence warnings about sampling settings a model's generation_config may carry
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    attach = lora.attached() if lora is not None else contextlib.nullcontext()
    with torch.no_grad(), attach:
        if lora is not None:
            lora.row_adapter = torch.tensor(row_adapter if row_adapter is not None else [-1] * len(prompts),
                                            dtype=torch.long)
        out = model.generate(input_ids=input_ids.to(model.device), attention_mask=attention.to(model.device),
                             **kwargs)
    return out[:, width:].tolist()


def stop_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """Ids that end a generated reply: the model's ``generation_config.eos_token_id`` (one id or a list) and the
    tokenizer's eos."""
    ids: set[int] = set()
    eos = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif eos:
        ids.update(int(i) for i in eos)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def generate_reply(
    model: Any,
    tokenizer: Any,
    messages: list[dict[str, str]],
    max_new_tokens: int = 32,
    greedy: bool = True,
) -> str:
    """One assistant reply to ``messages`` (rendered with the chat template), special tokens stripped."""
    import torch

    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    inputs = {k: v.to(model.device) for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
    gen_kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": not greedy}
    if greedy:  # silence warnings about sampling settings a model's generation_config may carry
        gen_kwargs.update(temperature=None, top_p=None, top_k=None)
    if getattr(model.generation_config, "pad_token_id", None) is None:
        gen_kwargs["pad_token_id"] = tokenizer.pad_token_id
    with torch.no_grad():
        out = model.generate(**inputs, **gen_kwargs)
    new_tokens = out[0, inputs["input_ids"].shape[1] :]
    return tokenizer.decode(new_tokens, skip_special_tokens=True).strip()


def attention_implementation(model_or_config: Any) -> str:
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "_attn_implementation", None) or "eager"


def packed_sequences_isolated(model_or_config: Any) -> bool:
    """Whether transformers isolates packed sequences (found from restarting position ids) for this model's
    attention implementation: only those in its mask registry get the block-diagonal mask; any other gets no mask
    at all, and packed sequences would attend to each other."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    return attention_implementation(model_or_config) in set(ALL_MASK_ATTENTION_FUNCTIONS)
