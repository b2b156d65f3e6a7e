"""One exception type for every user-facing failure.

The CLI turns a `SalfError` into a single red line and exit code 2; anything
else is a bug and keeps its traceback.
"""


class SalfError(Exception):
    """A problem with the user's input, data, model or plan (not a salf bug)."""
