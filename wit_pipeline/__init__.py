"""wit-pipeline."""
