"""Sampling completions: llmrl's decode loop, the optional vLLM engine, and the Experience batch."""
