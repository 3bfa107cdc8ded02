"""Feature-space posterior of the Bayesian linear model in sketch space (docs/design.md, "Posterior"): algebra
only, float64. Featurising, sharding, LCMD centres and progress belong to ntkal.acquisition.

precision.py: Accumulator, Λ, its Cholesky with jitter, variances; residual.py: the error-aware score's
residual model and calibration; model.py: the Posterior that holds both, with its plain state.
"""
from .model import STATE_FORMAT, Posterior
from .precision import (KEEP_FOR_CALIBRATION, Accumulator, Precision, ResidualSums, cholesky_inverse, gram,
                        robust_cholesky, tril_inverse)
from .residual import Predictive, ResidualModel

__all__ = ["Accumulator", "KEEP_FOR_CALIBRATION", "Posterior", "Precision", "Predictive", "ResidualModel",
           "ResidualSums", "STATE_FORMAT", "cholesky_inverse", "gram", "robust_cholesky", "tril_inverse"]
