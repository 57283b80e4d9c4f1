"""The embedded default: a tiny GPT-2 and a character tokenizer built in-process, and its supervised warm start.
Only the command line imports this package (tests/test_architecture.py checks it)."""
