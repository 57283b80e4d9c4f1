"""Where processes and devices live: the single-process and DeepSpeed strategies, checkpoint files
and run folders."""
