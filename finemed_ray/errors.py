"""Errors that reach users. Each names the thing that is wrong (a key, a path, a row) so the fix is obvious.

:func:`user_message` finds such an error anywhere in an exception's chain, also inside a Ray task error, and gives
its one-line message (``jobs/_cli.py`` prints it as ``error: ...`` and exits 2).
"""


class FinemedError(Exception):
    """Base class: jobs print these as one ``error:`` line, without a traceback, and exit 2."""


class ConfigError(FinemedError):
    """A config file or override is invalid (unknown key, wrong type, bad value)."""


class StorageError(FinemedError):
    """A local or s3:// path is missing, unreadable or unwritable.

    ``transient`` marks an error that may go away by itself (the endpoint unreachable, a 5xx, throttling): the
    storage layer retries those for a while before it gives up."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


class ModelError(FinemedError):
    """A model or tokenizer cannot be loaded or is unfit (e.g. no chat template)."""


class DataError(FinemedError):
    """A dataset is missing, empty, unreadable (a file in an unsupported format, a broken gzip, Parquet files that
    disagree on a column), or has no valid rows."""


# Exceptions that, whatever raised them, mean the input given to a job cannot be used (not a bug in the job).
INPUT_ERRORS: tuple[type[BaseException], ...] = (FinemedError, UnicodeDecodeError)


def _causes(exc: BaseException):
    """``exc`` and what it was raised from, innermost last: ``__cause__`` links and the ``cause`` of Ray's task
    errors (``RayTaskError(X)`` is a subclass of ``X`` whose text is the worker's traceback, not ``X``'s message)."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        cur = todo.pop()
        if id(cur) in seen:
            continue
        seen.add(id(cur))
        yield cur
        for nxt in (getattr(cur, "cause", None), cur.__cause__):
            if isinstance(nxt, BaseException):
                todo.append(nxt)


def _is_wrapper(exc: BaseException) -> bool:
    # Ray's task/actor errors carry the original exception in `.cause`; their own text is a remote traceback.
    return isinstance(getattr(exc, "cause", None), BaseException)


def user_error(exc: BaseException) -> BaseException | None:
    """The innermost :data:`INPUT_ERRORS` exception in ``exc``'s chain that is not a Ray wrapper (also one raised
    inside a Ray task), or None when ``exc`` is not an input problem."""
    found = None
    for cur in _causes(exc):
        if not _is_wrapper(cur) and isinstance(cur, INPUT_ERRORS):
            found = cur
    return found


def user_message(exc: BaseException) -> str | None:
    """One line for an input problem found anywhere in ``exc``'s chain (see :func:`user_error`), else None.

    A message that crossed a Ray task keeps its first line only (Ray appends retry notes to it as further lines);
    others are joined onto one line. Exceptions other than ours are prefixed with their type."""
    found = user_error(exc)
    if found is None:
        return None
    via_ray = any(_is_wrapper(cur) for cur in _causes(exc))
    lines = [ln.strip() for ln in str(found).splitlines() if ln.strip()]
    if not lines:
        return type(found).__name__
    text = lines[0] if via_ray else " ".join(lines)
    return text if isinstance(found, FinemedError) else f"{type(found).__name__}: {text}"
