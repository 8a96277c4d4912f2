"""Training and evaluation: ``python -m wit_pipeline.train`` (see docs/train.md)."""
