"""CLIP-score filtering: a seed CLIP rates how well each caption describes its image.

The score is the cosine similarity of the image and caption embeddings of a seed model (LAION
kept pairs above 0.28 with OpenAI's ViT-B/32; DataComp's best simple filter kept the top 30% by
score). The seed may be an open_clip pretrained tag (downloaded by open_clip), a local checkpoint,
or a checkpoint written by ``wit_pipeline.train``: train on raw data, then filter with it.

Every pair (image, caption) is scored: after near-duplicate dedup a sample carries the captions
of every page that used its image, and a caption that does not describe the image leaves the
sample while the others stay. Modules, from pure to pipeline:

- ``model``: embeddings (each image once, each caption once) and pair scores;
  ``OpenClipModelHandler`` for Beam ``RunInference``; ``ScoreWithClip``;
- ``calibrate``: the threshold of every mode, and the auto threshold: the null of mismatched
  pairs, the mismatched share, the expected precision and recall (docs/score.md);
- ``core``: the filter core, pair by pair (``filter_pairs``, a ``stage.Result``);
- ``transforms``: ``ScoreSamples`` (``wit build --seed-model``: after dedup, before balancing)
  and ``FilterByClipScore``;
- ``rescore``: ``ScoreShards`` (``wit score``: finished shards in, scored shards out).
"""

from wit_pipeline.stages.score.calibrate import (
    DecideThreshold,
    Decision,
    MarkNullSamples,
    choose_threshold,
    decide,
    describe,
    histogram,
    null_scores,
    select_null,
    storey_pi0,
    top_fraction_threshold,
)
from wit_pipeline.stages.score.core import (
    LOW_SCORE,
    MISSING,
    STAGE,
    UNDECODABLE,
    filter_pairs,
    filter_scored,
)
from wit_pipeline.stages.score.model import (
    SCORE_FIELD,
    OpenClipModelHandler,
    SampleEmbedding,
    ScoreWithClip,
    embed_samples,
    score_pairs,
)
from wit_pipeline.stages.score.rescore import (
    SCORES_MODEL_FILE,
    ScoreShards,
    read_shard_records,
    scores_path,
    write_scored_shard,
)
from wit_pipeline.stages.score.transforms import (
    SCORE_FILE,
    SCORES_DIR,
    SCORES_SCHEMA,
    FilterByClipScore,
    ScoreSamples,
    compute_threshold,
)

__all__ = [
    "LOW_SCORE",
    "MISSING",
    "SCORES_DIR",
    "SCORES_MODEL_FILE",
    "SCORES_SCHEMA",
    "SCORE_FIELD",
    "SCORE_FILE",
    "STAGE",
    "UNDECODABLE",
    "DecideThreshold",
    "Decision",
    "FilterByClipScore",
    "MarkNullSamples",
    "OpenClipModelHandler",
    "SampleEmbedding",
    "ScoreSamples",
    "ScoreShards",
    "ScoreWithClip",
    "choose_threshold",
    "compute_threshold",
    "decide",
    "describe",
    "embed_samples",
    "filter_pairs",
    "filter_scored",
    "histogram",
    "null_scores",
    "read_shard_records",
    "score_pairs",
    "scores_path",
    "select_null",
    "storey_pi0",
    "top_fraction_threshold",
    "write_scored_shard",
]
