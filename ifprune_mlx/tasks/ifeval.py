"""Instruction-following scores from lm-eval's own IFEval checkers, offline.

lm-eval's checkers count sentences (and tokenise words for the capital-word count) with nltk's
Punkt data, `punkt_tab`, and try to download it when they are imported. Where that data is not
installed, this module imports them without a download and gives nltk an untrained
`PunktSentenceTokenizer()`: the same Punkt algorithm with default parameters (no learned
abbreviations, so "Dr. Smith" may count as two sentences). Installed data is always preferred.
"""

from __future__ import annotations

import contextlib
import functools
import io

PUNKT_RESOURCE = "tokenizers/punkt_tab/english/"


def punkt_installed() -> bool:
    """True when nltk finds its trained English Punkt data."""
    import nltk

    try:
        nltk.data.find(PUNKT_RESOURCE)
    except LookupError:
        return False
    return True


@functools.cache
def checkers():
    """lm-eval's `tasks.ifeval.utils` module, imported without network access."""
    import langdetect
    import nltk

    fallback = not punkt_installed()
    download = nltk.download
    if fallback:  # lm-eval calls nltk.download("punkt_tab") at import when the data is missing
        nltk.download = _no_download
    try:  # lm-eval prints "Downloaded punkt_tab" even when the download did nothing
        with contextlib.redirect_stdout(io.StringIO()) if fallback else contextlib.nullcontext():
            from lm_eval.tasks.ifeval import instructions_util, utils
    finally:
        nltk.download = download
    if fallback:
        _use_untrained_punkt(nltk, instructions_util)
    langdetect.DetectorFactory.seed = 0  # langdetect samples; a fixed seed makes scores repeatable
    return utils


def _no_download(*_args, **_kwargs) -> bool:
    return False


def _use_untrained_punkt(nltk, instructions_util) -> None:
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    tokenizer = PunktSentenceTokenizer()
    # sentence counting (number_sentences) and nltk.word_tokenize (capital_word_frequency)
    instructions_util._get_sentence_tokenizer = lambda: tokenizer
    nltk.tokenize._get_punkt_tokenizer = lambda language="english": tokenizer


def process_results(doc: dict, results: list[str]) -> dict:
    """lm-eval's IFEval metrics for one record: prompt- and instruction-level, strict and loose."""
    return checkers().process_results(doc, results)


def agg_inst_level_acc(items: list[list[bool]]) -> float:
    """Instruction-level accuracy: the mean over every instruction of every prompt."""
    return checkers().agg_inst_level_acc(items)
