"""The whole run's counters: every step's ``stats.json`` composed into ``DIR/stats.json``.

``DIR/stats.json`` holds the whole run's counters over pairs (``input`` = pairs extracted by
gather, ``kept`` = pairs in final samples, ``dropped:<reason>`` for every other pair, named after
the stage that dropped it), image-level counters, every stage's own counters and the funnel; the
invariant ``input == kept + sum(dropped:*)`` and the hand-offs between stages (each stage's input
is the previous one's output) are checked before it is written (:func:`compose_stats`,
:func:`write_run_stats`).
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa

from wit_pipeline import build, config, fileio, optout, samples
from wit_pipeline import counters as counters_lib
from wit_pipeline import stage as stage_lib
from wit_pipeline.stages import balance
from wit_pipeline.stages import score as score_lib
from wit_pipeline.stages import shards as shards_lib
from wit_pipeline.stages.dedup import core as dedup
from wit_pipeline.stages.dedup.decontaminate import CONTAMINATION, EVAL_CONTAMINATION
from wit_pipeline.stages.download import plan as download_plan
from wit_pipeline.stages.download import transforms as download_lib
from wit_pipeline.stages.gather import captions
from wit_pipeline.stages.gather import pairs as gather_pairs
from wit_pipeline.stages.gather import transforms as gather
from wit_pipeline.takedown import TAKEDOWN

# Drop reasons each stage can give (``dropped:<reason>``). A reason given by more than one stage
# is qualified with its stage in the whole-run counters (``prebalance/no_query``,
# ``balance/no_query``, ``dedup/undecodable_image``, ``score/undecodable_image``), so that every
# run-level name says which stage dropped the pair.
STAGE_REASONS: dict[str, tuple[str, ...]] = {
    "gather": (
        gather_pairs.NO_URL,
        gather_pairs.UNSUPPORTED_SCHEME,
        gather_pairs.BAD_URL,
        TAKEDOWN,
        optout.OPT_OUT,
        captions.NO_CAPTION,
        captions.BAD_ENCODING,
        captions.TOO_SHORT,
        captions.TOO_LONG,
        captions.TOO_FEW_WORDS,
        captions.TOO_MANY_WORDS,
        captions.LANGUAGE,
        captions.LANGUAGE_UNDETECTED,
        captions.LOW_LANGUAGE_SCORE,
        gather_pairs.NO_MATCH,
        gather_pairs.DUPLICATE,
    ),
    "prebalance": (balance.PREBALANCED_OUT, balance.NO_QUERY),
    "download": download_plan.REASONS,  # plus http_<status>
    "dedup": (
        TAKEDOWN,
        samples.UNDECODABLE,
        EVAL_CONTAMINATION,
        dedup.DUPLICATE_INPUT,
        dedup.NEAR_DUPLICATE,
    ),
    "balance": (balance.BALANCED_OUT, balance.NO_QUERY),
    "score": (score_lib.LOW_SCORE, score_lib.UNDECODABLE, score_lib.MISSING),
}
# The stages inside the finalize step, in order (score only when the build scores).
FINAL_STAGES = ("dedup", "score", "balance")


def _colliding_reasons() -> frozenset[str]:
    seen: collections.Counter[str] = collections.Counter()
    for reasons in STAGE_REASONS.values():
        seen.update(set(reasons))
    return frozenset(r for r, n in seen.items() if n > 1)


COLLIDING_REASONS = _colliding_reasons()


def run_reason(stage: str, reason: str) -> str:
    """The whole-run name of a stage's drop reason: qualified when another stage uses it too."""
    return f"{stage}/{reason}" if reason in COLLIDING_REASONS else reason


def _counter_dict(d: Mapping[str, Any] | None) -> dict[str, int]:
    return {str(k): int(v) for k, v in (d or {}).items()}


def _stage_row(
    stage: str, counts: Mapping[str, int], *, unit: str, reasons: Mapping[str, int]
) -> dict[str, Any]:
    return {
        "stage": stage,
        "unit": unit,
        "input": int(counts.get(counters_lib.INPUT, 0)),
        "kept": int(counts.get(counters_lib.KEPT, 0)),
        "dropped": {run_reason(stage, r): int(n) for r, n in sorted(reasons.items()) if n},
    }


def _final_stage_of(reason: str) -> str:
    """Which stage of the finalize step gave ``reason``.

    Inside that step dedup and balance count their own reason names, and the score stage
    qualifies the names it shares with them (``score/undecodable_image``).
    """
    stage, sep, _ = reason.partition("/")
    if sep and stage in FINAL_STAGES:
        return stage
    for stage in FINAL_STAGES:
        if reason in STAGE_REASONS[stage]:
            return stage
    raise AssertionError(f"finalize counted an unknown drop reason {reason!r}")


def _split_final(
    counts: Mapping[str, int], stages: Sequence[str] = FINAL_STAGES
) -> list[tuple[str, dict[str, int]]]:
    """The finalize step's counters as consecutive dedup, (score,) balance stages."""
    by_stage: dict[str, dict[str, int]] = {s: {} for s in stages}
    for reason, n in counters_lib.drop_reasons(counts).items():
        stage = _final_stage_of(reason)
        if stage not in by_stage:
            raise AssertionError(f"finalize counted {reason!r} but ran no {stage} stage")
        base = reason.split("/", 1)[1] if reason.startswith(f"{stage}/") else reason
        by_stage[stage][base] = n
    out = []
    n_in = int(counts.get(counters_lib.INPUT, 0))
    for stage in stages:
        dropped = sum(by_stage[stage].values())
        c = {counters_lib.INPUT: n_in, counters_lib.KEPT: n_in - dropped}
        c.update({counters_lib.dropped(r): n for r, n in by_stage[stage].items()})
        out.append((stage, c))
        n_in -= dropped
    if n_in != int(counts.get(counters_lib.KEPT, 0)):
        raise AssertionError(f"finalize counters do not chain: {dict(counts)}")
    return out


def _check_handoff(upstream: str, kept: int, downstream: str, n_in: int, unit: str) -> None:
    if kept != n_in:
        raise AssertionError(
            f"{unit}s lost between steps: {upstream} kept {kept:,}, {downstream} read {n_in:,}"
        )


def compose_stats(
    *,
    gather_doc: Mapping[str, Any],
    prebalance_doc: Mapping[str, Any] | None,
    download_doc: Mapping[str, Any],
    finalize_doc: Mapping[str, Any],
    scored: bool = False,
) -> dict[str, Any]:
    """The whole run's counters from the steps' ``stats.json`` documents (pure).

    ``prebalance_doc`` is None when pre-balancing is off; ``scored`` says whether the finalize
    step ran the CLIP-score stage (it then appears in the funnel, even when it dropped nothing).

    ``counters`` is over pairs: input = pairs extracted by gather, kept = pairs in final samples,
    every other pair under the reason of the stage that dropped it. ``image_counters`` is over
    images (input = distinct URLs handed to download; absent with ``dedup.collapse = false``,
    where samples are pairs). ``funnel`` lists each stage's input, kept and drops; ``stages`` the
    steps' own counters. Raises ``AssertionError`` when a hand-off or the invariant fails.
    """
    g = _counter_dict(gather_doc["counters"])
    stages: dict[str, Any] = {
        "gather": {
            "unit": "pair",
            "counters": g,
            "read_counters": _counter_dict(gather_doc.get("read_counters")),
            "opt_out_counters": _counter_dict(gather_doc.get("opt_out_counters")),
        }
    }
    pair_rows = [_stage_row("gather", g, unit="pair", reasons=counters_lib.drop_reasons(g))]
    last_stage, last_kept = "gather", g.get(counters_lib.KEPT, 0)
    if prebalance_doc is not None:
        pb = _counter_dict(prebalance_doc["counters"])
        _check_handoff(last_stage, last_kept, "prebalance", pb.get(counters_lib.INPUT, 0), "pair")
        stages["prebalance"] = {"unit": "pair", "counters": pb}
        pair_rows.append(
            _stage_row("prebalance", pb, unit="pair", reasons=counters_lib.drop_reasons(pb))
        )
        last_stage, last_kept = "prebalance", pb.get(counters_lib.KEPT, 0)
    dl = _counter_dict(download_doc["counters"])
    dl_urls = _counter_dict(download_doc["url_counters"])
    _check_handoff(last_stage, last_kept, "download", dl.get(counters_lib.INPUT, 0), "pair")
    stages["download"] = {
        "unit": "pair",
        "counters": dl,
        "url_counters": dl_urls,
        "opt_out_counters": _counter_dict(download_doc.get("opt_out_counters")),
    }
    pair_rows.append(_stage_row("download", dl, unit="pair", reasons=counters_lib.drop_reasons(dl)))
    fin_pairs = _counter_dict(finalize_doc["pair_counters"])
    collapse = finalize_doc.get("unit", "image") == "image"
    fin_images = _counter_dict(finalize_doc["counters"]) if collapse else None
    _check_handoff(
        "download", dl.get(counters_lib.KEPT, 0), "dedup", fin_pairs.get("input", 0), "pair"
    )
    final_stages = tuple(s for s in FINAL_STAGES if scored or s != "score")
    for stage, c in _split_final(fin_pairs, final_stages):
        pair_rows.append(_stage_row(stage, c, unit="pair", reasons=counters_lib.drop_reasons(c)))
    image_rows = [
        _stage_row("download", dl_urls, unit="image", reasons=counters_lib.drop_reasons(dl_urls))
    ]
    stages["finalize"] = {"unit": "pair", "pair_counters": fin_pairs}
    if fin_images is not None:
        stages["finalize"]["image_counters"] = fin_images
        _check_handoff(
            "download",
            dl_urls.get(counters_lib.KEPT, 0),
            "dedup",
            fin_images.get(counters_lib.INPUT, 0),
            "image",
        )
        for stage, c in _split_final(fin_images, final_stages):
            image_rows.append(
                _stage_row(stage, c, unit="image", reasons=counters_lib.drop_reasons(c))
            )

    def whole(rows: list[dict[str, Any]], what: str) -> dict[str, int]:
        total: dict[str, int] = {
            counters_lib.INPUT: rows[0]["input"],
            counters_lib.KEPT: rows[-1]["kept"],
        }
        owner: dict[str, str] = {}
        for row in rows:
            for name, n in row["dropped"].items():
                key = counters_lib.dropped(name)
                if key in owner and owner[key] != row["stage"]:
                    raise AssertionError(
                        f"drop reason {name!r} given by {owner[key]} and {row['stage']}"
                    )
                owner[key] = row["stage"]
                total[key] = total.get(key, 0) + n
        counters_lib.check_balanced(total, stage=f"whole run ({what})")
        return dict(sorted(total.items()))

    doc: dict[str, Any] = {
        "unit": "pair",
        "counters": whole(pair_rows, "pairs"),
        "image_counters": whole(image_rows, "images") if fin_images is not None else None,
        "funnel": {"pairs": pair_rows, "images": image_rows if fin_images is not None else None},
        "stages": stages,
        "reason_stage": {
            counters_lib.dropped(name): row["stage"]
            for rows in (pair_rows, image_rows)
            for row in rows
            for name in row["dropped"]
        },
    }
    return doc


def opt_out_summary(
    stage_counters: Mapping[str, Mapping[str, int]],
    rejected_dirs: Sequence[str],
    *,
    top: int = 10,
) -> dict[str, Any]:
    """Opt-outs of a run: pairs dropped per signal and stage (exact, from the steps'
    ``opt_out_counters``), and the ``top`` domains whose policies dropped the most pairs.

    Domains are read from the ``rejected/`` rows of the given directories (the host of each
    opt-out's ``policy_url``: the page, the robots.txt or tdmrep.json's origin, the image);
    a step written without ``rejected/`` (``gather --no-rejected``) contributes none.
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from wit_pipeline import urls
    from wit_pipeline.errors import WitError

    signals: dict[str, dict[str, int]] = {}
    for stage, counts in stage_counters.items():
        for signal, n in counts.items():
            if n:
                signals.setdefault(signal, {})[stage] = int(n)
    domains: collections.Counter[str] = collections.Counter()
    by_domain: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for directory in rejected_dirs:
        try:
            files = fileio.expand_inputs([directory], suffixes=(".parquet",))
        except WitError:
            continue
        for path in files:
            with fileio.open_file(path, "rb") as f:
                table = pq.read_table(f, columns=["reason", "detail", "url", "policy_url"])
            table = table.filter(
                pc.is_in(table["reason"], pa.array([optout.OPT_OUT, optout.ROBOTS]))
            )
            for r in table.to_pylist():
                signal = optout.signal_of(r["reason"], r["detail"])
                if signal is None:
                    continue
                host = urls.url_host(r["policy_url"] or r["url"] or "") or "(none)"
                domains[host] += 1
                by_domain[host][signal] += 1
    ranked = sorted(domains.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    return {
        "pairs": sum(n for per in signals.values() for n in per.values()),
        "signals": {k: dict(sorted(v.items())) for k, v in sorted(signals.items())},
        "top_domains": [
            {"domain": d, "pairs": n, "signals": dict(sorted(by_domain[d].items()))}
            for d, n in ranked
        ],
    }


def write_run_stats(output: str) -> dict[str, Any]:
    """Compose ``DIR/stats.json`` from the steps' files, check it and write it."""

    def read(*parts: str) -> dict[str, Any]:
        return fileio.read_json(fileio.join(output, *parts))

    build_doc = read(build.BUILD_FILE)
    cfg = config.load_config(fileio.join(output, build.CONFIG_FILE))
    gather_doc = read("gather", gather.STATS_FILE)
    prebalance_doc = read("prebalance", build.STATS_FILE) if cfg.balance.prebalance else None
    download_doc = read("download", download_lib.STATS_FILE)
    finalize_doc = read("finalize", build.STATS_FILE)
    doc = compose_stats(
        gather_doc=gather_doc,
        prebalance_doc=prebalance_doc,
        download_doc=download_doc,
        finalize_doc=finalize_doc,
        scored=bool(cfg.score.pretrained),
    )
    manifest = read(shards_lib.SHARDS_DIR, "manifest.json")
    samples = (doc["image_counters"] or doc["counters"])[counters_lib.KEPT]
    if manifest["num_samples"] != samples:
        raise AssertionError(
            f"the manifest lists {manifest['num_samples']} samples, the counters {samples}"
        )
    extra: dict[str, Any] = {
        "samples": manifest["num_samples"],
        "shards": manifest["num_shards"],
        "train_data": (
            fileio.join(shards_lib.SHARDS_DIR, manifest["train_data"])
            if manifest["train_data"]
            else ""
        ),
        "queries": build_doc["inputs"]["queries"],
        "inputs": {"files": build_doc["inputs"]["files"]},
        "config": config.to_dict(cfg),
    }
    contamination = fileio.join(output, CONTAMINATION)
    if fileio.exists(contamination):
        c = fileio.read_json(contamination)
        extra["contamination"] = {
            "sets_hit": c["sets_hit"],
            "contaminated_samples": c["contaminated_samples"],
            "eval_sets": {
                name: {k: v[k] for k in ("images", "contaminated_samples", "eval_images_hit")}
                for name, v in c["eval_sets"].items()
            },
        }
    extra["opt_outs"] = opt_out_summary(
        {s: doc["stages"][s]["opt_out_counters"] for s in ("gather", "download")},
        [fileio.join(output, s, stage_lib.REJECTED_DIR) for s in ("gather", "download")],
    )
    if build_doc["inputs"].get("takedown"):
        extra["takedown"] = build_doc["inputs"]["takedown"]
    if cfg.score.pretrained:
        sc = read("finalize", score_lib.SCORE_FILE)
        extra["score"] = {
            **{k: v for k, v in sc.items() if k not in ("model", "pretrained")},
            "seed_model": {"model": sc["model"], "pretrained": sc["pretrained"]},
        }
    doc.update(extra)
    fileio.write_json(fileio.join(output, build.STATS_FILE), doc)
    return doc
