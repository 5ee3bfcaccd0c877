"""Evaluation of trained models: saved runs scored again, and the estimator comparison."""
