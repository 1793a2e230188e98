import json

import pytest

from securefpt.errors import DataError
from securefpt.experiment.config import DataConfig
from securefpt.experiment.trial_data import label_space, load_client_data
from securefpt.learning.data import read_masakhanews_tsv

TSV = (
    "category\theadline\ttext\turl\n"
    'sports\tCup final\t"First line\nsecond line with a\ttab and ""quotes"""\thttp://a\n'
    'politics\t"Vote, today"\tPlain body\thttp://b\n'
)


def test_tsv_parsing_keeps_quoted_newlines_tabs_and_quotes(tmp_path):
    path = tmp_path / "x.tsv"
    path.write_text(TSV, encoding="utf-8")
    rows = read_masakhanews_tsv(path)
    assert len(rows) == 2
    assert rows[0].label == "sports"
    assert rows[0].text == 'Cup final. First line\nsecond line with a\ttab and "quotes"'
    assert rows[1] == ("Vote, today. Plain body", "politics", None)


def test_tsv_missing_column_and_file(tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("label\ttext\nx\ty\n", encoding="utf-8")
    with pytest.raises(DataError, match="missing column 'category'"):
        read_masakhanews_tsv(bad)
    with pytest.raises(DataError, match="not found"):
        read_masakhanews_tsv(tmp_path / "none.tsv")


def _jsonl_root(tmp_path, labels=("a", "b")):
    for lang in ("xx", "yy"):
        (tmp_path / lang).mkdir()
        for split, n in (("train", 20), ("dev", 6)):
            with open(tmp_path / lang / f"{split}.jsonl", "w") as fh:
                for i in range(n):
                    fh.write(json.dumps({"text": f"{lang} {split} {i}", "label": labels[i % len(labels)]}) + "\n")
    return DataConfig(source="jsonl", root=tmp_path, languages=["xx", "yy"], max_train_per_client=8)


def test_label_space_is_the_union_and_sampling_is_deterministic(tmp_path):
    cfg = _jsonl_root(tmp_path)
    labels = label_space(cfg)
    assert labels == ["a", "b"]
    first = load_client_data(cfg, "xx", labels, seed=1)
    again = load_client_data(cfg, "xx", labels, seed=1)
    other = load_client_data(cfg, "xx", labels, seed=2)
    assert len(first.train) == 8 and len(first.eval) == 6
    assert first.train == again.train
    assert [e.text for e in first.train] != [e.text for e in other.train]


def test_label_outside_the_label_space_is_an_error(tmp_path):
    cfg = _jsonl_root(tmp_path)
    with pytest.raises(DataError, match="label 'b' is not in the label space"):
        load_client_data(cfg, "xx", ["a"], seed=0)


def test_demo_data_ships_five_languages_with_unequal_sizes():
    cfg = DataConfig()
    labels = label_space(cfg)
    assert len(labels) == 5
    sizes = {lang: len(load_client_data(cfg, lang, labels, 0).train) for lang in cfg.languages}
    assert sizes["eng"] > sizes["yor"] > 0


def test_masakhanews_real_files(masakhanews_root):
    cfg = DataConfig(source="masakhanews_tsv", root=masakhanews_root, languages=["eng", "yor"],
                     train_split="test", eval_split="dev")
    labels = label_space(cfg)
    assert len(labels) == 7  # union of eng's 6 and yor's 5 labels
    data = load_client_data(cfg, "yor", labels, 0)
    assert len(data.train) == 411 and len(data.eval) == 206


def test_hf_source_loads_a_local_dataset_folder_with_datasets(tmp_path):
    folder = tmp_path / "hfds"
    folder.mkdir()
    for split, n in (("train", 10), ("validation", 4)):
        with open(folder / f"{split}.jsonl", "w") as fh:
            for i in range(n):
                fh.write(json.dumps({"sentence": f"s{i}", "topic": "p" if i % 2 else "q", "lang": "xx"}) + "\n")
    cfg = DataConfig(source="hf", languages=["xx"],
                     hf={"path": str(folder), "text_field": "sentence", "label_field": "topic",
                         "language_field": "lang"})
    labels = label_space(cfg)
    assert labels == ["p", "q"]
    data = load_client_data(cfg, "xx", labels, 0)
    assert len(data.train) == 10 and len(data.eval) == 4


def test_hf_source_offline_gives_a_clear_error():
    cfg = DataConfig(source="hf", languages=["en"], hf={"path": "securefpt-test/does-not-exist"})
    with pytest.raises(DataError, match="data.hf: cannot load securefpt-test/does-not-exist"):
        load_client_data(cfg, "en", ["a", "b"], 0)


def test_hf_source_reads_local_files_in_hub_formats(tmp_path):
    """`data_files` for a builder (json here, one file per language and split), and a folder
    written by `save_to_disk`: the real `datasets` loading code, offline."""
    import datasets

    for lang in ("xx", "yy"):
        for split, n in (("train", 6), ("validation", 3)):
            with open(tmp_path / f"{lang}.{split}.jsonl", "w") as fh:
                for i in range(n):
                    fh.write(json.dumps({"news": f"{lang} {i}", "topic": ["sport", "health"][i % 2]}) + "\n")
    hf = {"path": "json", "text_field": "news", "label_field": "topic",
          "data_files": {"train": str(tmp_path / "{lang}.train.jsonl"),
                         "validation": str(tmp_path / "{lang}.validation.jsonl")}}
    cfg = DataConfig(source="hf", languages=["xx", "yy"], hf=hf)
    assert label_space(cfg) == ["health", "sport"]
    data = load_client_data(cfg, "yy", ["health", "sport"], 0)
    assert len(data.train) == 6 and len(data.eval) == 3 and all(e.text.startswith("yy ") for e in data.train)

    disk = datasets.DatasetDict({split: datasets.Dataset.from_dict(
        {"text": [f"t{i}" for i in range(4)], "label": [0, 1, 0, 1], "lang": ["xx"] * 4},
        features=datasets.Features({"text": datasets.Value("string"), "lang": datasets.Value("string"),
                                    "label": datasets.ClassLabel(names=["neg", "pos"])}))
        for split in ("train", "validation")})
    disk.save_to_disk(str(tmp_path / "saved"))
    cfg = DataConfig(source="hf", languages=["xx"], hf={"path": str(tmp_path / "saved"), "from_disk": True,
                                                        "language_field": "lang"})
    assert label_space(cfg) == ["neg", "pos"]  # class names, not indices
    assert len(load_client_data(cfg, "xx", ["neg", "pos"], 0).train) == 4


def test_hf_source_offline_says_how_to_allow_downloads_or_read_local_files():
    cfg = DataConfig(source="hf", languages=["en"], hf={"path": "securefpt-test/does-not-exist"})
    with pytest.raises(DataError, match="SECUREFPT_ALLOW_DOWNLOAD=1 allows downloads; local files load with"):
        load_client_data(cfg, "en", ["a", "b"], 0)
