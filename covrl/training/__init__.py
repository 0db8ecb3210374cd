"""Training: the PPO update of one mini-batch on the megatron-core policy."""

from covrl.training.update import PolicyBatch, UpdateResult, ppo_update

__all__ = ["PolicyBatch", "UpdateResult", "ppo_update"]
