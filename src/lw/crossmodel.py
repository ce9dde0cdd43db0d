"""Compare the layers of models measured on the same prompts, by relative depth.

A pairwise measure (``--measure``, default cka) between every layer of one run's model and
every layer of another's, on the prompts both measured, by relative depth (0 = embeddings,
1 = last layer).

    python -m lw.crossmodel <parent run id>                  # a finished sweep's jobs
    python -m lw.crossmodel --uri <store> <run id> <run id>...   # any finished runs

A run's pooled vectors come from its logged ``results/pooled.pt`` (jobs run with
``extraction.log_pooled=true``: any store, any machine, e.g. two runs on the team server),
else from this machine's activation cache (``extraction.cache=true``). Prompts are matched by
the SHA-256 of their text (tokenizers keep different prompts under ``data.min_tokens``).

A sweep's comparison goes to its parent run (the sweep itself does this at its end for the
metrics that ran): ``cross_<measure>/<a>__<b>.csv`` (rows: a's layers, column ``depth`` their
relative depth; the other columns: b's layers, named by their relative depth), a heat map
``figures/cross_<measure>_<a>__<b>.png`` and the metrics ``cross_<measure>/<a>__<b>/
depth_diagonal`` (the mean over a's layers of the score with b's layer at the nearest
relative depth) and ``.../n_prompts``; a sweep of several groups of paired jobs appends the
rest of the run name to each key (``__skip_first-1``). Runs by id: the same, logged to a new
run ``crossmodel <a> x <b>`` of the first run's experiment (tag ``lw.crossmodel.of``), or,
for a user the store lets read but not write, into ``./crossmodel/<ids>/`` (printed).
"""

from __future__ import annotations

import argparse

from lw.errors import LwError
from lw.sweep.crossmodel import compare_runs, cross_model, depth_diagonal


def parser() -> argparse.ArgumentParser:
    """The command's flags (also the docs' CLI reference)."""
    parser = argparse.ArgumentParser(prog="python -m lw.crossmodel",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN",
                        help="a sweep's parent run id, or two or more finished run ids")
    parser.add_argument("--uri", default=None,
                        help="tracking URI (default: MLFLOW_TRACKING_URI, else ./mlruns/mlflow.db)")
    parser.add_argument("--measure", default="cka",
                        help="a pairwise metric (reference: metrics; cka, mutual_knn, ...)")
    parser.add_argument("--debiased", action="store_true", help="cka: the unbiased HSIC")
    parser.add_argument("--knob", action="append", default=[], metavar="NAME=VALUE",
                        help="a knob of the measure (repeatable), e.g. --knob k=20, --knob "
                             "keep=0.95; default: as the first run's job set them")
    parser.add_argument("--all", action="store_true",
                        help="a sweep: every job with pooled vectors, not only those that ran "
                             "the measure")
    return parser


def knob_values(measure: str, pairs: list[str]) -> dict:
    """``--knob NAME=VALUE`` as the measure's knobs, each checked by its knob class (a bad
    name or value is one line naming it)."""
    import dataclasses

    from lw.metrics import registry

    if not pairs:
        return {}
    metric = registry.get(measure)
    fields = {f.name: f for f in dataclasses.fields(metric.knobs or object)}
    given = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        if name not in fields or not _:
            raise LwError(f"--knob {pair!r}: {measure}'s knobs are "
                          f"{', '.join(fields) or 'none'} (NAME=VALUE)")
        kind = fields[name].type if isinstance(fields[name].type, type) else \
            {"int": int, "float": float, "bool": bool, "str": str}.get(str(fields[name].type), str)
        try:
            given[name] = (value.lower() in ("1", "true", "yes")) if kind is bool else kind(value)
        except ValueError:
            raise LwError(f"--knob {pair!r}: {name} takes "
                          f"{ {int: 'an integer', float: 'a number'}.get(kind, kind.__name__)}"
                          ) from None
    checked = metric.knobs(**given)  # the knob class's own checks run here
    return {name: getattr(checked, name) for name in given}


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    from lw.tracking.read import open_store

    if args.debiased and args.measure != "cka":
        raise SystemExit(f"[lw] error: --debiased is cka's; --measure {args.measure} has no "
                         "such knob")
    try:
        options = knob_values(args.measure, args.knob) | ({"debiased": True} if args.debiased
                                                           else {})
    except LwError as error:
        raise SystemExit(f"[lw] error: {error}") from None
    try:
        client = open_store(args.uri)
        if len(args.runs) == 1:
            where = f"parent run {args.runs[0]}"
            found = cross_model(client, args.runs[0], args.measure, only_ran=not args.all,
                                **options)
        else:
            where, found = compare_runs(client, args.runs, args.measure, **options)
            where = f"run {where}" if "/" not in where else where
    except LwError as error:
        raise SystemExit(f"[lw] error: {error}") from None
    for key, matrix in found.items():
        print(f"{key}: {tuple(matrix.shape)}, depth diagonal {depth_diagonal(matrix):.3f}")
    print(f"[lw] cross-model {args.measure}: {len(found)} pairs, in {where}")
    if not found:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
