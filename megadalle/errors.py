"""The error types every layer raises. The CLI catches them and prints one line, exit code 2.

They live here, below everything else, so that library code never imports the CLI to report a
problem to the user.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is wrong; the message says which one and how to fix it."""


class CommandError(RuntimeError):
    """A user-facing error: printed without a traceback, exit code 2."""
