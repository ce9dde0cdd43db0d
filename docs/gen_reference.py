"""The reference pages, generated from the code at every `mkdocs build` (mkdocs-gen-files), so
they cannot drift from it:

- reference/config.md       the config dataclasses (lw.config.schema): every option, its type,
                            default, comment and checks; and the options of each config group
                            (conf/<group>/*.yaml, with their header comments)
- reference/metrics.md      the metric registry: description, definition (docs/METRICS.md's
                            section), knobs, logged series with higher-is-better, summaries,
                            needs, version, cost beside the forward pass (bench/metric_cost.json)
- reference/cli.md          every command's argparse parser (and lw.run's Hydra flags)
- reference/environment.md  lw.environment.VARIABLES
- reference/logged.md       lw.tracking.keys: every tag, metric key and artifact of a run
- reference/architectures.md  lw.loading.architectures.ARCHITECTURES

A section that the code names but the docs do not hold (a metric's `definition` missing from
METRICS.md) raises: the strict build fails.

    python docs/gen_reference.py OUT     # the same pages into a folder, without mkdocs
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import json
import re
import sys
import textwrap
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


# ---- dataclasses: options, defaults, comments, checks ---------------------------------------

def _comments(cls) -> dict[str, str]:
    """Each field's comment in the class source: the comment at the end of its line, after the
    block of comment lines just above it."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
    lines = source.splitlines()
    found: dict[str, str] = {}
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above, line = [], node.lineno - 1
        while line >= 1 and lines[line - 1].strip().startswith("#"):
            above.insert(0, comments.get(line, ""))
            line -= 1
        trailing = [comments[n] for n in range(node.lineno, node.end_lineno + 1)
                    if n in comments and not lines[n - 1].strip().startswith("#")]
        found[node.target.id] = " ".join(above + trailing).replace("|", "\\|")
    return found


def _checks(cls) -> dict[str, list[str]]:
    """Each field's checks in ``__post_init__``: ``one_of`` as the accepted values, ``check``
    as its condition (``self.`` dropped)."""
    post = cls.__dict__.get("__post_init__")
    if post is None:
        return {}
    tree = ast.parse(textwrap.dedent(inspect.getsource(post)))
    names = vars(sys.modules[post.__module__])
    found: dict[str, list[str]] = {}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
            continue
        kind = node.func.id.lstrip("_")
        if kind == "one_of" and isinstance(node.args[0], ast.Constant):
            values = eval(compile(ast.Expression(node.args[2]), "<check>", "eval"), names)
            field = node.args[0].value.rsplit(".", 1)[-1]
            found.setdefault(field, []).append("one of " + ", ".join(f"`{v}`" for v in values))
        elif kind == "check":
            condition = node.args[0]
            fields = [n.attr for n in ast.walk(condition) if isinstance(n, ast.Attribute)
                      and isinstance(n.value, ast.Name) and n.value.id == "self"]
            text = f"`{ast.unparse(condition).replace('self.', '')}`"
            if not fields:  # a condition on a local: its message says what it checks
                text = _message(node.args[1])
            for field in dict.fromkeys(fields) or ["(job)"]:
                found.setdefault(field, []).append(text.replace("|", "\\|"))
    return found


def _message(node: ast.expr) -> str:
    """A check's message with its formatted values as ``…``."""
    if isinstance(node, ast.Constant):
        return str(node.value)
    if isinstance(node, ast.JoinedStr):
        return "".join(str(v.value) if isinstance(v, ast.Constant) else "…" for v in node.values)
    if isinstance(node, ast.BinOp):
        return _message(node.left) + _message(node.right)
    return "…"


def _default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
        if dataclasses.is_dataclass(value):
            return "(group)"
    else:
        return ""
    if value == "???":
        return "required"
    text = (value or '""') if isinstance(value, str) else json.dumps(value)
    return f"`{text}`".replace("|", "\\|")


def _type(field: dataclasses.Field) -> str:
    text = field.type if isinstance(field.type, str) else getattr(field.type, "__name__",
                                                                      str(field.type))
    return f"`{text}`".replace("|", "\\|")


def options_table(cls, prefix: str, skip: tuple[str, ...] = ()) -> str:
    comments, checks = {}, {}
    for base in reversed([c for c in cls.__mro__ if dataclasses.is_dataclass(c)]):
        comments.update(_comments(base))  # inherited fields (a pairwise measure's knobs)
        for field, found in _checks(base).items():
            checks.setdefault(field, []).extend(found)
    rows = ["| option | type | default | meaning | checked |", "|---|---|---|---|---|"]
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        rows.append(f"| `{prefix}{field.name}` | {_type(field)} | {_default(field)} | "
                    f"{comments.get(field.name, '')} | "
                    f"{'; '.join(checks.get(field.name, []))} |")
    whole = checks.get("(job)")
    return "\n".join(rows) + ("\n\nAcross options: " + "; ".join(whole) if whole else "")


def _yaml_header(path: Path) -> str:
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        if not line.startswith("# @package"):
            lines.append(line.lstrip("#").strip())
    return " ".join(lines).replace("|", "\\|")


def config_page() -> str:
    from lw.config import schema
    from lw.config.tracking import TrackingConfig
    from lw.loading.paths import CONF_DIR

    groups = {"model": schema.ModelConfig, "data": schema.DataConfig,
              "perturbation": schema.PerturbationConfig, "tracking": TrackingConfig,
              "extraction": schema.ExtractionConfig}
    out = ["# Config reference",
           "",
           "Generated from the config dataclasses (`lw.config.schema`) and lw's `conf/` at "
           "every docs build. A job's config is composed by Hydra from the groups below "
           "(`model=smollm2`), then any option can be set on the command line "
           "(`data.n_prompts=256`). Every value is checked before any model loads; a bad one "
           "gets one line naming it. Your own options go in your own `conf/` folder "
           "([own data](../how-to/own-data.md), [own model](../how-to/own-model.md)).",
           "",
           "## Top level", "",
           options_table(schema.LwConfig, "", skip=tuple(groups) + ("metric",)),
           ""]
    for group, cls in groups.items():
        out += [f"## `{group}`", ""]
        folder = CONF_DIR / group
        if folder.is_dir():
            out += [f"Options of the group (`{group}=<option>`, from `conf/{group}/`):", "",
                    "| option | what it is |", "|---|---|"]
            out += [f"| `{p.stem}` | {_yaml_header(p)} |" for p in sorted(folder.glob("*.yaml"))]
            out += [""]
        out += [options_table(cls, f"{group}.", skip=("name",) if folder.is_dir() else ()),
                ""]
    out += ["## `metric`", "",
            "Shared by the entropy metrics, then one node per metric with knobs "
            "(`metric.<name>.<knob>`: [metrics reference](metrics.md)).", "",
            "| option | default | accepted |", "|---|---|---|",
            f"| `metric.compat` | `'paper'` | one of "
            f"{', '.join(f'`{m}`' for m in schema.COMPAT_MODES)} "
            "([the two formulas](../explanation/formulas.md)) |",
            f"| `metric.normalizations` | `{list(schema.NORMALIZATIONS)}` | a non-empty list of "
            f"{', '.join(f'`{n}`' for n in schema.NORMALIZATIONS)} |", ""]
    from lw.config.training import SeqVCRConfig, TrainConfig

    out += ["## `train` (the training study)", "",
            "The keys of the Hydra callback `lw.training.study.TrainFirst` in an experiment "
            "yaml (`hydra.callbacks.train_first`), not job options: "
            "[the training study](../how-to/training-study.md).", "",
            options_table(TrainConfig, "train.", skip=("seq_vcr",)), "",
            options_table(SeqVCRConfig, "train.seq_vcr."), ""]
    experiments = sorted((CONF_DIR / "experiment").glob("*.yaml"))
    out += ["## Experiments (`+experiment=<name>`)", "",
            "Each pins a study of the papers (models, data, metrics, sweep):", "",
            "| experiment | what it runs |", "|---|---|"]
    out += [f"| `{p.stem}` | {_yaml_header(p)} |" for p in experiments]
    return "\n".join(out) + "\n"


# ---- metrics --------------------------------------------------------------------------------

def _sections(markdown: str) -> dict[str, str]:
    """METRICS.md's `## ` sections by title."""
    parts = re.split(r"^## +(.+)$", markdown, flags=re.M)
    found = {title.strip(): body.strip()
             for title, body in zip(parts[1::2], parts[2::2], strict=True)}
    for title, body in list(found.items()):  # one bullet: "<title>/<bold term>"
        for bullet in re.split(r"^(?=- \*\*)", body, flags=re.M)[1:]:
            term = re.match(r"- \*\*(.+?)\*\*", bullet).group(1)
            found[f"{title}/{term}"] = bullet.strip()
    return found


def _anchor(title: str) -> str:
    """The anchor Python-Markdown's toc gives a heading."""
    slug = re.sub(r"[^\w\s-]", "", title.lower()).strip()
    return re.sub(r"[-\s]+", "-", slug)


def bench_file(name: str) -> dict:
    """A `make bench` result committed beside bench.py ({} when it was not run)."""
    path = ROOT / "bench" / name
    return json.loads(path.read_text()) if path.exists() else {}


def metrics_page() -> str:
    from lw.metrics import registry

    sections = _sections((DOCS / "METRICS.md").read_text())
    costs, pairwise = bench_file("metric_cost.json"), bench_file("pairwise.json")
    every = registry.every()
    out = ["# Metrics reference", "",
           "Generated from the metric registry (`lw.metrics.registry`) at every docs build: "
           "each metric is declared once, in its own module, as a `Metric`. Definitions and "
           "formulas are [METRICS.md](../METRICS.md)'s. Per-layer series are logged with step "
           "= layer and again over relative depth ([logged keys](logged.md)); ↑ higher is "
           "better, ↓ lower is better. Run metrics with `metrics='[prompt_entropy,cka]'`; the "
           "default list is " + ", ".join(f"`{m.name}`" for m in every.values() if m.default)
           + ".", ""]
    if costs:
        out += [f"*Cost / forward pass*: {costs['what']}", ""]
    if pairwise:
        out += [f"*Matrix / forward pass* (pairwise measures): {pairwise['what']}", ""]
    out += ["| metric | needs | default | cost / forward pass | matrix / forward pass |",
            "|---|---|---|---|---|"]
    for m in every.values():
        cost = costs.get("metrics", {}).get(m.name)
        matrix = pairwise.get("measures", {}).get(m.name, {}).get("over_floor")
        out.append(f"| [`{m.name}`](#{m.name}) | {', '.join(m.needs)} | "
                   f"{'yes' if m.default else ''} | "
                   f"{'' if cost is None else f'{cost:.3f}'} | "
                   f"{'' if matrix is None else f'{matrix:.3f}'} |")
    out.append("")
    for m in every.values():
        module = sys.modules.get(m.compute.__module__)
        doc = inspect.getdoc(module) if module is not None else ""
        out += [f"## {m.name}", "", f"*{m.description}* — version {m.version}, {m.source}; "
                f"needs {', '.join(m.needs)}" + (f"; at least {m.min_prompts} prompts"
                                                 if m.min_prompts > 1 else "")
                + (f"; reads {', '.join(m.uses)}" if m.uses else ""), ""]
        if doc:
            out += [doc, ""]
        if m.definition:
            if m.definition not in sections:
                raise KeyError(f"metric {m.name}: definition section {m.definition!r} is not in "
                               f"docs/METRICS.md (sections: {', '.join(sections)})")
            title = m.definition.split("/")[0]
            out += [f"**Definition** ([METRICS.md](../METRICS.md#{_anchor(title)})):",
                    "", sections[m.definition], ""]
        if m.knobs is not None:
            out += ["**Knobs**", "", options_table(m.knobs, f"metric.{m.name}."), ""]
        if m.shared_knobs:
            out += ["Also reads " + ", ".join(f"`metric.{k}`" for k in m.shared_knobs)
                    + " ([config](config.md#metric)).", ""]
        arrows = {True: "↑", False: "↓", None: ""}
        logs = ", ".join(f"`{k}{'*' if k.endswith('/') else ''}` {arrows[v]}".strip()
                         for k, v in m.logs.items())
        out += [f"**Logs** {logs}", ""]
        if m.summaries:
            out += ["**Summaries** " + ", ".join(f"the layer of the {how} of `{k}`"
                                                 for k, how in m.summaries.items()), ""]
        if m.scores:
            out += ["**Downstream scores** " + ", ".join(f"`{s}`" for s in m.scores)
                    + ": their best layer, and how every agreement series tracks them", ""]
        if m.across_models is not None:
            out += ["**Across models**: compared between the models of a sweep at its end, on "
                    "the parent run (`cross_" + m.name + "/...`)", ""]
    return "\n".join(out) + "\n"


# ---- commands, environment, logged keys, architectures --------------------------------------

def cli_page() -> str:
    import lw.crossmodel
    import lw.offline
    import lw.report
    import lw.server
    import lw.sync

    out = ["# Command reference", "",
           "Generated from each command's argparse parser at every docs build.", "",
           "## `python -m lw.run`", "",
           "The sweep command is Hydra's: its arguments are config overrides "
           "([config reference](config.md)), plus Hydra's own flags:", "",
           "| flag | what it does |", "|---|---|",
           "| `-m`, `--multirun` | a sweep: every combination of comma-separated values, one "
           "job each, under one MLflow parent run |",
           "| `--config-dir DIR` | your own `conf/` folder, searched before lw's (your models, "
           "data sets, experiments) |",
           "| `--cfg job` | print the composed config and stop |",
           "| `--help` | the config groups and their options |",
           "| `hydra/launcher=joblib` / `submitit_local` / `submitit_slurm` | where the jobs "
           "of a sweep run ([SLURM](../how-to/slurm.md)) |", ""]
    for module in (lw.report, lw.sync, lw.crossmodel, lw.server, lw.offline):
        parser = module.parser()
        parser.formatter_class.width = 96
        summary = " ".join((module.__doc__ or "").split("\n\n")[0].split())
        out += [f"## `{parser.prog}`", "", summary, "",
                "```text", parser.format_help().rstrip(), "```", ""]
    return "\n".join(out) + "\n"


def environment_page() -> str:
    from lw.environment import GROUPS, VARIABLES

    out = ["# Environment variables", "",
           "Generated from `lw.environment` at every docs build; a test checks that every "
           "variable the code and `conf/` use is declared there. Secrets (🔒) come from the "
           "environment only: lw never logs them, writes them to a file or puts them on a "
           "command line. *Internal* ones are lw's plumbing between its own processes: not "
           "meant to be set by hand.", ""]
    for group, title in GROUPS.items():
        rows = [v for v in VARIABLES if v.group == group]
        out += [f"## {title}", "", "| variable | meaning | default | read by |",
                "|---|---|---|---|"]
        for v in rows:
            marks = (" 🔒" if v.secret else "") + (" *internal*" if v.internal else "")
            out.append(f"| `{v.name}`{marks} | {v.meaning} | {v.default} | {v.read_by} |")
        out.append("")
    return "\n".join(out) + "\n"


def logged_page() -> str:
    from lw.tracking import keys

    def table(rows) -> list[str]:
        return (["| key | on | meaning |", "|---|---|---|"]
                + [f"| `{k.pattern}` | {k.on} | {k.meaning} |" for k in rows] + [""])

    return "\n".join(
        ["# What a run logs", "",
         "Generated from `lw.tracking.keys` at every docs build; a test runs a real sweep and "
         "checks every tag, metric key and artifact it logged is declared there. `*` stands "
         "for any text. *on*: a job's run, the sweep's parent run, or both. A job's files are "
         "also in its folder on disk first ([where results go](../results.md)).", "",
         "## Tags", "", *table(keys.TAGS),
         "## Params", "", *table(keys.PARAMS),
         "## Metrics", "",
         "Each metric's own per-layer series (step = layer, 0 = embeddings .. L = last "
         "layer), named in the [metrics reference](metrics.md), and:", "",
         *table(keys.METRICS),
         "## Artifacts", "", *table(keys.ARTIFACTS)]) + "\n"


def architectures_page() -> str:
    from lw.loading import architectures

    out = ["# Supported architectures", "",
           "Generated from `lw.loading.architectures` at every docs build. Any model of these "
           "`model_type`s (hub, local folder, random init) is measured; another architecture "
           "is declared there first ([how](../how-to/own-model.md)).", "",
           (architectures.__doc__ or "").strip(), "",
           "| model_type | config class | blocks | hidden-states layout | padded batches | "
           "last state after the final norm | attention module | residual (sub-layer states) |",
           "|---|---|---|---|---|---|---|---|"]
    for a in architectures.ARCHITECTURES.values():
        residual = a.residual or "no attention / MLP split"
        if a.parallel_switch:
            residual += f" (sequential when `{a.parallel_switch}` is false)"
        out.append(f"| `{a.model_type}` | `{a.config_class}` | `{a.blocks}` | {a.layout} | "
                   f"{'yes' if a.padding_safe else 'no (equal lengths)'} | "
                   f"{'yes' if a.last_state_after_final_norm else 'no final norm'} | "
                   f"{f'`{a.attention}`' if a.attention else 'none'} | {residual} |")
    return "\n".join(out) + "\n"


PAGES = {"reference/config.md": config_page, "reference/metrics.md": metrics_page,
         "reference/cli.md": cli_page, "reference/environment.md": environment_page,
         "reference/logged.md": logged_page, "reference/architectures.md": architectures_page}


def write_all(write) -> None:
    for path, page in PAGES.items():
        write(path, page())


if __name__ == "__main__":
    out_dir = Path(sys.argv[1])
    for path, page in PAGES.items():
        (out_dir / path).parent.mkdir(parents=True, exist_ok=True)
        (out_dir / path).write_text(page())
elif __name__ == "<run_path>":  # run by mkdocs-gen-files (runpy.run_path); imported: nothing
    import mkdocs_gen_files

    def _write(path: str, text: str) -> None:
        with mkdocs_gen_files.open(path, "w") as handle:
            handle.write(text)
        mkdocs_gen_files.set_edit_path(path, "gen_reference.py")

    write_all(_write)
