"""The search: the Optuna study and what it records (`study`, no training code) and one trial = prune + short KD (`trial`)."""
