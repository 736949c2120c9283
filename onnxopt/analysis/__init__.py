"""Analyses of a graph that passes and reports read: tensor shapes and dtypes, statistics (MACs,
parameters, bytes)."""
