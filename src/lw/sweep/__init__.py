"""The sweep: the `lw.run` command (one job, or Hydra's multirun), the start checks, the parent
run's callback, run names and the after-sweep comparisons (cross-model CKA)."""
