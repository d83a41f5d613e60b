"""Inference: the evaluation protocol, `eval`, `predict` and `export` of checkpoints."""
