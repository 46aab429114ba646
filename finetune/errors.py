"""User-facing errors: one line that names the file or key and says what to do."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input (recipe, data, file). Printed without a traceback; exit code 2."""

    exit_code = 2


class RecipeError(UserError):
    """The recipe file cannot be read or does not validate."""


class DataError(UserError):
    """A data source is missing, empty or holds a file we cannot use."""


class ModelError(UserError):
    """A base model or adapter cannot be found or does not fit."""


def did_you_mean(word: str, options) -> str:
    """' (did you mean 'x'?)' for the closest option, or '' when nothing is close."""
    import difflib

    options = [str(o) for o in options]
    close = difflib.get_close_matches(str(word), options, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


class RunError(UserError):
    """The run cannot go on (non-finite loss, a failed checkpoint write); what was saved is intact."""

    exit_code = 3


class NonFiniteError(RunError):
    """Loss, gradients or weights went NaN/inf."""


# what the machine says when a file cannot be written or read: the user's to fix (space, permissions, a
# read-only mount), never a bug of ours, so one line instead of a traceback
ENVIRONMENT_ERRNOS = frozenset({"ENOSPC", "EDQUOT", "EACCES", "EPERM", "EROFS", "EISDIR", "ENOTDIR", "EFBIG",
                                "ENAMETOOLONG", "EIO"})


def environment_problem(e: BaseException) -> str | None:
    """One line for an OSError the user can act on (a full disk, no permission, a read-only folder); None
    for anything else, which stays a traceback worth reporting."""
    import errno as _errno

    if not isinstance(e, OSError) or _errno.errorcode.get(e.errno or -1) not in ENVIRONMENT_ERRNOS:
        return None
    where = f"{e.filename}: " if e.filename else ""
    hint = {"ENOSPC": "free some space", "EDQUOT": "free some space", "EFBIG": "free some space"}.get(
        _errno.errorcode[e.errno], "check the path and its permissions")
    return f"{where}{e.strerror or e}; {hint} and run again (nothing was half-written)"
