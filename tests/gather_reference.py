"""The gather filter as it was written before it was vectorized: one pair at a time.

Kept as the reference that ``pairs.PairFilter.process`` is tested against (same candidates,
same rejected rows, same counts, row for row), on fixtures, real captions and generated mess.
"""

from __future__ import annotations

import pyarrow as pa

from wit_pipeline import counters as counters_lib
from wit_pipeline import stage, urls
from wit_pipeline.stages.gather import captions as captions_lib
from wit_pipeline.stages.gather.pairs import CANDIDATE_SCHEMA, NO_MATCH, PairFilter, check_url
from wit_pipeline.stages.gather.readers import RawBatch


def reference_process(flt: PairFilter, batch: RawBatch) -> stage.Result:
    """``PairFilter.process`` per pair, with the filter's config, matcher and detector."""
    ccfg = flt.config.captions
    form = ccfg.unicode_form
    detect = flt.detector.detect if flt.detector.name != "none" else None
    language_filter = bool(ccfg.languages) and detect is not None
    match = flt.matcher.match
    keep_unmatched = flt.config.match.keep_unmatched
    source = batch.source

    k_uid, k_url, k_caption, k_ids, k_page, k_lang, k_score = [], [], [], [], [], [], []
    r_url, r_caption, r_reason, r_page = [], [], [], []

    for url, raw_caption, page_url in zip(batch.urls, batch.captions, batch.page_urls, strict=True):
        caption = raw_caption
        normalized, reason = check_url(url, page_url)
        if reason is None:
            if not raw_caption:
                reason = captions_lib.NO_CAPTION
            else:
                caption = captions_lib.clean_caption(raw_caption, unicode_form=form)
                reason = captions_lib.check_caption(caption, ccfg)
        language, score = "", 0.0
        if reason is None and language_filter:
            language, score = detect(caption)
            reason = captions_lib.check_language(language, score, ccfg)
            if reason is None:
                language = captions_lib.recorded_language(language, ccfg)
        if reason is None:
            ids = match(caption)
            if not ids and not keep_unmatched:
                reason = NO_MATCH
            elif detect is not None and not language_filter:
                language, score = detect(caption)
        if reason is not None:
            r_url.append(normalized or url)
            r_caption.append(caption)
            r_reason.append(reason)
            r_page.append(page_url)
            continue
        k_uid.append(urls.pair_uid(normalized, caption))
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
    rejected = pa.Table.from_arrays(
        [
            pa.array(r_url, pa.string()),
            pa.array(r_caption, pa.string()),
            pa.array(r_reason, pa.string()),
            pa.array([source] * len(r_url), pa.string()),
            pa.array(r_page, pa.string()),
        ],
        names=["url", "caption", "reason", "source", "page_url"],
    )
    return stage.Result(candidates, rejected, {counters_lib.INPUT: len(batch)})
