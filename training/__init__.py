"""Offline training: data, the training loop, evaluation and the command line."""
