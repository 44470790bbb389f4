"""Metrics over a cohort: classification and multilabel (classification.py), detection (detection.py)."""
