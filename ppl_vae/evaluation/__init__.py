"""Evaluation of trained models: saved runs read back and scored again, and the estimator
comparison."""
