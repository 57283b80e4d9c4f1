"""Training loops: the shared base (optimizer, checkpoints, evaluation), online RL, DPO, reward models."""
