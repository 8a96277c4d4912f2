"""Thin entry point for the gather pipeline, e.g. for Dataflow job submission scripts.

    python pipelines/gather.py --input 'gs://b/wat/*.wat.gz' --queries gs://b/q.txt.gz \
        --output gs://b/gather --runner DataflowRunner --project P --region R \
        --temp_location gs://b/tmp --setup_file ./pyproject.toml

Same flags as ``wit gather`` (see ``docs/gather.md``); other flags go to Beam, and one Beam does
not know either is refused. ``--setup_file ./pyproject.toml`` ships this package to the Dataflow
workers (or use ``--sdk_container_image`` built from the ``Dockerfile``; see ``docs/scaling.md``).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from wit_pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["gather", *sys.argv[1:]]))
