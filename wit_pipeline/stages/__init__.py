"""The pipeline's stages, in order: gather, balance (pre-balance), download, dedup, balance, score,
shards. Each is a pure core plus Beam transforms over it; ``wit_pipeline.pipeline`` wires them."""
