"""prompt_entropy: the matrix entropy of each prompt's token Gram matrix, per layer (METRICS.md,
"Prompt entropy"), from the Gram spectra the forward pass keeps (any alpha, normalization)."""

from __future__ import annotations

from dataclasses import dataclass

from lw.errors import check
from lw.metrics.functional import sublayers
from lw.metrics.functional.entropy import spectrum_matrix_entropy
from lw.metrics.registry import Metric, Output


@dataclass
class PromptEntropyKnobs:
    alpha: float = 1.0               # Renyi order; 1 = Shannon

    def __post_init__(self) -> None:
        check(self.alpha > 0,
              f"metric.prompt_entropy.alpha={self.alpha}: must be > 0 (1 = Shannon)")


def headline(job) -> str:
    """The per-prompt series that metrics built on prompt entropy read (dip, mc_accuracy,
    overlap): the max normalization, else the first one asked for."""
    norms = job.metric.normalizations
    return f"prompt_entropy/{'max' if 'max' in norms else norms[0]}"


def _compute(inputs) -> Output:
    m = inputs.job.metric

    def entropies(spectra):
        values = spectrum_matrix_entropy(
            spectra, inputs.rows.unsqueeze(-1).expand(spectra.shape[:-1]),
            inputs.info.hidden_size, alpha=inputs.knobs.alpha, compat=m.compat,
            normalizations=tuple(m.normalizations))
        return {f"prompt_entropy/{k}": v for k, v in values.items()}

    product = f"spectrum/{m.compat}"
    values = entropies(inputs.products[product])
    if inputs.sublayers:
        # prompt_entropy/<norm>/attn, .../mlp: after block l's attention / MLP addition
        values.update(sublayers.at_points(inputs.products, product, entropies, values))
    return Output(per_prompt=values)


METRIC = Metric(
    name="prompt_entropy",
    definition="Prompt entropy (token level, one value per prompt per layer)",
    compute=_compute, default=True, needs=("tokens",),
    knobs=PromptEntropyKnobs,
    logs={"prompt_entropy/": None}, summaries={"prompt_entropy/max": "min"},
    agreement=("prompt_entropy/",), shared_knobs=("compat", "normalizations"),
    products=lambda job: [f"spectrum/{job.metric.compat}",
                          *sublayers.products(job, [f"spectrum/{job.metric.compat}"])],
    description="matrix entropy of each prompt's token Gram matrix (with "
                "extraction.sublayers=true also after each block's attention addition, "
                "prompt_entropy/max/attn for the max normalization, and after its MLP "
                "addition, prompt_entropy/max/mlp)")
