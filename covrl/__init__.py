"""covrl: Megatron-Core RL post-training with covariance-based entropy control."""

__version__ = "0.1.0"
