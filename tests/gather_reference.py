"""The gather filter as it was written before it was vectorized: one pair at a time.

Kept as the reference that ``pairs.PairFilter.process`` is tested against (same candidates,
same rejected rows, same counts, row for row), on fixtures, real captions and generated mess.
"""

from __future__ import annotations

import collections

import pyarrow as pa

from wit_pipeline import counters as counters_lib
from wit_pipeline import optout, stage, urls
from wit_pipeline.stages.gather import captions as captions_lib
from wit_pipeline.stages.gather.pairs import CANDIDATE_SCHEMA, NO_MATCH, PairFilter, check_url
from wit_pipeline.stages.gather.readers import RawBatch
from wit_pipeline.takedown import TAKEDOWN


def reference_process(flt: PairFilter, batch: RawBatch) -> stage.Result:
    """``PairFilter.process`` per pair, with the filter's config, matcher, detector and
    blocklist."""
    ccfg = flt.config.captions
    form = ccfg.unicode_form
    detect = flt.detector.detect if flt.detector.name != "none" else None
    # Detection runs before matching when it filters (a caption's language is checked like
    # its length); without a filter it runs only for the pairs that are kept.
    language_filter = bool(ccfg.languages) and detect is not None
    match = flt.matcher.match
    keep_unmatched = flt.config.match.keep_unmatched
    clean = captions_lib.clean_caption
    check_caption = captions_lib.check_caption
    check_language = captions_lib.check_language
    recorded_language = captions_lib.recorded_language
    pair_uid = urls.pair_uid
    source = batch.source
    n_in = len(batch)
    signals = batch.opt_outs or [None] * n_in
    dates = batch.page_dates or [None] * n_in
    takedown = flt._takedown if flt.blocklist is not None else None
    pages: dict[str, str | None] = {}

    k_uid, k_url, k_caption, k_ids, k_page, k_lang, k_score = [], [], [], [], [], [], []
    r_url, r_caption, r_reason, r_page = [], [], [], []
    r_detail: list[str] = []
    r_policy: list[tuple[str | None, str | None]] = []
    opt_outs: collections.Counter[str] = collections.Counter()

    for url, raw_caption, page_url, signal, date in zip(
        batch.urls, batch.captions, batch.page_urls, signals, dates, strict=True
    ):
        caption = raw_caption
        normalized, reason = check_url(url, page_url)
        detail, policy = "", (None, None)
        if reason is None and takedown is not None:
            hit = takedown(normalized, page_url, pages)
            if hit is not None:
                reason, detail = TAKEDOWN, hit
        if reason is None and signal is not None:
            reason, detail, policy = optout.OPT_OUT, signal, (page_url, date or None)
            opt_outs[counters_lib.scoped(optout.SCOPE, signal)] += 1
        if reason is None:
            if not raw_caption:
                reason = captions_lib.NO_CAPTION
            else:
                caption = clean(raw_caption, unicode_form=form)
                reason = check_caption(caption, ccfg)
        language, score = "", 0.0
        if reason is None and language_filter:
            language, score = detect(caption)
            reason = check_language(language, score, ccfg)
            if reason is None:
                language = recorded_language(language, ccfg)
        if reason is None:
            ids = match(caption)
            if not ids and not keep_unmatched:
                reason = NO_MATCH
            elif detect is not None and not language_filter:
                # No filter: the language is only recorded, so only for kept pairs.
                language, score = detect(caption)
        if reason is not None:
            r_url.append(normalized or url)
            r_caption.append(caption)
            r_reason.append(reason)
            r_page.append(page_url)
            r_detail.append(detail)
            r_policy.append(policy)
            continue
        k_uid.append(pair_uid(normalized, caption))
        k_url.append(normalized)
        k_caption.append(caption)
        k_ids.append(ids)
        k_page.append(page_url)
        k_lang.append(language)
        k_score.append(score)

    n = len(k_uid)
    candidates = pa.Table.from_arrays(
        [
            pa.array(k_uid, pa.string()),
            pa.array(k_url, pa.string()),
            pa.array(k_caption, pa.string()),
            pa.array(k_ids, pa.list_(pa.int32())),
            pa.array([source] * n, pa.string()),
            pa.array(k_page, pa.string()),
            pa.array(k_lang, pa.string()),
            pa.array(k_score, pa.float32()),
        ],
        schema=CANDIDATE_SCHEMA,
    )
    columns = [
        pa.array(r_url, pa.string()),
        pa.array(r_caption, pa.string()),
        pa.array(r_reason, pa.string()),
        pa.array([source] * len(r_url), pa.string()),
        pa.array(r_page, pa.string()),
    ]
    names = ["url", "caption", "reason", "source", "page_url"]
    if any(r_detail):  # takedowns and opt-outs say which entry or signal, and the policy
        columns += [
            pa.array(r_detail, pa.string()),
            pa.array([p for p, _ in r_policy], pa.string()),
            pa.array([f for _, f in r_policy], pa.string()),
        ]
        names += ["detail", "policy_url", "policy_fetched"]
    rejected = pa.Table.from_arrays(columns, names=names)
    return stage.Result(candidates, rejected, {counters_lib.INPUT: n_in, **opt_outs})
