"""How far a language is from what the model was pretrained on (the paper's Section 5.3).

Each language is a URIEL typological vector (lang2vec's kNN-predicted syntax, phonology
and inventory features, which have no missing values). The model's pretraining vector
V_p is the average of its pretraining languages' vectors weighted by their share of the
pretraining corpus, and phi(v) = -log cos(v, V_p): 0 for a language typologically equal
to the pretraining mix, growing as it departs from it.

lang2vec ships its feature files but its module imports the removed `pkg_resources`, so
the `.npz` files are read here, found through the installed distribution's file list
(importlib.metadata: lang2vec also installs a `lang2vec.py` script that shadows the package
on a console script's path, so importing `lang2vec` to locate it is not safe).
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from importlib import metadata
from pathlib import Path

import numpy as np

from securefpt.errors import ConfigError

# lang2vec's feature sets: file, source, feature-name prefix (as lang2vec.FEATURE_SETS_DICT has them).
FEATURE_SETS = {
    "syntax_knn": ("feature_predictions.npz", "predicted", "S_"),
    "phonology_knn": ("feature_predictions.npz", "predicted", "P_"),
    "inventory_knn": ("feature_predictions.npz", "predicted", "INV_"),
    "syntax_average": ("feature_averages.npz", "avg", "S_"),
    "phonology_average": ("feature_averages.npz", "avg", "P_"),
    "inventory_average": ("feature_averages.npz", "avg", "INV_"),
}

# XLM-R's pretraining mix: CC-100 GiB per language, Conneau et al. 2020, Table 6 as printed (its token
# counts have typos and whitespace tokens for zh/ja/th, so size stands in for the token share; Yoruba
# is not in CC-100). Romanized and second-script rows are folded into their language.
CC100_GIB = {
    "af": 1.3, "am": 0.8, "ar": 28.0, "as": 0.1, "az": 6.5, "be": 4.3, "bg": 57.5, "bn": 8.9, "br": 0.1, "bs": 0.1,
    "ca": 10.1, "cs": 16.3, "cy": 0.8, "da": 45.6, "de": 66.6, "el": 46.9, "en": 300.8, "eo": 0.9, "es": 53.3,
    "et": 6.1, "eu": 2.0, "fa": 111.6, "fi": 54.3, "fr": 56.8, "fy": 0.2, "ga": 0.5, "gd": 0.1, "gl": 2.9,
    "gu": 1.9, "ha": 0.3, "he": 31.6, "hi": 20.7, "hr": 20.5, "hu": 58.4, "hy": 5.5, "id": 148.3, "is": 3.2,
    "it": 30.2, "ja": 69.3, "jv": 0.2, "ka": 9.1, "kk": 6.4, "km": 1.5, "kn": 3.3, "ko": 54.2, "ku": 0.4,
    "ky": 1.2, "la": 2.5, "lo": 0.6, "lt": 13.7, "lv": 8.8, "mg": 0.2, "mk": 4.8, "ml": 7.6, "mn": 3.0,
    "mr": 2.8, "ms": 8.5, "my": 2.0, "ne": 3.8, "nl": 29.3, "no": 49.0, "om": 0.1, "or": 0.6, "pa": 0.8,
    "pl": 44.6, "ps": 0.7, "pt": 49.1, "ro": 61.4, "ru": 278.0, "sa": 0.3, "sd": 0.4, "si": 3.6, "sk": 23.2,
    "sl": 10.3, "so": 0.4, "sq": 5.4, "sr": 9.1, "su": 0.1, "sv": 12.1, "sw": 1.6, "ta": 12.5, "te": 5.0,
    "th": 71.7, "tl": 3.1, "tr": 20.9, "ug": 0.4, "uk": 84.6, "ur": 6.2, "uz": 0.7, "vi": 137.3, "xh": 0.1,
    "yi": 0.3, "zh": 63.5,
}

# Pretraining mixes by model name (shares need not sum to 1). MiniLM (all-MiniLM-L6-v2) is English only.
PRETRAINING_MIX = {
    "builtin:multilingual-e5-small": CC100_GIB,  # XLM-R's vocabulary and pretraining languages
    "builtin:minilm": {"en": 1.0},
    "builtin:tiny": {"en": 1.0},
    "xlm-roberta-base": CC100_GIB,
    "xlm-roberta-large": CC100_GIB,
    "FacebookAI/xlm-roberta-base": CC100_GIB,
    "FacebookAI/xlm-roberta-large": CC100_GIB,
}


def _data_file(name: str) -> Path:
    try:
        path = Path(str(metadata.distribution("lang2vec").locate_file(f"lang2vec/data/{name}")))
    except metadata.PackageNotFoundError:
        raise ConfigError("the language distance needs lang2vec (pip install lang2vec)") from None
    if not path.is_file():
        raise ConfigError(f"lang2vec's data file {path} is missing")
    return path


@lru_cache(maxsize=None)
def _database(filename: str) -> dict:
    with _data_file(filename).open("rb") as handle, np.load(handle, allow_pickle=True) as db:
        return {key: db[key] for key in ("data", "langs", "feats", "sources")}


@lru_cache(maxsize=1)
def _letter_codes() -> dict[str, str]:
    return json.loads(_data_file("letter_codes.json").read_text(encoding="utf-8"))


def iso639_3(code: str) -> str:
    """lang2vec's code for a language: ISO 639-3, from a 639-1 code where one is given."""
    return _letter_codes().get(code, code)


def uriel_vector(language: str, features: list[str] | tuple[str, ...]) -> np.ndarray:
    """The language's URIEL feature sets, concatenated in the order given."""
    parts = []
    for feature_set in features:
        if feature_set not in FEATURE_SETS:
            raise ConfigError(f"distance.features: {feature_set!r} is not one of {sorted(FEATURE_SETS)}")
        filename, source, prefix = FEATURE_SETS[feature_set]
        db = _database(filename)
        code = iso639_3(language)
        rows = np.flatnonzero(db["langs"] == code)
        if rows.size == 0:
            raise ConfigError(f"language {language!r} ({code}) is not in URIEL's {filename}")
        columns = [i for i, name in enumerate(db["feats"]) if str(name).startswith(prefix)]
        source_index = int(np.flatnonzero(db["sources"] == source)[0])
        parts.append(db["data"][rows[0], columns, source_index].astype(np.float64))
    return np.concatenate(parts)


def pretraining_vector(mix: dict[str, float], features: list[str] | tuple[str, ...]) -> np.ndarray:
    """V_p = sum_i w_i V_i with w_i language i's share of the pretraining corpus."""
    total = sum(mix.values())
    return sum((share / total) * uriel_vector(language, features) for language, share in mix.items())


def distance(language: str, mix: dict[str, float], features: list[str] | tuple[str, ...]) -> float:
    """phi = -log cos(v_language, V_p)."""
    v, p = uriel_vector(language, features), pretraining_vector(mix, features)
    cosine = float(v @ p / (np.linalg.norm(v) * np.linalg.norm(p)))
    return max(0.0, -math.log(min(cosine, 1.0))) if cosine > 0 else math.inf


def model_mix(model_name: str) -> dict[str, float]:
    mix = PRETRAINING_MIX.get(model_name)
    if mix is None:
        raise ConfigError(f"no pretraining mix known for model {model_name!r} (known: {sorted(PRETRAINING_MIX)})")
    return mix
