"""Inference: the ELBO estimators, what a program's structure is, the SVI loop, importance
sampling (per-point ELBO and IWAE scores) and the trainer."""
