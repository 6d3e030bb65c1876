"""Errors that reach users. Each names the thing that is wrong (a key, a path, a row) so the fix is obvious."""


class FinemedError(Exception):
    """Base class: jobs print these without a traceback and exit non-zero."""


class ConfigError(FinemedError):
    """A config file or override is invalid (unknown key, wrong type, bad value)."""


class StorageError(FinemedError):
    """A local or s3:// path is missing, unreadable or unwritable."""


class ModelError(FinemedError):
    """A model or tokenizer cannot be loaded or is unfit (e.g. no chat template)."""


class DataError(FinemedError):
    """A dataset is missing, empty, or has no valid rows."""
