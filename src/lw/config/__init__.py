"""The config layer: the schema every composed config is checked against (``lw.config.schema``;
the tracking part apart, in ``lw.config.tracking``, so that readers of runs load no torch).

``from lw.config import LwConfig`` (and every other name of the schema) still works: names are
looked up lazily, so importing ``lw.config.tracking`` alone does not build the metric schema.
"""

from __future__ import annotations


def __getattr__(name: str):
    if name in ("LwError", "ConfigError"):  # their old home; they live in lw.errors
        from lw import errors

        return getattr(errors, name)
    from lw.config import schema

    try:
        return getattr(schema, name)
    except AttributeError:
        raise AttributeError(f"module 'lw.config' has no attribute {name!r}") from None
