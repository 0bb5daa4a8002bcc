"""Errors a user can act on. The CLI prints their message as one red line and exits with code 2."""


class RkdError(Exception):
    """Base class: a user-facing error whose message says what to do."""


class UsageError(RkdError):
    """An argument or option is invalid (unknown architecture, bad spec)."""


class NotFoundError(RkdError):
    """A file, folder, run or reference that was named does not exist."""


class UnsafeCheckpointError(RkdError):
    """A checkpoint needs arbitrary code to load and --trust-pickle was not given."""


class DataError(RkdError):
    """A dataset is missing or malformed."""


class CheckFailed(RkdError):
    """A gate (such as --fail-asr) failed: the CLI exits with code 1, not 2."""

    exit_code = 1
