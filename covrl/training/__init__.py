"""Training: the PPO update of one mini-batch on the megatron-core policy."""

from covrl.training.batch import PolicyBatch
from covrl.training.update import UpdateResult, ppo_update

__all__ = ["PolicyBatch", "UpdateResult", "ppo_update"]
