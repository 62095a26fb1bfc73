"""Errors a user can fix: bad data, bad config, missing or wrong weights, a path that is not what it
should be, a full disk. ``hptransfer`` (:func:`hptransfer.cli.main`) prints them as one line
``error: <what> (<file>:<row>)`` and exits with status 2; every other exception is a bug and keeps
its traceback. ``--debug`` or ``HPTRANSFER_DEBUG=1`` shows the traceback of user errors too.

Code raises a subclass of :class:`UserError` where the user's input is at fault. Each subclass also
derives from the builtin it replaces (ValueError, FileNotFoundError, ...), so existing
``except ValueError`` code and callers of the library keep working. No imports beyond the standard
library: the data-format readers use this module without torch.
"""
from __future__ import annotations

import errno
from typing import Optional

from hptransfer._env import EnvFlagError

# OSErrors caused by the user's files or disk rather than by our code.
_USER_OSERRORS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


class UserError(Exception):
    """Base of the errors a user can fix. ``str(e)`` is the message, then ``(<path>:<row>)`` when a
    path is given that the message does not already name."""

    def __init__(self, message: str, *, path=None, row: Optional[int] = None):
        super().__init__(message)
        self.message, self.path, self.row = message, path, row

    def __str__(self) -> str:
        if self.path is None or str(self.path) in self.message:
            return self.message
        where = f"{self.path}:{self.row}" if self.row is not None else str(self.path)
        return f"{self.message} ({where})"


class DataFormatError(UserError, ValueError):
    """A dataset file is malformed; the message names file, row and problem."""


class ConfigError(UserError, ValueError):
    """A bad config file or override; the message names the key and the source."""


class PrepareError(UserError, ValueError):
    """Bad input to a preparation tool; the message names the file (and row/frame) and the problem."""


class InputError(UserError, ValueError):
    """Another bad input: a pose file, image, video or argument value that cannot be used."""


class CheckpointError(UserError, ValueError):
    """A path given as a checkpoint or export is not one (or does not match its architecture)."""


class WeightsUnavailable(UserError, FileNotFoundError):
    """Pretrained weights a model or metric needs are not on this machine."""


class WeightsError(UserError, ValueError):
    """A weights file is wrong: not the expected state dict, or a download failed its hash check."""


class MissingDependency(UserError, ImportError):
    """An optional package a feature needs is not installed; the message says how to install it."""


class OutputExistsError(UserError, FileExistsError):
    """Writing would overwrite earlier results the user did not ask to replace."""


class LaunchError(UserError, RuntimeError):
    """How the processes were started does not fit the run: several ranks without a DeepSpeed config,
    ``--device cuda`` without a usable GPU, launcher variables that do not form a world."""


def disk_error(path, exc: OSError) -> Optional[UserError]:
    """A :class:`UserError` naming ``path`` when ``exc`` is a full / read-only disk, else None."""
    if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS:
        return UserError(f"cannot write {path}: {exc.strerror or exc}", path=path)
    return None


def last_line(exc: BaseException) -> str:
    """The last non-empty line of an error message (ffmpeg's errors carry its whole log)."""
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else type(exc).__name__


def user_message(exc: BaseException) -> Optional[str]:
    """The one-line message for an error the user can fix, or None for a bug (show the traceback)."""
    if isinstance(exc, (UserError, EnvFlagError)):
        return str(exc)
    if isinstance(exc, _USER_OSERRORS) or (isinstance(exc, OSError) and exc.errno in DISK_ERRNOS):
        if exc.strerror and exc.filename:  # raised by the OS: "[Errno 2] No such file ..." -> readable
            return f"{exc.strerror} ({exc.filename})"
        return str(exc)
    return None
