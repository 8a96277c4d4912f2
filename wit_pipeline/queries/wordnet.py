"""WordNet: the lemmas of WordNet 3.0's synsets, read from its database files.

``read_wordnet`` parses ``data.noun``, ``data.verb``, ``data.adj`` and ``data.adv`` (Debian's
``wordnet-base`` installs them in ``/usr/share/wordnet``); ``wordnet_entries`` takes every
lemma or each synset's first; ``wordnet_source`` records the files, their version and the
Debian package that holds them.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
from collections.abc import Iterable, Iterator, Sequence

from wit_pipeline import counters as counters_lib
from wit_pipeline import fileio
from wit_pipeline.config import QueriesConfig
from wit_pipeline.errors import WitError
from wit_pipeline.queries.merge import SourceResult
from wit_pipeline.queries.reading import input_info

WORDNET_DATA_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")
DEFAULT_WORDNET_DIR = "/usr/share/wordnet"  # Debian/Ubuntu: apt-get install wordnet-base


@dataclasses.dataclass(frozen=True)
class Synset:
    offset: int
    pos: str
    lemmas: tuple[str, ...]
    gloss: str


_ADJ_MARKER_RE = re.compile(r"\((?:a|p|ip)\)$")


def iter_wordnet_synsets(lines: Iterable[str], *, source: str = "data") -> Iterator[Synset]:
    """Synsets of a WordNet 3.0 ``data.*`` file (license header lines are skipped).

    A line is ``offset lex_filenum ss_type w_cnt (word lex_id){w_cnt} p_cnt ... | gloss``
    with ``w_cnt`` in hexadecimal; adjective lemmas may end in a syntactic marker ``(a)``,
    ``(p)`` or ``(ip)``, which is not part of the word.
    """
    for lineno, line in enumerate(lines, 1):
        if line.startswith("  ") or not line.strip():
            continue
        fields, _, gloss = line.partition(" | ")
        parts = fields.split()
        try:
            offset = int(parts[0])
            pos = parts[2]
            w_cnt = int(parts[3], 16)
            words = parts[4 : 4 + 2 * w_cnt : 2]
            if len(words) != w_cnt or w_cnt == 0:
                raise ValueError("word count")
        except (IndexError, ValueError):
            raise WitError(f"{source}:{lineno}: not a WordNet data line: {line[:80]!r}") from None
        lemmas = tuple(_ADJ_MARKER_RE.sub("", w).replace("_", " ") for w in words)
        yield Synset(offset=offset, pos=pos, lemmas=lemmas, gloss=gloss.strip())


def wordnet_entries(
    synsets: Iterable[Synset], *, lemmas: str, counter: collections.Counter
) -> list[str]:
    """Lemma names of ``synsets``: every lemma (``lemmas="all"``), or only each synset's first
    (``"first"``): ``queries.wordnet.lemmas``, one of ``config.WORDNET_LEMMAS``."""
    out = []
    for ss in synsets:
        counter["synsets"] += 1
        for i, lemma in enumerate(ss.lemmas):
            counter[counters_lib.INPUT] += 1
            if lemmas == "first" and i > 0:
                counter[counters_lib.dropped("not_first_lemma")] += 1
                continue
            counter[counters_lib.KEPT] += 1
            out.append(lemma)
    return out


def wordnet_files(directory: str) -> list[str]:
    """The four ``data.*`` files of a WordNet database directory (all must exist)."""
    paths = [fileio.join(directory, name) for name in WORDNET_DATA_FILES]
    missing = [p for p in paths if not fileio.exists(p)]
    if missing:
        raise WitError(
            f"WordNet data files not found: {', '.join(missing)} (Debian/Ubuntu: "
            "apt-get install wordnet-base; or pass --wordnet DIR)"
        )
    return paths


def read_wordnet(directory: str) -> list[Synset]:
    synsets: list[Synset] = []
    for path in wordnet_files(directory):
        with fileio.open_file(path, "rb") as f:
            text = f.read().decode("utf-8")
        synsets.extend(iter_wordnet_synsets(text.splitlines(), source=path))
    return synsets


def wordnet_version(directory: str) -> str:
    """The version line of the license header (``WordNet 3.0 Copyright 2006 ...``)."""
    path = fileio.join(directory, "data.noun")
    with fileio.open_file(path, "rb") as f:
        head = f.read(4096).decode("utf-8", "replace")
    m = re.search(r"WordNet (\d+(?:\.\d+)*) Copyright", head)
    return f"WordNet {m.group(1)}" if m else "unknown"


# ---------------------------------------------------------------------------------------------
# The source


def wordnet_source(
    directory: str, cfg: QueriesConfig, *, synsets: Sequence[Synset] | None = None
) -> SourceResult:
    counter: collections.Counter = collections.Counter()
    if synsets is None:
        synsets = read_wordnet(directory)
    entries = wordnet_entries(synsets, lemmas=cfg.wordnet.lemmas, counter=counter)
    version = wordnet_version(directory)
    doc = {
        "inputs": [input_info(p, "wordnet-data") for p in wordnet_files(directory)],
        "version": version,
        **({"debian_package": deb} if (deb := debian_package_version(directory)) else {}),
        "thresholds": {"lemmas": cfg.wordnet.lemmas},
        "counters": dict(sorted(counter.items())),
    }
    return SourceResult("wordnet", entries, doc)


def debian_package_version(directory: str) -> str | None:
    """``wordnet-base 1:3.0-37`` when ``directory`` belongs to an installed Debian package."""
    import shutil
    import subprocess

    if not fileio.is_local(directory) or shutil.which("dpkg-query") is None:
        return None
    try:
        owner = subprocess.run(
            ["dpkg-query", "-S", os.path.join(os.path.abspath(directory), "data.noun")],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split(":", 1)[0]
        version = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", owner],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (subprocess.CalledProcessError, OSError):
        return None
    return f"{owner} {version}" if owner and version else None
