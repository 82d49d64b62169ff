"""The data layer: storage (local / S3), schema check, text and image preprocessing, labels, the Ray
Data pipeline with its quarantine, and synthetic demo data. Never imports a model."""

__all__ = [
    "image",
    "labels",
    "pipeline",
    "prepare",
    "preprocess",
    "schema",
    "storage",
    "synthetic",
    "text",
    "transforms",
]
