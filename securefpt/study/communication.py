"""What federated tuning sends (Table 4): trainable parameters per method and measured bytes.

The bytes are the study's own measurement: every serialized Flower message of a cell's run
(`communication.bytes_up` + `bytes_down` of its summary). Beside them, the trainable
parameter counts of the same methods on XLM-R base, the paper's model: its architecture
is built from its configuration on PyTorch's meta device (no weights, no memory), with
securefpt's own assembly, and its traffic for K clients x R rounds is computed as
count x 4 bytes x 2 directions x K x R (float32, the global encoder down and the update up).
"""

from __future__ import annotations

from securefpt.protocol.request import PeftConfig, with_method

XLMR_BASE = dict(vocab_size=250002, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1)


def xlmr_base_counts(peft: PeftConfig, num_labels: int, methods: list[str]) -> dict[str, tuple[int, int]]:
    """(trainable, total) parameters of each method on XLM-R base, as securefpt assembles it."""
    import torch
    from transformers import XLMRobertaConfig, XLMRobertaModel

    from securefpt.learning.modeling import assemble, count_params

    counts = {}
    for method in methods:
        cfg = with_method(peft, method, prompt_init="random")
        with torch.device("meta"):
            backbone = XLMRobertaModel(XLMRobertaConfig(**XLMR_BASE), add_pooling_layer=False)
            counts[method] = count_params(assemble(backbone, cfg, num_labels, "mean"))
    return counts


def float32_traffic(params: int, clients: int, rounds: int) -> int:
    """Bytes of `rounds` rounds of `clients` clients each receiving and sending `params` float32 values."""
    return params * 4 * 2 * clients * rounds
