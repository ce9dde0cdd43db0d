"""Cross-model CKA: for models measured on the same prompts, a layer x layer linear CKA matrix
for each pair, with both axes in relative depth (0 = embeddings, 1 = last layer).

Read from what the sweep left, never from a new forward pass: each job's composed config (the
run's ``config/config.yaml``) gives its forward hash, whose activation-cache entry holds its
pooled vectors (so the jobs need ``extraction.cache=true``); jobs are paired when everything
but the model is the same (data and its knobs, perturbation, extraction, seed), and compared
on the prompts both measured, matched by text (re-planned from the data: tokenizers keep
different prompts under ``data.min_tokens`` and order them differently).

Logged to the sweep's parent run: ``cross_cka/<a>__<b>.csv`` (rows: a's layers, column
``depth`` their relative depth; the other columns: b's layers, named by their relative depth),
a heat map ``figures/cross_cka_<a>__<b>.png`` and the metric ``cross_cka/<a>__<b>/depth_diagonal``
(mean CKA of each of a's layers with b's layer at the nearest relative depth),
``.../n_prompts``; when the sweep holds several groups of
paired jobs, each key ends in the rest of the run name (``__skip_first-1``). At the end of a
sweep this runs for the jobs that ran ``cka`` (the metric declares it: ``across_models``);
``python -m lw.crossmodel <parent run id>`` runs it on any finished sweep.
"""

from __future__ import annotations

import argparse

from lw.errors import LwError
from lw.sweep.crossmodel import cross_model, depth_diagonal


def parser() -> argparse.ArgumentParser:
    """The command's flags (also the docs' CLI reference)."""
    parser = argparse.ArgumentParser(prog="python -m lw.crossmodel",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("parent", help="the sweep's parent run id")
    parser.add_argument("--uri", default=None,
                        help="tracking URI (default: MLFLOW_TRACKING_URI, else ./mlruns/mlflow.db)")
    parser.add_argument("--debiased", action="store_true", help="unbiased HSIC")
    parser.add_argument("--all", action="store_true",
                        help="every job with a cache entry, not only those that ran cka")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    from lw.tracking.read import open_store

    try:
        client = open_store(args.uri)
        found = cross_model(client, args.parent, "cka", only_ran=not args.all,
                            debiased=args.debiased)
    except LwError as error:
        raise SystemExit(f"[lw] error: {error}") from None
    for key, matrix in found.items():
        print(f"{key}: {tuple(matrix.shape)}, depth diagonal {depth_diagonal(matrix):.3f}")


if __name__ == "__main__":
    main()
