"""Layers across training (issue 25): lw.LayerwiseCallback measures a model while it trains
(lw.training.callback). The top layer: it may import lw.api and everything below."""
