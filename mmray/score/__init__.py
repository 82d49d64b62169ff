"""Batch scoring: the predictor actor, the exactly-once commit, the scoring job and nightly partitions."""

__all__ = ["commit", "evaluate", "finalize", "job", "nightly", "predictor"]
