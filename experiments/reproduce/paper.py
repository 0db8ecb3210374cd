"""The paper's own numbers (Cui et al., 2025, Qwen2.5-7B), in one place.

``SETTINGS``: its entropy-control hyper-parameters (verl's recipes): Clip-Cov clips a
ratio ``r = 2e-4`` of the tokens in the covariance band (1, 5); KL-Cov penalises a ratio
``k = 2e-3`` with ``beta = 1``. The plan runs KL-Cov with them next to the tiny task's
own choices.

``COV_TOP_002`` / ``COV_MEAN``: its step-1 token covariance (Table 1 as quoted in its
text): the mean over the top 0.02 % of the tokens, and over all tokens. The report
prints them under the runs' own.
"""

from __future__ import annotations

__all__ = ["COV_MEAN", "COV_TOP_002", "SETTINGS"]

SETTINGS = {"clip_cov_ratio": 2e-4, "kl_cov_ratio": 2e-3, "kl_cov_beta": 1.0}
COV_TOP_002 = 5.65
COV_MEAN = 0.003
