"""open_clip's own trainer on wit shards: ``python -m wit_pipeline.train.open_clip ARGS``.

``ARGS`` are ``open_clip_train.main``'s, e.g. ``--train-data 'shards/{00000..00041}.tar'
--dataset-type webdataset --model ViT-B-32``. Two things happen before open_clip's ``main``:

1. The webdataset reader fix. open_clip_train 3.3.0's training reader
   (``open_clip_train.data.tarfile_to_samples_nothrow``) feeds webdataset's
   ``tar_file_expander`` into its own ``group_by_keys_nothrow``, which reads ``fname`` of every
   item. webdataset >= 0.2.87 yields an end-of-shard marker (``{}``, its ``eof_value``) after
   each tar, so training fails with ``KeyError: 'fname'`` when it reaches the end of the first
   shard, whatever the shards hold. open_clip's ``training`` extra pins ``webdataset<=0.2.86``;
   img2dataset 1.47 allows ``<0.3`` and this project installs 0.2.111. The fix re-binds the
   reader to the same steps with ``eof_value=None`` (no marker); nothing else changes. With a
   webdataset that has no ``eof_value`` parameter (<= 0.2.86) open_clip's reader is left as is.
2. The architectures shipped with wit-pipeline (``wit-tiny``, ...) are registered, so
   ``--model wit-tiny`` works.

Validation (``--val-data``) uses webdataset's own reader, which handles the marker.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any


def needs_reader_fix() -> bool:
    """Whether this webdataset yields the end-of-shard marker open_clip's reader fails on."""
    from webdataset.tariterators import tar_file_expander

    return "eof_value" in inspect.signature(tar_file_expander).parameters


def _tarfile_to_samples_nothrow(src: Iterable[dict[str, Any]], handler=None) -> Iterator[dict]:
    """open_clip_train's ``tarfile_to_samples_nothrow`` without webdataset's end-of-shard item."""
    from open_clip_train import data
    from webdataset.tariterators import tar_file_expander, url_opener

    handler = handler or data.log_and_continue
    streams = url_opener(src, handler=handler)
    files = tar_file_expander(streams, handler=handler, eof_value=None)
    return data.group_by_keys_nothrow(files, handler=handler)


def apply_reader_fix() -> bool:
    """Re-bind open_clip_train's training reader when needed; returns whether it did."""
    from open_clip_train import data

    if not needs_reader_fix():
        return False
    data.tarfile_to_samples_nothrow = _tarfile_to_samples_nothrow
    return True


def main(argv: Sequence[str] | None = None) -> None:
    """Apply the fix, register the wit-* architectures, run ``open_clip_train.main.main``."""
    from wit_pipeline import models

    apply_reader_fix()
    models.register_model_configs()
    from open_clip_train.main import main as open_clip_main

    open_clip_main(list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
