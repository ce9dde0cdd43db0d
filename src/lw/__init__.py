"""lw (layerwise): per-layer representation metrics of language models.

    import lw
    lw.load_sweep()      # the latest sweep's per-layer values, a tidy DataFrame
    lw.load_runs()       # its runs: tags and summaries
    lw.measure("smollm2", "wiki-vital", metrics=["prompt_entropy"], data__n_prompts=32)
    lw.LayerwiseCallback("wiki-vital", data__n_prompts=64)  # layers measured while it trains

Imports are lazy: ``python -m lw.server`` and ``python -m lw.report`` do not load torch.
"""

__all__ = ["LayerwiseCallback", "load_runs", "load_sweep", "measure"]


def __getattr__(name: str):
    if name == "LayerwiseCallback":
        from lw.training.callback import LayerwiseCallback

        return LayerwiseCallback
    if name in __all__:
        from lw import api

        return getattr(api, name)
    raise AttributeError(f"module 'lw' has no attribute {name!r}")
