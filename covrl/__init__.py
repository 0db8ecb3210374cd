"""covrl: Megatron-Core RL post-training with covariance-based entropy control.

Packages, lowest layer first (a package imports only from its own layer or lower):
:mod:`covrl.parallel` (process groups, parallel state, CPU shims), :mod:`covrl.ops`
(kernels on vocab-parallel logits and token tensors), :mod:`covrl.algorithms`
(Clip-Cov / KL-Cov selection, policy losses, advantages), :mod:`covrl.models` (the
megatron policy and its engine), :mod:`covrl.rollout` and :mod:`covrl.training` (vLLM
generation, the trainer and its :func:`covrl.training.ppo_update`). The README's
"Where each concept lives" table maps each concept to its module.
"""

__version__ = "0.1.0"
