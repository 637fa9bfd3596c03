"""Evaluation: sample metrics, classifiers and the linear probe."""
