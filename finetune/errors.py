"""User-facing errors: a short message and exit code 2, never a traceback."""

from __future__ import annotations


class SetupError(Exception):
    """Raised for bad input (config, data, missing files) that the user must fix.

    The entry points catch it, print the message as one paragraph and exit with
    code 2 before anything is trained, so nothing already written is lost.
    """

    exit_code = 2
