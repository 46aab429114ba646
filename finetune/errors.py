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
