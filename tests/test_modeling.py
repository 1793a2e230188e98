import numpy as np
import pytest
import torch

from securefpt.errors import ModelUnavailableError
from securefpt.learning.modeling import build_model, count_params, get_trainable, set_trainable
from securefpt.protocol.request import ModelConfig, PromptTuning, parse_peft, with_method

TINY = ModelConfig(name="builtin:tiny", max_length=32)


def _batch(assembled, texts=("hello world", "a longer sentence about football")):
    enc = assembled.tokenizer(list(texts), padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


@pytest.mark.parametrize(
    "method,expected",
    [
        ("prompt_tuning", {"prompt_encoder.embedding.weight", "head.weight", "head.bias"}),
        ("p_tuning", None),
        ("lora", None),
        ("full", None),
    ],
)
def test_only_the_method_s_parameters_are_trainable(method, expected):
    assembled = build_model(TINY, with_method(PromptTuning(num_virtual_tokens=4), method), num_labels=3, seed=0)
    names = assembled.trainable_names()
    trainable, total = count_params(assembled.model)
    if expected is not None:
        assert set(names) == expected
    if method == "p_tuning":
        assert any(n.startswith("prompt_encoder.mlp_head") for n in names)
        assert not any(n.startswith("backbone.") for n in names)
    if method == "lora":
        assert names and all("lora_" in n or n.startswith("head.") for n in names)
    if method == "full":
        assert trainable == total
    else:
        assert trainable < total / 10


def test_trainable_round_trip_reproduces_outputs():
    peft = parse_peft(method="p_tuning", num_virtual_tokens=4, encoder_hidden_size=16)
    a = build_model(TINY, peft, 3, seed=0)
    with torch.no_grad():
        for p in a.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    b = build_model(TINY, peft, 3, seed=0)
    a.model.eval(), b.model.eval()
    ids, mask = _batch(a)
    assert not torch.allclose(a.model(ids, mask), b.model(ids, mask))
    arrays = get_trainable(a.model)
    assert list(arrays) == a.trainable_names()  # stable, registration order
    set_trainable(b.model, arrays)
    assert torch.allclose(a.model(ids, mask), b.model(ids, mask), atol=1e-6)


def test_set_trainable_rejects_mismatches():
    a = build_model(TINY, parse_peft(num_virtual_tokens=4), 3, seed=0)
    arrays = get_trainable(a.model)
    arrays.pop("head.bias")
    with pytest.raises(ValueError, match="missing"):
        set_trainable(a.model, arrays)
    arrays = get_trainable(a.model)
    arrays["head.bias"] = np.zeros(7, dtype=np.float32)
    with pytest.raises(ValueError, match="shape"):
        set_trainable(a.model, arrays)


def test_text_init_copies_the_init_text_s_word_embeddings():
    peft = parse_peft(num_virtual_tokens=4, init_text="predict the news topic")
    a = build_model(TINY, peft, 3, seed=0)
    ids = a.tokenizer(peft.init_text)["input_ids"][:4]
    words = a.model.backbone.get_input_embeddings().weight[ids]
    assert torch.allclose(a.model.prompt_encoder.embedding.weight, words)


def test_virtual_tokens_change_the_output_and_leave_room_for_text():
    a = build_model(TINY, parse_peft(num_virtual_tokens=4), 3, seed=0)
    assert a.max_text_tokens == 32 - 4
    a.model.eval()
    ids, mask = _batch(a)
    before = a.model(ids, mask)
    with torch.no_grad():
        # (a constant shift would vanish in the embedding LayerNorm)
        weight = a.model.prompt_encoder.embedding.weight
        weight.add_(torch.randn_like(weight))
    assert not torch.allclose(before, a.model(ids, mask))


def test_unavailable_model_gives_an_actionable_error(tmp_path):
    with pytest.raises(ModelUnavailableError, match="cannot load it offline"):
        build_model(ModelConfig(name=str(tmp_path / "no-model")), parse_peft(), 3, seed=0)


def test_packaged_minilm_loads_offline():
    a = build_model(ModelConfig(name="builtin:minilm"), parse_peft(num_virtual_tokens=8), 7, seed=0)
    trainable, total = count_params(a.model)
    assert total > 22_000_000
    assert trainable == 8 * 384 + 384 * 7 + 7


@pytest.mark.parametrize("virtual_tokens", [3, 20], ids=["cut", "repeated"])
def test_text_initialisation_is_peft_s_own(virtual_tokens):
    """The prompt starts from the init text's token embeddings exactly as PEFT's TEXT init makes it
    (securefpt passes its loaded tokenizer instead of letting PEFT load one by path)."""
    from peft import PromptTuningConfig
    from peft.tuners.prompt_tuning.model import PromptEmbedding

    from securefpt.learning.builtin_models import minilm_path

    peft_cfg = parse_peft(num_virtual_tokens=virtual_tokens, prompt_init="text")
    assembled = build_model(TINY, peft_cfg, num_labels=3, seed=0)
    backbone = assembled.model.backbone
    reference = PromptEmbedding(PromptTuningConfig(
        task_type="SEQ_CLS", num_virtual_tokens=virtual_tokens, token_dim=backbone.config.hidden_size,
        num_transformer_submodules=1, num_attention_heads=2, num_layers=2, prompt_tuning_init="TEXT",
        prompt_tuning_init_text=peft_cfg.init_text, tokenizer_name_or_path=str(minilm_path())),
        backbone.get_input_embeddings())
    assert torch.equal(assembled.model.prompt_encoder.embedding.weight, reference.embedding.weight)


def test_cuda_without_a_gpu_is_a_config_error():
    from securefpt.errors import ConfigError

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    with pytest.raises(ConfigError, match="model.device=cuda: this machine has no CUDA GPU"):
        build_model(TINY.model_copy(update={"device": "cuda"}), parse_peft(), num_labels=3, seed=0)
    assembled = build_model(TINY.model_copy(update={"device": "auto"}), parse_peft(), num_labels=3, seed=0)
    assert assembled.model.head.weight.device.type == "cpu" and assembled.model.autocast_dtype is None
