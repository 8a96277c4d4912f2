"""Tables of URL/caption pairs: Parquet, CSV, TSV and JSONL (optionally compressed).

LAION, DataComp, CC3M/CC12M and most dataset dumps are such tables. The URL and caption columns
are found automatically (``url``/``URL``, ``caption``/``TEXT``/``text``/``alt``, then the same
names in any case) or named explicitly (``GatherConfig.url_column``/``caption_column``); an
optional ``page_url`` column is carried along. Parquet is read a batch of rows at a time,
CSV/TSV with Arrow's streaming reader, JSONL line by line: files of any size stream in bounded
memory.
"""

from __future__ import annotations

import collections
import csv
import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pyarrow as pa

from wit_pipeline import fileio
from wit_pipeline.config import GatherConfig
from wit_pipeline.errors import WitError
from wit_pipeline.stages.gather.readers import RawBatch, detect_format

URL_COLUMNS = ("url", "URL", "image_url", "img_url", "imageurl")
CAPTION_COLUMNS = ("caption", "TEXT", "text", "alt", "alt_text", "caption_text")
PAGE_URL_COLUMNS = ("page_url", "PAGE_URL", "pageurl")


@dataclass(frozen=True)
class Columns:
    url: str
    caption: str
    page_url: str | None

    @property
    def names(self) -> list[str]:
        return [c for c in (self.url, self.caption, self.page_url) if c is not None]


def _find(names: Sequence[str], explicit: str | None, candidates: Sequence[str]) -> str | None:
    if explicit is not None:
        return explicit if explicit in names else None
    for c in candidates:
        if c in names:
            return c
    lower = {n.lower(): n for n in names}
    for c in candidates:
        if c.lower() in lower:
            return lower[c.lower()]
    return None


def resolve_columns(names: Sequence[str], cfg: GatherConfig, *, path: str) -> Columns:
    """Pick the URL, caption and page-URL columns of a table; ``WitError`` when missing."""
    url = _find(names, cfg.url_column, URL_COLUMNS)
    caption = _find(names, cfg.caption_column, CAPTION_COLUMNS)
    shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
    if url is None:
        want = repr(cfg.url_column) if cfg.url_column else "url/URL/image_url"
        raise WitError(f"{path}: no URL column {want} (columns: {shown}); set --url-column")
    if caption is None:
        want = repr(cfg.caption_column) if cfg.caption_column else "caption/TEXT/text/alt"
        raise WitError(f"{path}: no caption column {want} (columns: {shown}); set --caption-column")
    page = _find(names, cfg.page_url_column, PAGE_URL_COLUMNS)
    if cfg.page_url_column is not None and page is None:
        raise WitError(f"{path}: no page URL column {cfg.page_url_column!r} (columns: {shown})")
    return Columns(url, caption, page)


def _as_strings(column: pa.ChunkedArray | pa.Array) -> list[str | None]:
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        column = column.cast(pa.string())
    return column.to_pylist()


def _open_text_stream(path: str):
    return fileio.open_file(path, "rb", compression="infer")


def table_columns(path: str, fmt: str) -> list[str]:
    """The column names of a table file (for validation before a run)."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        with fileio.open_file(path, "rb") as f:
            return list(pq.ParquetFile(f).schema_arrow.names)
    if fmt in ("csv", "tsv"):
        with _open_text_stream(path) as f:
            head = io.TextIOWrapper(f, encoding="utf-8", errors="replace", newline="").readline()
        delimiter = "\t" if fmt == "tsv" else ","
        row = next(csv.reader([head], delimiter=delimiter), [])
        if row:
            row[0] = row[0].removeprefix("\ufeff")
        return row
    if fmt == "jsonl":
        with _open_text_stream(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        doc = json.loads(line)
                    except ValueError:
                        raise WitError(f"{path}: first line is not JSON") from None
                    return list(doc) if isinstance(doc, dict) else []
        return []
    raise WitError(f"{path}: not a table format: {fmt}")


def check_table(path: str, cfg: GatherConfig) -> Columns:
    """Validate that a table file has the needed columns (raises ``WitError``)."""
    fmt = detect_format(path, cfg.input_format)
    try:
        names = table_columns(path, fmt)
    except WitError:
        raise
    except Exception as e:
        raise WitError(f"cannot read {path} as {fmt}: {e}") from None
    return resolve_columns(names, cfg, path=path)


def _iter_parquet(path: str, cfg: GatherConfig, batch_size: int, counter) -> Iterator[RawBatch]:
    import pyarrow.parquet as pq

    with fileio.open_file(path, "rb") as f:
        pf = pq.ParquetFile(f)
        cols = resolve_columns(pf.schema_arrow.names, cfg, path=path)
        for rb in pf.iter_batches(batch_size=batch_size, columns=cols.names):
            counter["table:rows"] += rb.num_rows
            urls = _as_strings(rb.column(cols.url))
            yield RawBatch(
                path,
                urls,
                _as_strings(rb.column(cols.caption)),
                _as_strings(rb.column(cols.page_url)) if cols.page_url else [None] * len(urls),
            )


def _iter_csv(
    path: str, cfg: GatherConfig, batch_size: int, counter, *, tsv: bool
) -> Iterator[RawBatch]:
    import pyarrow.csv as pcsv

    names = table_columns(path, "tsv" if tsv else "csv")
    cols = resolve_columns(names, cfg, path=path)
    bad = [0]

    def on_invalid(row) -> str:
        bad[0] += 1
        return "skip"

    parse = pcsv.ParseOptions(
        delimiter="\t" if tsv else ",",
        # TSV dumps (CC3M, LAION) do not quote fields; captions contain quote characters.
        quote_char=False if tsv else '"',
        newlines_in_values=not tsv,
        invalid_row_handler=on_invalid,
    )
    convert = pcsv.ConvertOptions(
        column_types={c: pa.string() for c in cols.names},
        include_columns=cols.names,
        strings_can_be_null=False,
        quoted_strings_can_be_null=False,
    )
    with _open_text_stream(path) as f:
        reader = pcsv.open_csv(
            f,
            read_options=pcsv.ReadOptions(block_size=8 << 20),
            parse_options=parse,
            convert_options=convert,
        )
        pending: list[pa.RecordBatch] = []
        rows = 0
        for rb in reader:
            pending.append(rb)
            rows += rb.num_rows
            while rows >= batch_size:
                table = pa.Table.from_batches(pending)
                yield _table_batch(path, table.slice(0, batch_size), cols, counter)
                rest = table.slice(batch_size)
                pending = rest.to_batches()
                rows = rest.num_rows
        if rows:
            yield _table_batch(path, pa.Table.from_batches(pending), cols, counter)
    if bad[0]:
        counter["table:bad_rows"] += bad[0]


def _table_batch(path: str, table: pa.Table, cols: Columns, counter) -> RawBatch:
    counter["table:rows"] += table.num_rows

    def col(name: str) -> list[str | None]:
        # Empty CSV fields are empty strings, not nulls: an empty URL or caption is missing.
        return [v or None for v in _as_strings(table.column(name))]

    urls = col(cols.url)
    return RawBatch(
        path,
        urls,
        col(cols.caption),
        col(cols.page_url) if cols.page_url else [None] * len(urls),
    )


def _text(value) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return str(value)
    return None


def _iter_jsonl(path: str, cfg: GatherConfig, batch_size: int, counter) -> Iterator[RawBatch]:
    cols: Columns | None = None
    batch = RawBatch(path)
    with _open_text_stream(path) as f:
        for raw in f:
            raw = raw.strip()
            if not raw:
                continue
            try:
                doc = json.loads(raw)
            except ValueError:
                counter["table:bad_rows"] += 1
                continue
            if not isinstance(doc, dict):
                counter["table:bad_rows"] += 1
                continue
            if cols is None:
                cols = resolve_columns(list(doc), cfg, path=path)
            counter["table:rows"] += 1
            batch.urls.append(_text(doc.get(cols.url)))
            batch.captions.append(_text(doc.get(cols.caption)))
            batch.page_urls.append(_text(doc.get(cols.page_url)) if cols.page_url else None)
            if len(batch) >= batch_size:
                yield batch
                batch = RawBatch(path)
    if len(batch):
        yield batch


def iter_batches(
    path: str,
    *,
    cfg: GatherConfig | None = None,
    counter: collections.Counter | None = None,
    batch_size: int | None = None,
    fmt: str | None = None,
) -> Iterator[RawBatch]:
    """Read one table file into batches of raw pairs (``source`` = ``path``)."""
    cfg = cfg or GatherConfig()
    counter = counter if counter is not None else collections.Counter()
    fmt = fmt or detect_format(path, cfg.input_format)
    size = batch_size or cfg.batch_size
    if fmt == "parquet":
        return _iter_parquet(path, cfg, size, counter)
    if fmt in ("csv", "tsv"):
        return _iter_csv(path, cfg, size, counter, tsv=fmt == "tsv")
    if fmt == "jsonl":
        return _iter_jsonl(path, cfg, size, counter)
    raise WitError(f"{path}: not a table format: {fmt}")
