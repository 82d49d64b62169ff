"""Batch scoring: the predictor actor, the exactly-once commit, the scoring job, nightly partitions, and
evaluation of a checkpoint (label metrics, modality ablation)."""

__all__ = ["ablation", "commit", "finalize", "job", "label_metrics", "labeled", "lease", "nightly", "predictor"]
