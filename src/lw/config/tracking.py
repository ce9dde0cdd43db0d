"""The tracking part of the schema (``tracking.*``): where runs go. Apart from the rest of the
schema so that readers of runs (``lw.report``, ``lw.sync``) load it without the metric
registry (and torch)."""

from __future__ import annotations

from dataclasses import dataclass

from lw.errors import check as _check

# MLflow tracking stores: a server, a database (SQLAlchemy) or a local folder
TRACKING_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "file",
                    "databricks")


@dataclass
class TrackingConfig:
    name: str = "local"
    uri: str | None = None        # None: MLFLOW_TRACKING_URI, else ./mlruns/mlflow.db
    artifact_location: str | None = None  # None: beside a SQLite store (./mlruns/artifacts)
    experiment: str = "lw"
    rerun: bool = False           # run a job even if a FINISHED run with its lw.job_hash exists

    def __post_init__(self) -> None:
        _check(bool(self.experiment and self.experiment.strip()),
               f"tracking.experiment={self.experiment!r}: name an MLflow experiment (e.g. lw)")
        scheme = (self.uri or "").partition("://")[0].partition("+")[0]
        _check(not self.uri or "://" not in self.uri or scheme in TRACKING_SCHEMES,
               f"tracking.uri={self.uri.split('@')[-1] if self.uri else ''!r}: scheme "
               f"{scheme!r} is not one of {', '.join(TRACKING_SCHEMES)} (or a folder path)")
