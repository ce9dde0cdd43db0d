"""The errors a user can fix, and the checks that raise them (config values, metric knobs).

Here rather than in lw.config so that metric declarations (which lw.config reads to build its
schema) can use them without importing lw.config.
"""

from __future__ import annotations

from typing import Any


class LwError(Exception):
    """An error the user can fix (bad value, missing file, no hub): shown without a traceback."""


class ConfigError(LwError, ValueError):
    """A config value outside what lw accepts; the message names the field and the options."""


def check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def one_of(name: str, value: Any, options: tuple) -> None:
    check(value in options, f"{name}={value!r} is not one of {', '.join(map(str, options))}")
