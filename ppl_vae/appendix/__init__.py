"""Appendix: MLE and MAP as Pyro inference with AutoDelta guides, checked against closed
forms; full posteriors by NUTS with ArviZ summaries; how good the amortized q(z|x) is.

``python -m ppl_vae appendix coin|regression|decoder-map|posterior|all --out DIR``
"""

from .amortization import gaps, optimize_local, posterior_figure, true_posterior
from .beta_bernoulli import coin, coin_model
from .decoder_map import DecoderMAPVAE, gradient_identity, map_vs_weight_decay
from .inference import fit_delta, nuts, summary
from .regression import correlated_data, exact_posterior, linear_regression, regression_model

__all__ = ["DecoderMAPVAE", "coin", "coin_model", "correlated_data", "exact_posterior",
           "fit_delta", "gaps", "gradient_identity", "linear_regression", "map_vs_weight_decay",
           "nuts", "optimize_local", "posterior_figure", "regression_model", "summary",
           "true_posterior"]
