"""The search loop (ask, evaluate, tell) and its ledger, the Optuna study: evaluators (supernet,
table), several workers on one study, and the supernet's above-chance check."""
