"""Scoring models: the held-out LM loss protocol (`loss`) and lm-evaluation-harness tasks (`harness`, `tasks/`)."""
