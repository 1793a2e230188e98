"""securefpt: privacy-hardened federated prompt tuning of multilingual language models."""

__version__ = "0.2.0"


def load_classifier(run_dir, language=None):
    """A finished run as a transformers model that classifies text (securefpt/learning/classifier.py)."""
    from securefpt.learning.classifier import load_classifier as load

    return load(run_dir, language)
