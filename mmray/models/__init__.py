"""Models: encoders (tiny, Hugging Face text, torchvision image), the five fusions, the multi-task
classifier and the one builder that assembles them from config. Never imports Ray."""

__all__ = ["builder", "classifier", "encoders", "freeze", "fusion", "hf", "vision"]
