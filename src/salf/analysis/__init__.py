"""Analysis: semantic basis, streaming transition trace, gains and cut policies.

See docs/method.md for the formula -> function map.
"""

from .basis import clear_cache, semantic_basis, weight_fingerprint
from .gains import (ALPHA_PRIOR, DEFAULT_POLICY, ONSET_FRACTION, R2_MIN, TIE_TOLERANCE,
                    VALID_POLICIES, benefit_curve, choose_cut, deviations, fit_depth_law,
                    inference_gains, prior_law, transition_onset)
from .trace import TAU, TargetCapture, Trace, TraceMeta, auc, trace

__all__ = [
    "semantic_basis", "weight_fingerprint", "clear_cache",
    "trace", "Trace", "TraceMeta", "TargetCapture", "TAU", "auc",
    "inference_gains", "fit_depth_law", "prior_law", "benefit_curve", "transition_onset",
    "choose_cut", "deviations",
    "ALPHA_PRIOR", "DEFAULT_POLICY", "R2_MIN", "TIE_TOLERANCE", "ONSET_FRACTION", "VALID_POLICIES",
]
