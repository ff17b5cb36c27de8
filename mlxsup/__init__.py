"""mlxsup: the rollout server RL trainers call to generate from MLX language models."""

__version__ = "0.1.0"
