"""User-facing errors: a short message and exit code 2, never a traceback."""

from __future__ import annotations


class SetupError(Exception):
    """Raised for bad input (config, data, missing files) that the user must fix.

    The entry points catch it, print the message as one paragraph and exit with
    code 2 before anything is trained, so nothing already written is lost.
    """

    exit_code = 2


def report_error(err: SetupError) -> int:
    """Print the message as one paragraph on stderr (no traceback); return the exit code."""
    from rich.console import Console
    from rich.text import Text

    Console(stderr=True, soft_wrap=True).print(Text(f"error: {message_of(err)}", style="bold red"))
    return err.exit_code


def message_of(err: Exception) -> str:
    """The error's own message; one re-raised from a DataLoader worker carries the worker's traceback
    ("Caught SetupError in DataLoader worker process 0. Original Traceback ..."), whose last line is it."""
    text = str(err)
    if "Original Traceback" in text:
        last = text.rstrip().splitlines()[-1]
        return last.split(f"{type(err).__name__}: ", 1)[-1]
    return text


class Interrupted(Exception):
    """A stop signal (SIGTERM) during one of finetune's own phases (data check, feature extraction), where
    Lightning's graceful stop at the next batch does not reach. Temp files are removed on the way out; the
    entry point prints how to resume and exits 143."""

    def __init__(self, cause: str) -> None:
        super().__init__(f"interrupted by {cause}")
        self.cause = cause
