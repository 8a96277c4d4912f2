"""Reading what balancing counts: only the query id columns of Parquet files.

Balancing must count every record before it draws any, so a runner given one PCollection for
both holds every record in between. Where the records are Parquet files, ``ReadQueryIds`` reads
them a second time, only their query id column chunks, for the counts
(``balance.BalanceSampleFiles`` and the pre-balance step do so; docs/balance.md).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence

import apache_beam as beam
import pyarrow as pa

from wit_pipeline import fileio
from wit_pipeline.errors import WitError


def query_id_columns(schema, *, pairs: bool) -> list[str]:
    """The Parquet column paths (``pyarrow.parquet.ParquetSchema``) to read for counting:
    ``query_ids``, or with ``pairs`` the pairs' ``query_ids`` (its path names the list level
    as the file's writer did: ``pairs.list.item.query_ids`` or ``pairs.list.element...``)."""
    for column in schema:
        parts = column.path.split(".")
        if pairs and parts[0] == "pairs" and "query_ids" in parts[1:]:
            return [".".join(parts[: parts.index("query_ids", 1) + 1])]
        if not pairs and parts[0] == "query_ids":
            return ["query_ids"]
    raise WitError(f"no {'pairs.' if pairs else ''}query_ids column in {schema.names}")


def read_row_groups(path: str, columns=None) -> Iterator[pa.Table]:
    """One Arrow table per row group of the Parquet file ``path``; ``columns(schema)`` picks
    the column paths to read (all when ``None``)."""
    import pyarrow.parquet as pq

    with fileio.open_file(path, "rb") as f:
        pf = pq.ParquetFile(f)
        names = columns(pf.schema) if columns else None
        for i in range(pf.num_row_groups):
            yield pf.read_row_group(i, columns=names)


def _read_query_ids(path: str, pairs: bool) -> Iterator[pa.Table]:
    return read_row_groups(path, functools.partial(query_id_columns, pairs=pairs))


class ReadQueryIds(beam.PTransform):
    """Parquet files -> one Arrow table per row group holding only the query ids (the files
    spread over workers, each read by one).

    What counting needs, at a fraction of a whole read (only the ``query_ids`` column chunks
    are decoded): ``{"records": whole read, "query_ids": this}`` lets ``PreBalance`` and
    ``BalanceSamples`` count from it and draw from a read that runs fused with the draw.
    ``pairs``: the pairs' ``query_ids`` (for ``balance.unit = pair``). The files are a
    ``file_pattern`` (listed when the pipeline runs) or a list of ``files``.
    """

    def __init__(self, *, file_pattern: str = "", files: Sequence[str] = (), pairs: bool = False):
        super().__init__()
        if bool(file_pattern) == bool(files):
            raise ValueError("give one of file_pattern and files")
        self._pattern = file_pattern
        self._files = list(files)
        self._pairs = pairs

    def expand(self, pbegin):
        from apache_beam.io import fileio as beam_fileio

        if self._pattern:
            paths = (
                pbegin
                | "Match" >> beam_fileio.MatchFiles(self._pattern)
                | "Paths" >> beam.Map(lambda m: m.path)
            )
        else:
            paths = pbegin | "Files" >> beam.Create(self._files, reshuffle=False)
        return (
            paths
            | "Spread" >> beam.Reshuffle()
            | "Read" >> beam.FlatMap(_read_query_ids, self._pairs)
        )
