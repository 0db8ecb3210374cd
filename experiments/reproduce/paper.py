"""The paper's own numbers (Cui et al., 2025, Qwen2.5-7B), in one place.

``SETTINGS``: its entropy-control hyper-parameters (the authors' recipe scripts): Clip-Cov
clips a ratio ``r = 2e-4`` of the tokens in the covariance band (1, 5); KL-Cov penalises
a ratio ``k = 2e-3`` with ``beta = 1``.

``COV_TOP_002`` / ``COV_MEAN``: its step-1 token covariance (Table 1 as quoted in its
text): the mean over the top 0.02 % of the tokens, and over all tokens. The report
prints them under the runs' own.

``KL_COV_NET_SHARE``: the share of net covariance its KL-Cov tokens carry, ``k`` times
the mean covariance of the top ``k`` over the mean of all tokens, with Table 1's values
at ``k = 2e-3``: about 2. The tiny task's ``k`` is chosen where the same holds.

``CLIPFRAC_RANGE``: the PPO clip fractions typical of RL on 7B-32B models at lr 5e-7 to
1e-6 with 8 updates per rollout batch: a few tenths of a percent to a few percent.
"""

from __future__ import annotations

__all__ = ["CLIPFRAC_RANGE", "COV_MEAN", "COV_TOP_002", "KL_COV_NET_SHARE", "SETTINGS"]

SETTINGS = {"clip_cov_ratio": 2e-4, "kl_cov_ratio": 2e-3, "kl_cov_beta": 1.0}
COV_TOP_002 = 5.65
COV_MEAN = 0.003
KL_COV_NET_SHARE = 2.0
CLIPFRAC_RANGE = (0.002, 0.05)
