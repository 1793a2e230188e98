"""`securefpt.load_classifier(RUN_DIR)`: a finished run as a transformers model that classifies text.

The model is assembled from the run's standard artifacts: the frozen base model, the PEFT
adapter loaded with `PeftModel.from_pretrained` (prompt tuning, P-tuning, LoRA), and the
head over the pooled hidden states (`classifier_head.safetensors`). It is a
`PreTrainedModel` whose forward returns logits and whose config names the labels, so it
works in a `transformers` text-classification pipeline:

    clf = securefpt.load_classifier("runs/demo-...")
    clf.predict(["some text"])                        # [(label, probability)]
    pipeline("text-classification", model=clf, tokenizer=clf.tokenizer)("some text")

`securefpt predict` uses the same model, so both classify alike.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

from securefpt.errors import ConfigError
from securefpt.learning.adapter import CLASSIFIER_FILE, HEAD_FILE
from securefpt.learning.artifacts import load_arrays
from securefpt.protocol.request import REQUEST_FILE, ExperimentRequest


class PromptClassifierConfig(PretrainedConfig):
    model_type = "securefpt-prompt-classifier"

    def __init__(self, pooling: str = "mean", num_virtual_tokens: int = 0, hidden_size: int = 0,
                 max_text_tokens: int = 128, input_prefix: str = "", **kwargs) -> None:
        super().__init__(**kwargs)
        self.pooling, self.num_virtual_tokens = pooling, num_virtual_tokens
        self.hidden_size, self.max_text_tokens = hidden_size, max_text_tokens
        self.input_prefix = input_prefix  # what the model saw before every text in training


class PromptClassifierModel(PreTrainedModel):
    """The frozen encoder (with its PEFT adapter), mean- or CLS-pooled, and a linear head."""

    config_class = PromptClassifierConfig
    base_model_prefix = "encoder"

    def __init__(self, config: PromptClassifierConfig, encoder: Optional[nn.Module] = None) -> None:
        super().__init__(config)
        self.encoder = encoder
        self.head = nn.Linear(config.hidden_size, config.num_labels)
        self.tokenizer = None

    def forward(self, input_ids=None, attention_mask=None, **_) -> SequenceClassifierOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        k = self.config.num_virtual_tokens
        if k:
            attention_mask = torch.cat([attention_mask.new_ones(attention_mask.shape[0], k), attention_mask], dim=1)
        if self.config.pooling == "cls":
            pooled = hidden[:, k]
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return SequenceClassifierOutput(logits=self.head(pooled))

    @torch.no_grad()
    def predict(self, texts: list[str], pairs: Optional[list[str]] = None) -> list[tuple[str, float]]:
        """(label, probability) of each text, or of each (text, pair) for a sentence-pair task."""
        from securefpt.learning.backbone import tokenize

        prefix = getattr(self.config, "input_prefix", "")
        enc = tokenize(self.tokenizer, [prefix + t for t in texts], pairs, self.config.max_text_tokens)
        probs = torch.softmax(self(enc["input_ids"], enc["attention_mask"]).logits, dim=-1)
        best = probs.argmax(-1)
        return [(self.config.id2label[int(i)], float(probs[row, i])) for row, i in enumerate(best)]


def _register() -> None:
    """Make the model known to transformers' auto classes (pipelines look it up there)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    try:
        AutoConfig.register(PromptClassifierConfig.model_type, PromptClassifierConfig)
        AutoModelForSequenceClassification.register(PromptClassifierConfig, PromptClassifierModel)
    except ValueError:  # registered already
        pass


_register()


def _folder(run_dir: Path, language: Optional[str]) -> Path:
    """Where the classifier of this run (or of one language of a monolingual run) lives."""
    for name in (REQUEST_FILE, "labels.json"):
        if not (run_dir / name).is_file():
            raise ConfigError(f"{run_dir}: not a run directory ({name} missing)")
    monolingual = (run_dir / "languages").is_dir()
    if language is None:
        if monolingual:
            raise ConfigError(f"{run_dir}: a monolingual run keeps one model per language: pass --language "
                              f"({', '.join(sorted(p.name for p in (run_dir / 'languages').iterdir()))})")
        return run_dir
    if not monolingual:
        raise ConfigError(f"{run_dir}: a federated or centralized run has one model for every language; "
                          "leave out --language")
    folder = run_dir / "languages" / language
    if not folder.is_dir():
        raise ConfigError(f"{run_dir}: no model for language '{language}'")
    return folder


def load_classifier(run_dir: Path, language: Optional[str] = None) -> PromptClassifierModel:
    """A finished run's classifier (see the module docstring); `language` for a monolingual run.
    A node's personalized model: securefpt.load_classifier(run, node=...) (node/personal.py)."""
    run_dir = Path(run_dir)
    folder = _folder(run_dir, language)
    if not (folder / CLASSIFIER_FILE).is_file():
        raise ConfigError(f"{folder}: no {CLASSIFIER_FILE} (a run that did not finish?)")
    if not (folder / HEAD_FILE).is_file():
        raise ConfigError(f"{run_dir}: each node of this run keeps its own head (personalization.local_head); "
                          "classify with a node's personalized model: --node <its state folder or client id>")
    return from_folder(folder, read_request(run_dir / REQUEST_FILE))


def read_request(path: Path) -> ExperimentRequest:
    """The request a run's nodes trained under (the run directory's, or a node's own copy)."""
    try:
        return ExperimentRequest.from_json(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise ConfigError(f"{path}: not a readable experiment request") from None


def from_folder(folder: Path, cfg: ExperimentRequest) -> PromptClassifierModel:
    """The classifier saved in `folder` by learning/adapter.py, on the backbone the request names."""
    from securefpt.learning.backbone import load_backbone, load_tokenizer
    from securefpt.learning.modeling import build_model, set_trainable

    description = json.loads((folder / CLASSIFIER_FILE).read_text(encoding="utf-8"))
    labels = description["labels"]
    if description["peft_method"] == "full":  # no adapter: the whole backbone is in securefpt's own file
        assembled = build_model(cfg.model, cfg.peft, len(labels), cfg.seed)
        set_trainable(assembled.model, load_arrays(folder / "prompt_encoder.safetensors"))
        encoder, tokenizer, max_text = assembled.model.backbone, assembled.tokenizer, assembled.max_text_tokens
    else:
        from peft import PeftModel

        tokenizer = load_tokenizer(cfg.model)
        backbone = load_backbone(cfg.model, len(tokenizer), cfg.seed)
        encoder = PeftModel.from_pretrained(backbone, str(folder))
        positions = getattr(backbone.config, "max_position_embeddings", cfg.model.max_length)
        max_text = min(cfg.model.max_length, positions - 2) - description["num_virtual_tokens"]
    config = PromptClassifierConfig(pooling=description["pooling"],
                                    num_virtual_tokens=description["num_virtual_tokens"],
                                    hidden_size=encoder.config.hidden_size, max_text_tokens=max_text,
                                    input_prefix=cfg.model.input_prefix,
                                    id2label=dict(enumerate(labels)), label2id={v: i for i, v in enumerate(labels)})
    model = PromptClassifierModel(config, encoder)
    head = load_arrays(folder / HEAD_FILE)
    with torch.no_grad():
        model.head.weight.copy_(torch.as_tensor(head["head.weight"]))
        model.head.bias.copy_(torch.as_tensor(head["head.bias"]))
    model.tokenizer = tokenizer
    return model.eval()
