"""The config layer: the schema every composed config is checked against (``lw.config.schema``;
the tracking part apart, in ``lw.config.tracking``, so that readers of runs load no torch).

``from lw.config import LwConfig`` (and every other name of the schema) still works: names are
looked up lazily, so importing ``lw.config.tracking`` alone does not build the metric schema.
"""

from __future__ import annotations

import importlib


def __getattr__(name: str):
    if name in ("LwError", "ConfigError"):  # their old home; they live in lw.errors
        from lw import errors

        return getattr(errors, name)
    # not `from lw.config import schema`: that asks this function for "schema" again (a
    # recursion for any `from lw.config import schema` before the submodule is loaded)
    schema = importlib.import_module("lw.config.schema")
    if name in ("schema", "tracking"):
        return importlib.import_module(f"lw.config.{name}")

    try:
        return getattr(schema, name)
    except AttributeError:
        raise AttributeError(f"module 'lw.config' has no attribute {name!r}") from None
