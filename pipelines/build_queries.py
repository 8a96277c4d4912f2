"""Build a query list on any Beam runner: a thin entry point for ``wit queries build``.

Locally (FnApiRunner)::

    python pipelines/build_queries.py --output out/q.txt.gz \\
        --dump 'dumps/enwiki-*-pages-articles-multistream*.xml.bz2' \\
        --pageviews 'pageviews/pageviews-*.gz' --wordnet /usr/share/wordnet

On Dataflow, the same command with Beam options; the worker count is the estimate of
docs/queries.md and BENCHMARKS.md (about 6.4 core-hours of counting for a full dump, not a
measured Dataflow run)::

    python pipelines/build_queries.py --output gs://bucket/queries/wit-queries-en.txt.gz \\
        --dump 'gs://bucket/enwiki/*.bz2' --pageviews 'gs://bucket/pageviews/*.gz' \\
        --wordnet /usr/share/wordnet --runner=DataflowRunner --project=my-project \\
        --region=us-central1 --temp_location=gs://bucket/tmp --num_workers=20 \\
        --max_num_workers=40 --machine_type=n2-standard-4 --setup_file=./pyproject.toml
"""

from __future__ import annotations

import sys

from wit_pipeline import cli

if __name__ == "__main__":
    sys.exit(cli.main(["queries", "build", *sys.argv[1:]]))
