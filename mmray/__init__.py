"""mmray: train and batch-score text+image fusion models on Ray. Parquet in, Parquet out.

Layout (data flows one way: storage -> preprocess -> train | score -> storage):
    config.py   typed config          data/   schema, storage, preprocessing, synthetic data
    models/     encoders, fusions     train/  per-worker loop + TorchTrainer launcher
    score/      batch inference       cli.py  the `mmray` command
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
