"""Pure tensor kernels of the metrics (shapes and formulas in each docstring); the declarations
in lw.metrics call them. Nothing here imports beyond torch, numpy, scipy and lw.errors."""
