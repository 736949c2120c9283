"""Structured channel pruning: the pass (`pruner`) and the channel dependency groups it removes
channels through (`channels`, registered as the `channel_groups` analysis)."""

from onnxopt.passes.prune.pruner import Prune

__all__ = ["Prune"]
