"""Kill anywhere, lose nothing: ``wit build`` killed with SIGKILL at random moments, rerun.

Run it on your own input (any ``wit build`` arguments except ``--output``)::

    python -m wit_pipeline.kill_anywhere --work /tmp/ka --kills 12 --seed 0 -- \\
        build --input 'crawl/*.warc.gz' --queries my-queries.txt --set balance.t=5000

1. An uninterrupted reference build goes to ``WORK/reference``; the time each step takes is
   read from its completion marker (``elapsed_s``).
2. Kill rounds, each into a fresh ``WORK/round-N``: a seeded schedule of ``--kills`` moments
   (every step at least once, the rest at random steps; a moment is a random fraction of the
   step's reference time after its progress line, ``[3/5] download ...``). At each moment the
   build's whole process
   group gets SIGKILL; the output is then scanned, and the build is started again, which
   resumes it, until the next moment. After the round's last kill the build runs to the end.
   A kill that lands after its step ended (the machine was faster) counts for the step it hit;
   its step is tried again in a later round, earlier in the step.
3. Checks, each a line in the report:

   - between kills, every file under a final name is complete: tars read to the end (with
     their end-of-archive blocks), Parquet files read whole, JSON and YAML parse, PNGs decode,
     text ends with its last line; anything else may only be a temporary
     (``.NAME.<hex>.tmp``) or inside a Beam ``beam-temp-*`` folder;
   - after each round, the output holds the same files as the reference: tars and Parquet
     files (and everything else) byte-identical, JSON documents equal apart from timing fields
     (``elapsed_s``), the output folder's own path and the resume count of completion markers
     (``resumed_shards``), ``rejected/`` rows equal apart from when a policy was fetched
     (``policy_fetched``: a redone shard fetches robots.txt again), and no temporary is left;
   - every step had at least one kill land inside it.

The report (JSON) goes to stdout and ``WORK/kill_anywhere.json``; the exit status is 0 when
every check held, 1 otherwise. Outputs must be local folders (the scan walks them). The
inputs must not change between runs (a live web may: use a crawl you serve yourself, as the
test does, or expect differences where the web changed).

``tests/test_kill_anywhere.py`` runs it with one kill per step on a small fixture.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from wit_pipeline import build, fileio

STEP_LINE = re.compile(r"\[(\d+)/(\d+)\] (\w+) \.\.\.$")
TIMING_FIELDS = frozenset({"elapsed_s"})
# Columns of rejected/ rows that say when a policy (robots.txt, tdmrep.json) was fetched: a
# shard redone after a kill fetches its policies again, at another time.
TIMING_COLUMNS = frozenset({"policy_fetched"})
# Fields of completion markers that say how a run got there, not what it made.
RUN_FIELDS = frozenset({"resumed_shards"})

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(f"kill_anywhere: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# One run of `wit build`, optionally killed


@dataclasses.dataclass
class Run:
    """One ``wit build`` process: exit status, whether we killed it, when its steps started."""

    returncode: int
    killed: bool
    started: list[tuple[str, float]]  # (step, seconds after launch) of each step run
    seconds: float
    stderr: str

    def durations(self) -> dict[str, float]:
        """Seconds each step ran (from its progress line to the next one, or to the end)."""
        ends = [t for _, t in self.started[1:]] + [self.seconds]
        return {s: end - t for (s, t), end in zip(self.started, ends, strict=True)}


def launch(
    wit_args: Sequence[str],
    output: str,
    *,
    kill_at: tuple[str, float] | None = None,
    timeout: float = 3600.0,
) -> Run:
    """``python -m wit_pipeline WIT_ARGS --output OUTPUT``; with ``kill_at=(step, delay)``,
    SIGKILL its process group ``delay`` seconds after ``step``'s progress line (if it is still
    running then)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "wit_pipeline", *wit_args, "--output", output],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: the kill takes its workers too
    )
    started: list[tuple[str, float]] = []
    err: list[str] = []
    cond = threading.Condition()
    eof = [False]

    def read_stderr() -> None:
        for line in proc.stderr:  # type: ignore[union-attr]
            with cond:
                err.append(line)
                m = STEP_LINE.search(line.rstrip())
                if m:
                    started.append((m.group(3), time.monotonic() - t0))
                    cond.notify_all()
        with cond:
            eof[0] = True
            cond.notify_all()

    readers = [
        threading.Thread(target=read_stderr, daemon=True),
        threading.Thread(target=proc.stdout.read, daemon=True),  # type: ignore[union-attr]
    ]
    for r in readers:
        r.start()
    killed = False
    try:
        if kill_at is not None:
            step, delay = kill_at
            with cond:
                cond.wait_for(lambda: eof[0] or any(s == step for s, _ in started), timeout)
                at = next((t for s, t in started if s == step), None)
            if at is not None:
                try:
                    proc.wait(timeout=max(0.0, at + delay - (time.monotonic() - t0)))
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    killed = True
        proc.wait(timeout=max(1.0, timeout - (time.monotonic() - t0)))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for r in readers:
            r.join(timeout=30)
    return Run(proc.returncode, killed, started, time.monotonic() - t0, "".join(err))


def first_unfinished(output: str) -> str | None:
    """The first step without its completion marker (None: every step is done)."""
    return next((s for s in build.STEPS if build.read_marker(output, s) is None), None)


# ---------------------------------------------------------------------------------------------
# What is on disk


def is_temporary_path(rel: str) -> bool:
    """A temporary: an atomic write's ``.NAME.<hex>.tmp`` or anything in a Beam temp folder."""
    parts = rel.split("/")
    return fileio.is_temporary(parts[-1]) or any(p.startswith("beam-temp-") for p in parts[:-1])


def _files(root: str) -> list[str]:
    base = pathlib.Path(root)
    return sorted(p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file())


def incomplete(path: str) -> str | None:
    """Why the file at ``path`` is not a complete file of its type, or None if it is."""
    p = pathlib.Path(path)
    data = p.read_bytes()
    try:
        if p.suffix == ".tar":
            if len(data) % 512 or len(data) < 1024 or any(data[-1024:]):
                return "tar without its end-of-archive blocks"
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
                for member in tar:
                    if member.isfile():
                        tar.extractfile(member).read()  # type: ignore[union-attr]
        elif p.suffix == ".parquet":
            import pyarrow.parquet as pq

            pq.read_table(io.BytesIO(data))
        elif p.suffix == ".json":
            json.loads(data)
        elif p.suffix in (".yaml", ".yml"):
            import yaml

            yaml.safe_load(data)
            if not data.endswith(b"\n"):
                return "YAML without its last line end"
        elif p.suffix == ".png":
            from PIL import Image

            with Image.open(io.BytesIO(data)) as im:
                im.load()
        elif p.suffix in (".md", ".txt"):
            data.decode("utf-8")
            if not data.endswith(b"\n"):
                return "text without its last line end"
        else:
            return "a file of no known type under a final name"
    except Exception as e:  # any reader error: the file is not whole
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def scan(output: str) -> tuple[list[str], list[str]]:
    """``(problems, temporaries)``: files under final names that are not complete, and the
    temporaries present (allowed between kills)."""
    problems, temporaries = [], []
    for rel in _files(output):
        if is_temporary_path(rel):
            temporaries.append(rel)
            continue
        why = incomplete(os.path.join(output, rel))
        if why:
            problems.append(f"{rel}: {why}")
    return problems, temporaries


def _normalized(value: Any, *, marker: bool) -> Any:
    drop = TIMING_FIELDS | (RUN_FIELDS if marker else frozenset())
    if isinstance(value, Mapping):
        return {k: _normalized(v, marker=marker) for k, v in value.items() if k not in drop}
    if isinstance(value, list):
        return [_normalized(v, marker=marker) for v in value]
    return value


def _same_table(a: bytes, b: bytes) -> bool:
    """Two Parquet files hold the same rows, apart from :data:`TIMING_COLUMNS`."""
    import io

    import pyarrow.parquet as pq

    tables = [pq.read_table(io.BytesIO(x)) for x in (a, b)]
    if not any(set(t.column_names) & TIMING_COLUMNS for t in tables):
        return False
    kept = [t.drop_columns([c for c in t.column_names if c in TIMING_COLUMNS]) for t in tables]
    return kept[0].equals(kept[1])


def compare(reference: str, output: str) -> list[str]:
    """How ``output`` differs from ``reference`` (see the module docstring): [] when equal."""
    ref_files, out_files = set(_files(reference)), set(_files(output))
    diffs = [f"only in the reference: {r}" for r in sorted(ref_files - out_files)]
    diffs += [f"left over (not in the reference): {r}" for r in sorted(out_files - ref_files)]
    for rel in sorted(ref_files & out_files):
        a = pathlib.Path(reference, rel).read_bytes()
        b = pathlib.Path(output, rel).read_bytes()
        if a == b:
            continue
        if rel.endswith(".json"):
            marker = rel.startswith(f"{build.DONE_DIR}/")
            docs = [
                _normalized(json.loads(d.decode().replace(root, "{DIR}")), marker=marker)
                for d, root in ((a, reference), (b, output))
            ]
            if docs[0] == docs[1]:
                continue
        if rel.endswith(".parquet") and _same_table(a, b):
            continue
        diffs.append(f"differs: {rel}")
    return diffs


# ---------------------------------------------------------------------------------------------
# The schedule and the rounds


def schedule(kills: int, seed: int, steps: Sequence[str] = build.STEPS) -> list[tuple[str, float]]:
    """``kills`` seeded moments ``(step, fraction of the step's time)``: every step once, the
    rest at random steps, in a random order."""
    rng = random.Random(seed)
    targets = list(steps) + [rng.choice(list(steps)) for _ in range(max(0, kills - len(steps)))]
    rng.shuffle(targets)
    return [(t, round(rng.uniform(0.05, 0.95), 3)) for t in targets]


def run(
    wit_args: Sequence[str],
    work: str,
    *,
    kills: int = 12,
    seed: int = 0,
    timeout: float = 3600.0,
    log: Log = _stderr,
) -> dict[str, Any]:
    """The whole check (module docstring); returns the report (``ok``: every check held)."""
    if any(a == "--output" or a.startswith("--output=") or a == "-o" for a in wit_args):
        raise ValueError("give the build's arguments without --output (WORK/... is used)")
    work = os.path.abspath(work)
    if os.path.isdir(work) and os.listdir(work):
        if not os.path.exists(os.path.join(work, "kill_anywhere.json")):
            raise ValueError(f"{work} is not empty and holds no kill_anywhere.json")
        shutil.rmtree(work)  # an earlier check's folder: start afresh
    os.makedirs(work, exist_ok=True)
    steps = list(build.STEPS)
    reference = os.path.join(work, "reference")
    log(f"reference build -> {reference}")
    ref = launch(wit_args, reference, timeout=timeout)
    if ref.returncode not in (0, 1) or first_unfinished(reference) is not None:
        raise RuntimeError(f"the reference build failed ({ref.returncode}):\n{ref.stderr[-3000:]}")
    # A step's own time, from its completion marker (the progress lines would add the
    # process's exit to the last step); the lines' times where a marker has none.
    durations = ref.durations()
    for s in steps:
        marker = build.read_marker(reference, s) or {}
        durations[s] = float(marker.get("elapsed_s", durations.get(s, 0.0)))
    log("step seconds: " + ", ".join(f"{s} {durations[s]:.1f}" for s in steps))
    pending = schedule(kills, seed, steps)
    report: dict[str, Any] = {
        "wit_args": list(wit_args),
        "seed": seed,
        "reference": {"returncode": ref.returncode, "step_seconds": durations},
        "kills": [],
        "rounds": [],
    }
    problems: list[str] = []
    max_rounds = 3 * -(-max(kills, 1) // len(steps))
    n_round = 0
    while pending and n_round < max_rounds:
        n_round += 1
        take, pending = pending[: len(steps)], pending[len(steps) :]
        take.sort(key=lambda t: steps.index(t[0]))
        out = os.path.join(work, f"round-{n_round}")
        retry: list[tuple[str, float]] = []
        for i, (step, fraction) in enumerate(take):
            delay = fraction * durations[step]
            r = launch(wit_args, out, kill_at=(step, delay), timeout=timeout)
            landed = first_unfinished(out) if r.killed else None
            last = r.started[-1][0] if r.started else None
            hit = landed if r.killed and landed == last else None  # the step running then
            found, temporaries = scan(out)
            record = {
                "round": n_round,
                "target": step,
                "fraction": fraction,
                "delay_s": round(delay, 3),
                "killed": r.killed,
                "landed": landed,
                "inside_step": hit,
                "problems": found,
                "temporaries": temporaries,
            }
            report["kills"].append(record)
            problems += [f"round {n_round}, kill in {landed}: {p}" for p in found]
            log(
                f"round {n_round}: kill at {step} + {delay:.1f}s -> "
                + (f"landed in {landed}" if r.killed else f"run ended first ({r.returncode})")
                + f"; {len(found)} incomplete file(s), {len(temporaries)} temporary(ies)"
            )
            if hit != step:  # too late for its step: try that step again, earlier
                retry.append((step, round(fraction / 2, 3)))
            if not r.killed:  # the run completed: this round has nothing left to kill
                retry += take[i + 1 :]
                break
        pending = retry + pending
        final = launch(wit_args, out, timeout=timeout)
        found, temporaries = scan(out)
        diffs = compare(reference, out)
        if final.returncode != ref.returncode:
            diffs.insert(0, f"exit status {final.returncode}, reference {ref.returncode}")
        report["rounds"].append(
            {"round": n_round, "output": out, "problems": found, "differences": diffs}
        )
        problems += [f"round {n_round}, completed: {p}" for p in found + diffs]
        log(f"round {n_round}: completed; {len(diffs)} difference(s) from the reference")
    inside = {s: sum(k["inside_step"] == s for k in report["kills"]) for s in steps}
    report["kills_inside_step"] = inside
    problems += [f"no kill landed inside step {s}" for s, n in inside.items() if not n]
    report["problems"] = problems
    report["ok"] = not problems
    fileio.write_json(os.path.join(work, "kill_anywhere.json"), report)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m wit_pipeline.kill_anywhere",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="Everything after -- is passed to `python -m wit_pipeline` (without --output).",
    )
    parser.add_argument("--work", required=True, help="folder for the reference and the rounds")
    parser.add_argument("--kills", type=int, default=12, help="SIGKILLs in all (default 12)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill schedule")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per run")
    parser.add_argument("wit_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    wit_args = args.wit_args[1:] if args.wit_args[:1] == ["--"] else args.wit_args
    if not wit_args or wit_args[0] != "build":
        parser.error("give the build after --: -- build --input ... [--queries ...]")
    if args.kills < len(build.STEPS):
        parser.error(f"--kills must be at least {len(build.STEPS)} (one per step)")
    report = run(wit_args, args.work, kills=args.kills, seed=args.seed, timeout=args.timeout)
    json.dump(report, sys.stdout, indent=1)
    sys.stdout.write("\n")
    for p in report["problems"]:
        _stderr(f"PROBLEM: {p}")
    n = len(report["kills"])
    _stderr(
        f"{n} kill(s), {len(report['rounds'])} round(s): " + ("ok" if report["ok"] else "FAILED")
    )
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
