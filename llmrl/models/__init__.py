"""The policy (LoRA on a causal LM, value head, reference by disabling the adapter), model sources, the
shared-prompt forward, learned reward models, and export as a plain transformers model."""
