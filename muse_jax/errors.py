"""The project's user-facing error: what a binary reports in one line, with exit status 2.

`UsageError` marks a mistake of the caller (a bad flag, file, prompt or config value), as opposed
to a bug. It is a `ValueError`, so library callers that catch `ValueError` still catch it. The
binaries (`muse_jax.cli.run`) print it as one line; anything else keeps its traceback.
"""

from __future__ import annotations


class UsageError(ValueError):
    """A caller's mistake: bad flags, bad files, bad prompts, bad config values. One line."""


class ConversionError(UsageError):
    """Another project's weight file does not hold what its config describes (one line)."""
