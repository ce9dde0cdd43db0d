"""The job: stages (plan -> forward -> measure), extraction, the encoder, ranks, the activation
cache, perturbations, results, identity and figures. Knows nothing of tracking."""
