"""The study's data: sentence pairs, hub-format tasks, per-language sizes, flwr-datasets partitions,
and the language distance."""

import json
import math
import sys
import types
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

from securefpt.engines.partitions import RECORD, client_ids, partition_trial_data
from securefpt.engines.trial_nodes import write_trial_nodes
from securefpt.experiment.config import DataConfig
from securefpt.experiment.loading import load_config
from securefpt.experiment.trial_data import label_space, load_client_data
from securefpt.learning.data import Example
from securefpt.learning.modeling import build_model
from securefpt.learning.training import make_loader
from securefpt.protocol.request import ModelConfig, parse_peft
from securefpt.study.distance import distance, pretraining_vector, uriel_vector

NLI = ["entailment", "neutral", "contradiction"]  # XNLI's ClassLabel order
NC = ["foodanddrink", "sports", "travel"]


def _write_xnli_like(root: Path) -> None:
    """A local snapshot laid out as the hub's facebook/xnli: `<lang>/<split>-00000-of-00001.parquet`,
    premise / hypothesis / a ClassLabel."""
    import datasets

    features = datasets.Features({"premise": datasets.Value("string"), "hypothesis": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=NLI)})
    for lang in ("en", "sw"):
        for split, n in (("train", 9), ("validation", 6)):
            rows = {"premise": [f"{lang} premise {i} " + "word " * 40 for i in range(n)],
                    "hypothesis": [f"{lang} hypothesis {i}" for i in range(n)], "label": [i % 3 for i in range(n)]}
            (root / lang).mkdir(parents=True, exist_ok=True)
            datasets.Dataset.from_dict(rows, features=features).to_parquet(
                str(root / lang / f"{split}-00000-of-00001.parquet"))


def test_a_sentence_pair_is_tokenized_as_a_pair_in_training_and_prediction(tmp_path):
    _write_xnli_like(tmp_path)
    hf = {"path": str(tmp_path), "text_field": "premise", "pair_field": "hypothesis",
          "data_files": {"train": "{lang}/train-*.parquet", "validation": "{lang}/validation-*.parquet"}}
    cfg = DataConfig(source="hf", languages=["en", "sw"], eval_split="validation", hf=hf)
    labels = label_space(cfg)
    assert labels == sorted(NLI)  # the ClassLabel's names, read from the parquet's own features
    data = load_client_data(cfg, "sw", labels, 0)
    assert len(data.train) == 9 and len(data.eval) == 6
    first = data.train[0]
    assert first.pair is not None and first.pair.startswith("sw hypothesis")

    assembled = build_model(ModelConfig(name="builtin:tiny", max_length=32), parse_peft(num_virtual_tokens=4),
                            len(labels), 0)
    batch = next(iter(make_loader(assembled, data.train[:3], 3, False, 0)))
    tok = assembled.tokenizer
    for row, ex in zip(batch["input_ids"].tolist(), data.train[:3]):
        row = [t for t in row if t != tok.pad_token_id]
        assert len(row) == assembled.max_text_tokens  # the long premise was cut to fit ...
        assert row.count(tok.sep_token_id) == 2  # ... [CLS] premise [SEP] hypothesis [SEP]
        second = tok.decode(row[row.index(tok.sep_token_id) + 1:-1])
        assert second == ex.pair  # ... and the hypothesis kept whole (longest first)
    single = next(iter(make_loader(assembled, [Example(first.text, first.label)], 1, False, 0)))
    assert single["input_ids"][0].tolist().count(tok.sep_token_id) == 1
    with pytest.raises(ValueError, match="mixes single texts and sentence pairs"):
        next(iter(make_loader(assembled, [first, Example(first.text, first.label)], 2, False, 0)))


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_local_files_carry_sentence_pairs(tmp_path, fmt):
    import pandas as pd

    (tmp_path / "sw").mkdir()
    for split in ("train", "dev"):
        frame = pd.DataFrame({"text": ["a premise", "another, premise"], "text_pair": ["its hypothesis", "more"],
                              "label": ["neutral", "entailment"]})
        path = tmp_path / "sw" / f"{split}.{fmt}"
        frame.to_csv(path, index=False) if fmt == "csv" else frame.to_json(path, orient="records", lines=True)
    data = load_client_data(DataConfig(source=fmt, root=tmp_path, languages=["sw"]), "sw", ["entailment", "neutral"], 0)
    assert sorted((ex.text, ex.pair, ex.label) for ex in data.train) == [
        ("a premise", "its hypothesis", 1), ("another, premise", "more", 0)]


def test_nc_shaped_hub_data_joins_title_and_body_and_names_its_classes(tmp_path):
    import datasets

    features = datasets.Features({"news_title": datasets.Value("string"), "news_body": datasets.Value("string"),
                                  "news_category": datasets.ClassLabel(names=NC)})
    for lang in ("de", "fr"):  # one save_to_disk folder per language, as XGLUE NC's configs nc.de, nc.fr
        split = datasets.Dataset.from_dict({"news_title": [f"{lang} title {i}" for i in range(6)],
                                            "news_body": [f"body {i}" for i in range(6)],
                                            "news_category": [i % 3 for i in range(6)]}, features=features)
        datasets.DatasetDict({"train": split, "validation": split.select(range(3))}).save_to_disk(
            str(tmp_path / f"nc.{lang}"))
    hf = {"path": str(tmp_path / "nc.{lang}"), "from_disk": True, "text_field": ["news_title", "news_body"],
          "label_field": "news_category"}
    cfg = DataConfig(source="hf", languages=["de", "fr"], eval_split="validation", hf=hf)
    assert label_space(cfg) == sorted(NC)
    for lang in ("de", "fr"):
        data = load_client_data(cfg, lang, sorted(NC), 0)
        assert {ex.text for ex in data.train} == {f"{lang} title {i}. body {i}" for i in range(6)}
        assert len(data.eval) == 3
        assert all(ex.pair is None for ex in data.train)
        assert Counter(sorted(NC)[ex.label] for ex in data.train) == Counter({c: 2 for c in NC})


def test_one_language_can_train_on_another_split_and_fewer_rows(tmp_path, tiny_overrides):
    for lang in ("xx", "yy", "zz"):
        (tmp_path / lang).mkdir()
        for split, n in (("train", 20), ("dev", 6), ("extra", 30)):
            rows = [{"text": f"{lang} {split} {i}", "label": "ab"[i % 2]} for i in range(n)]
            (tmp_path / lang / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(None, tiny_overrides + ["data.source=jsonl", f"data.root={tmp_path}",
                                              "data.languages=[xx, yy, zz]",
                                              "data.max_train_per_client=12", "data.per_language.yy.max_train=5",
                                              "data.per_language.zz.train_split=extra",
                                              "data.per_language.zz.max_train=25"])
    data = {x: load_client_data(cfg.data, x, ["a", "b"], 0) for x in cfg.data.languages}
    assert [len(data[x].train) for x in ("xx", "yy", "zz")] == [12, 5, 25]
    assert all(" extra " in ex.text for ex in data["zz"].train) and all(" train " in ex.text for ex in data["xx"].train)
    assert cfg.request(["a", "b"]).training.max_train == 25  # the largest any node may use
    bindings = {p.parent.name: yaml.safe_load(p.read_text())["data"][cfg.data.task]
                for p in write_trial_nodes(cfg, tmp_path / "nodes")}
    assert [bindings[x]["max_train"] for x in ("xx", "yy", "zz")] == [12, 5, 25]  # each node's own cap
    assert bindings["zz"]["train_split"] == "extra" and bindings["xx"]["train_split"] == "train"
    with pytest.raises(Exception, match="not in data.languages"):
        load_config(None, tiny_overrides + ["data.per_language.xyz.max_train=5"])


def _partitioned(tmp_path, tiny_overrides, *extra):
    cfg = load_config(None, tiny_overrides + ["data.languages=[eng, fra, hau, swa, yor]",
                                              "data.max_train_per_client=40", "data.max_eval_per_client=10", *extra])
    out = partition_trial_data(cfg, tmp_path)
    record = json.loads((tmp_path / RECORD).read_text())
    def read(client, split):
        return [json.loads(x) for x in (tmp_path / client / f"{split}.jsonl").read_text().splitlines()]

    parts = {c: (read(c, "train"), read(c, "dev")) for c in client_ids(cfg.data.partition.clients)}
    labels = label_space(cfg.data)
    pool = {split: [(x, ex.text, labels[ex.label]) for x in cfg.data.languages
                    for ex in getattr(load_client_data(cfg.data, x, labels, cfg.seed), split)]
            for split in ("train", "eval")}
    return cfg, out, record, parts, pool


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_partitions_use_every_example_once_deterministically_and_are_recorded(tmp_path, tiny_overrides, scheme):
    extra = ["data.partition.clients=4", f"data.partition.scheme={scheme}", "data.partition.alpha=0.1"]
    _, out, record, parts, pool = _partitioned(tmp_path / "a", tiny_overrides, *extra)
    for index, split in ((0, "train"), (1, "eval")):
        held = [(r["language"], r["text"], r["label"]) for train_eval in parts.values() for r in train_eval[index]]
        assert sorted(held) == sorted(pool[split])  # every row in exactly one client
    for client, (train, evals) in parts.items():
        assert record["clients"][client]["train"] == len(train) and record["clients"][client]["eval"] == len(evals)
        assert record["clients"][client]["languages"] == dict(Counter(r["language"] for r in train))
    assert out.data.source == "jsonl" and out.data.languages == list(parts)
    assert out.data.max_train_per_client == max(len(t) for t, _ in parts.values())
    sizes = [len(t) for t, _ in parts.values()]
    if scheme == "iid":
        assert max(sizes) - min(sizes) <= 1
    # the same seed gives the same partition; another seed another one
    _, _, again, _, _ = _partitioned(tmp_path / "b", tiny_overrides, *extra)
    _, _, other, _, _ = _partitioned(tmp_path / "c", tiny_overrides, *extra, "seed=7")
    assert again == record
    assert [c["rows_sha256"] for c in other["clients"].values()] != \
        [c["rows_sha256"] for c in record["clients"].values()]


def test_a_small_dirichlet_alpha_concentrates_languages_and_iid_mixes_them(tmp_path, tiny_overrides):
    def dominant_share(scheme: str, alpha: float) -> float:
        _, _, record, _, _ = _partitioned(tmp_path / f"{scheme}{alpha}", tiny_overrides, "data.partition.clients=5",
                                          f"data.partition.scheme={scheme}", f"data.partition.alpha={alpha}")
        shares = [max(c["languages"].values()) / c["train"] for c in record["clients"].values()]
        return sum(shares) / len(shares)

    iid, skewed = dominant_share("iid", 1.0), dominant_share("dirichlet", 0.05)
    assert iid < 0.45  # five languages of 40 rows each, 40 rows a client: no language near dominant
    assert skewed > 0.7 and skewed > iid + 0.3


@pytest.mark.parametrize("shaping", [["data.partition.clients=3"], ["data.per_language.eng.max_train=4"]])
def test_a_federation_s_nodes_are_never_partitioned_or_shrunk_by_the_coordinator(tmp_path, tiny_overrides, shaping):
    """A node's data and its row cap are its own (node.yaml): a study's data-efficiency cell run against a
    federation would otherwise be measured on data the nodes never shrank."""
    with pytest.raises(Exception, match="a federation's nodes .clients. bind their own data"):
        load_config(None, tiny_overrides + [*shaping, f"clients={tmp_path}"])
    load_config(None, tiny_overrides + shaping)  # the operator's own trial data may be shaped


@pytest.fixture
def lang2vec_itself(monkeypatch):
    """lang2vec's own library code, with the `pkg_resources` it imports given back (it was removed from
    setuptools): the reference the distance is checked against."""
    from importlib import metadata

    root = Path(str(metadata.distribution("lang2vec").locate_file("lang2vec")))
    shim = types.ModuleType("pkg_resources")
    shim.resource_filename = lambda _package, name: str(root / name)
    monkeypatch.syspath_prepend(str(root.parent))
    monkeypatch.setitem(sys.modules, "pkg_resources", shim)
    monkeypatch.delitem(sys.modules, "lang2vec", raising=False)
    import importlib

    return importlib.import_module("lang2vec.lang2vec")


def test_the_language_distance_is_minus_log_cosine_to_the_weighted_pretraining_vector(lang2vec_itself):
    features = ["syntax_knn", "phonology_knn", "inventory_knn"]
    vectors = lang2vec_itself.get_features(["yor", "eng", "fra"], "+".join(features))
    yor, eng, fra = (np.asarray(vectors[x], dtype=float) for x in ("yor", "eng", "fra"))
    assert np.array_equal(uriel_vector("yor", features), yor)
    assert np.array_equal(uriel_vector("yo", features), yor)  # a two-letter code is looked up as lang2vec does
    by_hand = -math.log(yor @ eng / (np.linalg.norm(yor) * np.linalg.norm(eng)))
    assert distance("yor", {"en": 1.0}, features) == pytest.approx(by_hand, rel=1e-12)
    assert 0.05 < by_hand < 2  # Yoruba is far from English but not orthogonal to it
    mix = 0.75 * eng + 0.25 * fra  # 3 parts English, 1 part French
    assert np.allclose(pretraining_vector({"en": 3.0, "fr": 1.0}, features), mix)
    by_hand = -math.log(yor @ mix / (np.linalg.norm(yor) * np.linalg.norm(mix)))
    assert distance("yor", {"en": 3.0, "fr": 1.0}, features) == pytest.approx(by_hand, rel=1e-12)
    assert distance("eng", {"en": 1.0}, features) == 0.0
