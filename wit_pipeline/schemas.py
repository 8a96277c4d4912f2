"""Arrow schemas of the records that pass between stages (see docs/data-format.md).

Defined once here so that the writer of a format and its readers cannot drift apart.
"""

from __future__ import annotations

import pyarrow as pa

# One image/caption pair as gather writes it (candidates/*.parquet); the download stage carries
# these columns into its shard tables, pair by pair.
CANDIDATE_SCHEMA = pa.schema(
    [
        ("uid", pa.string()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("query_ids", pa.list_(pa.int32())),
        ("source", pa.string()),
        ("page_url", pa.string()),
        ("language", pa.string()),
        ("language_score", pa.float32()),
    ]
)
