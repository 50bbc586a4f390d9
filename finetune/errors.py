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

    Console(stderr=True, soft_wrap=True).print(Text(f"error: {err}", style="bold red"))
    return err.exit_code
