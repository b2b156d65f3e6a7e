"""One exception type for every user-facing failure.

The CLI turns a `SalfError` into a single red line and exit code 2; anything
else is a bug and keeps its traceback.
"""


class SalfError(Exception):
    """A problem with the user's input, data, model or plan (not a salf bug)."""


class ConfigError(SalfError):
    """A setting a run cannot start with, naming the setting's field (`batch_size must be at
    least 1, got 0`); `cli_message()` names the flag a `salf` user typed instead
    (`--batch-size must be at least 1, got 0`). `sep` joins the name and the problem."""

    def __init__(self, field: str, problem: str, sep: str = " ", flag: str | None = None):
        super().__init__(f"{field}{sep}{problem}")
        self.field, self.problem, self.sep = field, problem, sep
        self.flag = flag or "--" + field.replace("_", "-")

    def cli_message(self) -> str:
        return f"{self.flag}{self.sep}{self.problem}"
