"""Ray Data: raw DPO preference pairs (JSONL or Parquet, local or S3) -> a tokenised Parquet dataset + quarantine.

The same shape as :mod:`finemed_ray.data.sft_prepare`: one parallel pass validates and tokenises every row and
writes them all (good and bad, bad ones tagged with ``error``) to ``<out>/prepared/``; the quarantine dataset (a
Ray Data filter of that output) and the counts (a driver-side scan of its six small columns) are cheap reads of
it. Rows are TRL conversational preference rows: ``prompt`` (messages ending with the user's turn), ``chosen`` /
``rejected`` (assistant messages).

Tokenisation mirrors TRL 1.16 ``DPOTrainer._prepare_dataset`` exactly, so the ids are the ones TRL would compute:

* ``prompt``  = ``apply_chat_template(prompt, tokenize=True, return_dict=True, add_generation_prompt=True)``;
* ``prompt+chosen`` / ``prompt+rejected`` = ``apply_chat_template(prompt + chosen, tokenize=True,
  return_dict=True)`` (no generation prompt);
* ``n`` = the shortest common token prefix of ``prompt`` with either full render (normally all of ``prompt``);
  ``prompt_ids = prompt[:n]``, ``chosen_ids = (prompt+chosen)[n:]``, ``rejected_ids = (prompt+rejected)[n:]``.

The columns are TRL's own pre-tokenised names, ``prompt_ids`` / ``chosen_ids`` / ``rejected_ids`` (what its
``DataCollatorForPreference`` reads and what ``_set_signature_columns_if_needed`` keeps). TRL 1.16 has no setting
that skips its dataset preparation for text data (``skip_prepare_dataset`` is tied to image datasets and
``DPOConfig`` has no ``dataset_kwargs``): a dataset holding only these columns fails in ``extract_prompt``
(``KeyError: 'chosen'``). A trainer consuming this output must override ``_prepare_dataset`` to return datasets
that already have the three columns unchanged; everything downstream (collator, loss) then uses them as they are.
With that override, ``DPOConfig(max_length=<the max_length given here>, truncation_mode="keep_start")`` (defaults
otherwise: ``padding_free=False``) makes the collator a no-op cut, since every prepared row already fits.
(Checked against trl 1.16.0: a plain ``DPOTrainer`` given only these columns raises ``KeyError: 'chosen'``; with
the override it trains on them.)

Length limits (TRL 1.16 ``DPOConfig`` has ``max_length`` only; ``max_prompt_length`` is ours):

* ``max_prompt_length``: a longer prompt is cut from the left (its end -- the question and the assistant header
  the completion follows -- is kept), or the row is quarantined under ``overlong="drop"``;
* a prompt that leaves no room for a completion token within ``max_length`` is quarantined under either policy
  (TRL drops such rows too: with ``keep_start`` truncation they carry no completion token);
* ``prompt + chosen`` / ``prompt + rejected`` longer than ``max_length``: the completion is cut at the end
  (``truncation_mode="keep_start"``, as TRL's collator does) or the row is quarantined under ``drop``;
  truncated rows are counted. A pair whose completions become identical after the cut is quarantined (no signal).

Quarantine reasons start with a kind before the first colon (``prompt``, ``chosen``, ``rejected``, ``invalid JSON``,
``overlong``, ``chat template``...) and :class:`DPOPrepareSummary` counts them by kind.

Bad input files and lines (not UTF-8, a BOM, gzip, too-large or non-object lines, empty files, mixed formats, Parquet
files that disagree on a column's type) follow the rules of :mod:`finemed_ray.data.sft_prepare` (the same reader):
quarantined rows with a reason ending in ``(<file> line <n>)``, or a one-line :class:`DataError` naming the file.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import pyarrow as pa

from finemed_ray import storage
from finemed_ray.data.sft_prepare import (
    MAX_ROW_BYTES,
    RowSelection,
    _cached_tokenizer,
    _row_id,
    _some,
    batch_records,
    check_readable,
    check_selected,
    read_input,
    tally_prepared,
    write_prepared,
    write_quarantine,
)
from finemed_ray.data.tokenize import TemplateError, with_system_prompt
from finemed_ray.errors import ConfigError, DataError
from finemed_ray.schemas import validate_dpo_row

Overlong = Literal["truncate", "drop"]
OVERLONG_POLICIES = ("truncate", "drop")
TOKEN_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")  # TRL 1.16 DPOTrainer's pre-tokenised columns

PREPARED_DPO_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("prompt_ids", pa.list_(pa.int32())),
        ("chosen_ids", pa.list_(pa.int32())),
        ("rejected_ids", pa.list_(pa.int32())),
        # token counts before any truncation (prompt = the shared prefix TRL would use)
        ("prompt_tokens", pa.int32()),
        ("chosen_tokens", pa.int32()),
        ("rejected_tokens", pa.int32()),
        ("num_tokens", pa.int32()),  # len(prompt_ids) + len(chosen_ids) + len(rejected_ids), after truncation
        ("truncated", pa.bool_()),
        ("department", pa.string()),
        ("subdepartment", pa.string()),
        ("source", pa.string()),
        ("split", pa.string()),  # good rows: "train" | "eval" | "filtered" (outside the department filter)
        ("error", pa.string()),  # null for good rows; the quarantine reason otherwise
        ("raw", pa.string()),  # the row as read, kept for bad rows only
    ]
)


@dataclass
class DPOPrepareSummary:
    input_uri: str
    prepared_uri: str
    quarantine_uri: str
    max_length: int
    max_prompt_length: int | None
    overlong: str
    rows_in: int = 0
    rows_valid: int = 0
    rows_quarantined: int = 0
    rows_truncated: int = 0  # valid rows cut to fit (overlong="truncate")
    rows_filtered_out: int = 0  # valid rows outside data.department / data.subdepartment
    rows_train: int = 0
    rows_eval: int = 0
    tokens_valid: int = 0  # prompt + chosen + rejected tokens of the valid rows, after truncation
    tokens_train: int = 0  # the same for the train rows
    departments: dict[str, int] = field(default_factory=dict)  # valid rows per "primary / secondary" label
    quarantine_reasons: dict[str, int] = field(default_factory=dict)  # by kind, e.g. {"overlong": 3, "prompt": 1}
    unreadable_files: list[str] = field(default_factory=list)  # files that could not be read to their end
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def validate_dpo_pair(row: Any) -> str | None:
    """``validate_dpo_row`` plus what a preference pair needs to carry a signal: a non-empty user turn, non-empty
    completions, and completions that differ (not only in surrounding whitespace)."""
    if err := validate_dpo_row(row):
        return err
    if not any(m["content"].strip() for m in row["prompt"] if m["role"] == "user"):
        return "prompt: the user message is empty"
    for key in ("chosen", "rejected"):
        if not any(m["content"].strip() for m in row[key]):
            return f"{key}: the assistant message is empty"
    if [m["content"].strip() for m in row["chosen"]] == [m["content"].strip() for m in row["rejected"]]:
        return "chosen and rejected are identical (up to whitespace)"
    return None


def _chat_ids(tok: Any, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    # The call TRL's `_tokenize` makes for conversational rows.
    return list(tok.apply_chat_template(messages, tokenize=True, return_dict=True,
                                        add_generation_prompt=add_generation_prompt)["input_ids"])


def _render(tok: Any, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize_pair(tok: Any, prompt: list[dict], chosen: list[dict], rejected: list[dict]) -> dict[str, list[int]]:
    """Untruncated ``prompt_ids`` / ``chosen_ids`` / ``rejected_ids`` exactly as TRL 1.16's DPO tokenisation makes
    them. Raises :class:`TemplateError` when the template renders the prompt alone differently from the prompt
    followed by a completion (the text, not just a token merge at the boundary)."""
    prompt_text = _render(tok, prompt, add_generation_prompt=True)
    for completion in (chosen, rejected):
        if not _render(tok, prompt + completion).startswith(prompt_text):
            raise TemplateError(
                "the prompt rendered with the generation prompt is not a prefix of the prompt rendered with its "
                "completion, so the completion tokens cannot be separated from the prompt"
            )
    prompt_ids = _chat_ids(tok, prompt, add_generation_prompt=True)
    prompt_chosen = _chat_ids(tok, prompt + chosen)
    prompt_rejected = _chat_ids(tok, prompt + rejected)
    n = min(_common_prefix(prompt_ids, prompt_chosen), _common_prefix(prompt_ids, prompt_rejected))
    return {"prompt_ids": prompt_ids[:n], "chosen_ids": prompt_chosen[n:], "rejected_ids": prompt_rejected[n:]}


def fit_pair(ids: dict[str, list[int]], max_length: int, max_prompt_length: int | None,
             overlong: str) -> tuple[dict[str, list[int]], bool, str | None]:
    """Apply the length limits: -> (ids, truncated, quarantine reason or None). See the module docstring."""
    prompt, chosen, rejected = ids["prompt_ids"], ids["chosen_ids"], ids["rejected_ids"]
    truncated = False
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        if overlong == "drop":
            return ids, False, f"overlong: prompt has {len(prompt)} tokens > max_prompt_length={max_prompt_length}"
        prompt, truncated = prompt[len(prompt) - max_prompt_length:], True
    if len(prompt) >= max_length:
        return ids, False, (f"overlong: prompt has {len(prompt)} tokens, leaving no room for a completion within "
                            f"max_length={max_length}")
    budget = max_length - len(prompt)
    for key, completion in (("chosen", chosen), ("rejected", rejected)):
        if len(completion) > budget:
            if overlong == "drop":
                return ids, False, (f"overlong: prompt+{key} has {len(prompt) + len(completion)} tokens > "
                                    f"max_length={max_length}")
            truncated = True
    chosen, rejected = chosen[:budget], rejected[:budget]
    if chosen == rejected:
        return ids, False, (f"overlong: chosen and rejected are identical after truncation to "
                            f"max_length={max_length}")
    return {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected}, truncated, None


def prepare_dpo_batch(batch: pa.Table, tokenizer_path: str, max_length: int, max_prompt_length: int | None,
                      overlong: str, system_prompt: str | None, fmt: str,
                      selection: RowSelection = RowSelection(), max_row_bytes: int = MAX_ROW_BYTES) -> pa.Table:
    """Validate + tokenise one Arrow batch of preference rows; every input row yields exactly one output row."""
    tok = _cached_tokenizer(tokenizer_path)
    out: dict[str, list] = {name: [] for name in PREPARED_DPO_SCHEMA.names}
    for raw, row, err, where in batch_records(batch, fmt, max_row_bytes):
        err = err or validate_dpo_pair(row)
        full = fitted = None
        truncated = False
        if err is None:
            try:
                full = tokenize_pair(tok, with_system_prompt(row["prompt"], system_prompt), row["chosen"],
                                     row["rejected"])
            except TemplateError as e:
                err = f"chat template: {e}"
            except Exception as e:  # tokenizer failure on this row only: quarantine it, keep going
                err = f"tokenization failed: {type(e).__name__}: {e}"
        if full is not None:
            fitted, truncated, err = fit_pair(full, max_length, max_prompt_length, overlong)
        good = err is None
        if not good and where:
            err = f"{err} ({where})"
        rid = row.get("id") if isinstance(row, dict) and isinstance(row.get("id"), str) else None
        rid = rid or _row_id(raw)
        out["id"].append(rid)
        for key in ("prompt", "chosen", "rejected"):
            out[f"{key}_ids"].append(fitted[f"{key}_ids"] if good else None)
            out[f"{key}_tokens"].append(len(full[f"{key}_ids"]) if full is not None else None)
        out["num_tokens"].append(sum(len(fitted[c]) for c in TOKEN_COLUMNS) if good else None)
        out["truncated"].append(truncated if good else None)
        for key in ("department", "subdepartment", "source"):
            v = row.get(key) if isinstance(row, dict) else None
            out[key].append(v if isinstance(v, str) else None)
        out["split"].append(selection.split_of(rid, out["department"][-1], out["subdepartment"][-1]) if good else None)
        out["error"].append(err)
        out["raw"].append(None if good else raw)
    return pa.Table.from_pydict(out, schema=PREPARED_DPO_SCHEMA)


def _check_limits(max_length: int, max_prompt_length: int | None, overlong: str) -> None:
    if overlong not in OVERLONG_POLICIES:
        raise ConfigError(f"overlong={overlong!r}: expected one of {list(OVERLONG_POLICIES)}")
    if not isinstance(max_length, int) or max_length < 2:
        raise ConfigError(f"max_length={max_length!r}: expected an integer >= 2")
    if max_prompt_length is not None and not (isinstance(max_prompt_length, int)
                                              and 1 <= max_prompt_length < max_length):
        raise ConfigError(f"max_prompt_length={max_prompt_length!r}: expected an integer in [1, max_length) "
                          f"with max_length={max_length}, or null")


def prepare_dpo(input_uri: str, tokenizer_path: str, out_uri: str, max_length: int,
                max_prompt_length: int | None = None, overlong: Overlong = "truncate",
                system_prompt: str | None = None, selection: RowSelection = RowSelection(),
                max_row_bytes: int = MAX_ROW_BYTES) -> DPOPrepareSummary:
    """Tokenise the preference pairs under ``input_uri`` into ``<out_uri>/prepared`` and quarantine bad rows into
    ``<out_uri>/quarantine``. Raises :class:`DataError` when the input has no rows, no valid rows, or the
    department filter selects no training rows."""
    _check_limits(max_length, max_prompt_length, overlong)
    t0 = time.time()
    files, fmt, ds = read_input(input_uri, max_row_bytes)

    prepared_uri, quarantine_uri = write_prepared(
        ds, out_uri, prepare_dpo_batch, tokenizer_path=tokenizer_path, max_length=max_length,
        max_prompt_length=max_prompt_length, overlong=overlong, system_prompt=system_prompt, fmt=fmt,
        selection=selection, max_row_bytes=max_row_bytes,
    )

    summary = DPOPrepareSummary(input_uri=input_uri, prepared_uri=prepared_uri, quarantine_uri=quarantine_uri,
                                max_length=max_length, max_prompt_length=max_prompt_length, overlong=overlong)
    tally_prepared(prepared_uri, PREPARED_DPO_SCHEMA, summary)
    if summary.rows_quarantined:
        write_quarantine(prepared_uri, quarantine_uri, input_uri)
    summary.seconds = round(time.time() - t0, 3)
    check_readable(summary)
    if summary.rows_in == 0:
        raise DataError(f"{input_uri}: no rows (the input files hold no data lines: {_some(files)})")
    check_selected(summary, selection, what="preference rows")
    return summary


def read_prepared_dpo(prepared_uri: str, split: str = "train"):
    """One split of a prepared DPO dataset's good rows, as a Ray Dataset of ``id`` + TRL's ``prompt_ids``,
    ``chosen_ids``, ``rejected_ids``."""
    import ray.data
    from ray.data.expressions import col

    fs, path = storage.get_filesystem(prepared_uri)
    return (
        ray.data.read_parquet(path, filesystem=fs)
        .select_columns(["id", *TOKEN_COLUMNS, "split", "error"])
        .filter(expr=col("error").is_null() & (col("split") == split))
        .select_columns(["id", *TOKEN_COLUMNS])
    )
