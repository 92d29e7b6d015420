"""Reading studies: tables (trials, Pareto set, comparisons), plots, the HTML report and optuna-
dashboard."""
