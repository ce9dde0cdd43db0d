"""Checks made before Hydra writes anything (a value its field cannot hold, credentials in a
URI, writable folders), and the one-line error for a folder or disk that refuses a write."""


from __future__ import annotations

import errno
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from lw.errors import LwError

# user:password@ (or a token as user@) in a URI anywhere in the command line or config
_CREDENTIALS = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s@,]+@", re.IGNORECASE)


# What a folder lw or Hydra must write to can fail with: the user's to fix.
_UNWRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT,
               errno.ENOTDIR, errno.EEXIST)


def _refuse(message: str) -> None:
    print(f"[lw] error: {message}", file=sys.stderr)
    sys.exit(1)


def _writable(folder: str, knob: str) -> None:
    """``folder`` can be made and written to, or one error line naming ``knob``."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        _refuse(f"{knob}={folder}: cannot write there ({error.strerror or error}); choose a "
                "writable folder")


def check_override_values(args: list[str]) -> None:
    """Each ``key=value`` of the command line (each value of a ``-m`` list) that the field it
    sets cannot hold (``data.n_prompts=abc``) refused in one line, before Hydra composes
    anything (whose message is five lines and a hint about HYDRA_FULL_ERROR). Keys that are
    not fields of lw's schema (groups, hydra.*, +experiment) are Hydra's to check."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf, ValidationError

    from lw.config.schema import DataConfig, LwConfig, ModelConfig

    given = [a for a in args if "=" in a and not a.startswith("-")]
    try:
        overrides = OverridesParser.create().parse_overrides(given)
    except Exception:  # noqa: BLE001 - a syntax error: Hydra says what it is
        return
    schema = OmegaConf.structured(LwConfig)
    schema.model, schema.data = OmegaConf.structured(ModelConfig), OmegaConf.structured(DataConfig)
    unset = object()
    for override in overrides:
        key = override.key_or_group
        node = OmegaConf.select(schema, key, default=unset, throw_on_missing=False)
        if node is unset or OmegaConf.is_config(node) or override.is_delete():
            continue
        if override.is_sweep_override():
            if not override.is_choice_sweep():
                continue
            values = list(override.sweep_string_iterator())
        else:
            values = [override.value()]
        for value in values:
            if isinstance(value, str) and "${" in value:
                continue  # resolved later, by Hydra
            try:
                OmegaConf.update(schema.copy(), key, value, merge=True)
            except ValidationError as error:
                reason = str(error).splitlines()[0]
                _refuse(f"{key}={value!r}: {reason}")


class StartChecks(Callback):
    """Checks made before Hydra writes anything (the job's folder, ``.hydra/``, the sweep's
    multirun.yaml): no credential in a URI, and a folder Hydra can write to."""

    @staticmethod
    def _no_credentials(config: DictConfig) -> None:
        said = [str(config.tracking.get("uri") or ""), *config.hydra.overrides.task]
        if any(_CREDENTIALS.search(text) for text in said):
            _refuse("tracking.uri holds credentials (user:password@); they would be written to "
                    "Hydra's files and MLflow: set MLFLOW_TRACKING_USERNAME and "
                    "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) instead")

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._no_credentials(config)
        _writable(str(config.hydra.run.dir), "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._no_credentials(config)
        _writable(str(config.hydra.sweep.dir), "hydra.sweep.dir")


def _knob_of(path: str, cfg: DictConfig) -> str:
    """The setting that chose where ``path`` is (for the error line), or ""."""
    tracking = cfg.get("tracking", {})
    places = {"tracking.artifact_location": tracking.get("artifact_location"),
              "tracking.uri": tracking.get("uri"),
              "hydra.runtime.output_dir": HydraConfig.get().runtime.output_dir}
    for knob, given in places.items():
        place = str(given or "").removeprefix("sqlite:///").removeprefix("file://")
        if place and (path == place or path.startswith(place.rstrip("/") + "/")
                      or Path(place).parent == Path(path).parent):
            return f" ({knob}={given})"
    return ""


def _full_disk(error: BaseException | None) -> bool:
    """A full disk anywhere in the chain: writers that name no file (shutil's copy into the
    artifact store, pyarrow) raise ENOSPC without a filename, or only say it in words."""
    while error is not None:
        if isinstance(error, OSError) and (error.errno in (errno.ENOSPC, errno.EDQUOT)
                                           or "No space left on device" in str(error)):
            return True
        error = error.__cause__ or error.__context__
    return False


def user_error(error: Exception, cfg: DictConfig) -> Exception:
    """A folder or disk that refuses a write, as an LwError naming the path (else ``error``)."""
    if isinstance(error, OSError) and error.errno in _UNWRITABLE and error.filename:
        path = str(error.filename)
        return LwError(f"cannot write {path}{_knob_of(path, cfg)}: {error.strerror}; choose "
                       "a writable folder with free space")
    if _full_disk(error):
        places = [f"{knob}={value}" for knob, value in (
            ("hydra.runtime.output_dir", HydraConfig.get().runtime.output_dir),
            ("tracking.artifact_location", cfg.tracking.get("artifact_location")),
            ("tracking.uri", cfg.tracking.get("uri"))) if value]
        return LwError(f"No space left on device while writing the job's files or artifacts "
                       f"({', '.join(places)}); free space there or choose other folders")
    return error
