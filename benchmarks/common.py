"""Shared helpers for the benchmarks: real data, a real-sized query list, tables, machine info."""

from __future__ import annotations

import collections
import datetime
import itertools
import os
import pathlib
import platform
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def shared_data() -> pathlib.Path:
    path = pathlib.Path(os.environ.get("WIT_SHARED_DATA", ROOT.parent / "shared" / "data"))
    if not path.is_dir():
        sys.exit(f"real data folder not found: {path} (set WIT_SHARED_DATA)")
    return path


def laion_rows(data: pathlib.Path) -> tuple[list[str], list[str]]:
    import pyarrow.parquet as pq

    t = pq.read_table(data / "laion-sample" / "laion_10000.parquet", columns=["URL", "TEXT"])
    return t.column("URL").to_pylist(), t.column("TEXT").to_pylist()


def real_sized_queries(data: pathlib.Path, n: int = 500_000) -> list[str]:
    """A query list shaped like CLIP's: wordfreq's English words (320k), the 50k Wikipedia
    vital-article titles, then the most frequent word bigrams of Flickr8k and LAION captions,
    until ``n`` distinct entries."""
    from wordfreq import top_n_list

    seen: dict[str, None] = {}
    for w in top_n_list("en", n, wordlist="large"):
        seen.setdefault(w)
    for line in (data / "wikipedia" / "vital_article_links.txt").open(encoding="utf-8"):
        title = line.strip().removeprefix("/wiki/").replace("_", " ")
        if title:
            seen.setdefault(title)
    bigrams: collections.Counter[str] = collections.Counter()
    texts = [
        line.rstrip("\n").split("\t")[3]
        for line in list((data / "flickr8k" / "captions.tsv").open(encoding="utf-8"))[1:]
    ]
    texts += [t for t in laion_rows(data)[1] if t]
    for t in texts:
        words = t.split()
        bigrams.update(f"{a} {b}" for a, b in itertools.pairwise(words))
    for b, _ in bigrams.most_common():
        if len(seen) >= n:
            break
        seen.setdefault(b)
    # Still short: capitalized forms of frequent words (CLIP's list keeps case variants).
    if len(seen) < n:
        for w in top_n_list("en", n, wordlist="large"):
            if len(seen) >= n:
                break
            seen.setdefault(w.capitalize())
    return list(seen)[:n]


def pyahocorasick_matcher(queries: list[str]):
    """``match(text)`` as ``QueryMatcher.match`` was on pyahocorasick (`` q `` keys, integer
    payloads, one ``set(map(...))`` per text; queries without repeats): the previous matcher,
    and the issue's baseline engine. ``match.automaton`` is the automaton itself."""
    import operator

    import ahocorasick

    from wit_pipeline.stages.gather.match import spacing

    automaton = ahocorasick.Automaton(ahocorasick.STORE_INTS)
    for i, q in enumerate(queries):
        automaton.add_word(f" {q} ", i)
    automaton.make_automaton()
    payload = operator.itemgetter(1)
    matches = automaton.iter

    def match(text: str) -> list[int]:
        return sorted(set(map(payload, matches(spacing(text)))))

    match.automaton = automaton
    return match


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _proc_field(path: str, name: str) -> str | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(name):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def machine() -> str:
    cpu = _proc_field("/proc/cpuinfo", "model name") or platform.machine()
    total = _proc_field("/proc/meminfo", "MemTotal")
    mem = f", {int(total.split()[0]) / 2**20:.0f} GiB" if total else ""
    return f"{os.cpu_count()} cores ({cpu}){mem}, Python {platform.python_version()}"


def header(title: str, command: str) -> str:
    today = datetime.date.today().isoformat()
    return f"### {title}\n\nMachine: {machine()}. Date: {today}. Command: `{command}`.\n"


def table(rows: list[list[str]], head: list[str]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)
