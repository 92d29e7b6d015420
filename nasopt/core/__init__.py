"""The data model of a search: architectures and spaces (genes, sampling, how a space is found),
strategies' interface, objectives and budgets, Pareto ranking, metrics, configuration, datasets,
and the user-facing error type."""
