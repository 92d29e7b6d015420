"""Hardware targets: profiles, latency (measured and predicted from a look-up table), peak
activation memory, and the evaluator that adds them to a search."""
