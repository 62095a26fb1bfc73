"""The one rule for on/off environment variables (``HPTRANSFER_NO_EXT``, ``HPTRANSFER_STRICT``, ...).

On: ``1 true yes on``; off: ``0 false no off``, empty or unset (case and surrounding spaces ignored).
Anything else is an error naming the variable, not a silent guess. Standard library only and no
hptransfer imports: setup.py loads this file by path before the package is installed, so the build and
the run time read a flag the same way (``HPTRANSFER_NO_EXT=false`` builds *and* uses the extension).
"""
from __future__ import annotations

import os

TRUE = ("1", "true", "yes", "on")
FALSE = ("", "0", "false", "no", "off")


class EnvFlagError(ValueError):
    """An on/off variable with another value: a user error (one line, exit 2 from the CLI)."""


def parse_flag(name: str, value: str | None, default: bool = False) -> bool:
    """``value`` of the variable ``name`` (None = unset, giving ``default``) as a bool."""
    if value is None:
        return default
    v = value.strip().lower()
    if v in TRUE:
        return True
    if v in FALSE:
        return False
    raise EnvFlagError(f"environment variable {name}={value!r}: expected one of {', '.join(TRUE)} (on) or "
                     f"{', '.join(FALSE[1:])} or empty (off)")


def flag(name: str, default: bool = False) -> bool:
    """The environment variable ``name`` as a bool (unset: ``default``); EnvFlagError (a ValueError) on any other value."""
    return parse_flag(name, os.environ.get(name), default)
