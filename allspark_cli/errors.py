"""The toolkit's error types: the core raises these, the CLI turns each into one stderr line.

Exit codes are part of the public contract (README "Exit codes"):
0 ok, 1 internal error, 2 bad usage or settings, 3 bad data, 4 environment, 5 out of memory,
6 a file could not be written, 130 interrupted.
"""
from __future__ import annotations


class AllsparkError(Exception):
    """Base class of every error the toolkit reports to a user; `exit_code` picks the CLI exit code."""

    exit_code: int = 1


class SettingsError(AllsparkError):
    """A setting, option, preset or weight file does not fit what is expected."""

    exit_code = 2


class DataError(AllsparkError):
    """A dataset, image, mask or checkpoint file is missing, unreadable or malformed."""

    exit_code = 3


class EnvError(AllsparkError):
    """The environment cannot do what was asked (no CUDA device, missing backend, ...)."""

    exit_code = 4


class ResourceError(AllsparkError):
    """The run ran out of (device) memory; the message carries concrete remedies."""

    exit_code = 5


class WriteError(AllsparkError):
    """A file could not be written (disk full, permission lost, read-only file system); whatever was
    complete before the failing write is left as it was."""

    exit_code = 6


class Interrupted(AllsparkError):
    """Ctrl-C or SIGTERM stopped the run after its state was saved."""

    exit_code = 130
