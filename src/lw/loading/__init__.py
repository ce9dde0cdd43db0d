"""Loading: the hub, one adapter per architecture, models by source, data sources and prompt
building, answers (the LM head), paths and hashes. Imports config, metrics and errors only."""
