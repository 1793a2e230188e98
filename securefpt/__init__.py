"""securefpt: privacy-hardened federated prompt tuning of multilingual language models."""

__version__ = "0.2.0"


def load_classifier(run_dir, language=None, node=None):
    """A finished run as a transformers model that classifies text (securefpt/learning/classifier.py);
    `language` for one language of a monolingual run; `node` for a node's personalized model (its
    state folder, or a client id under the run's `nodes/`: securefpt/node/personal.py)."""
    if node is not None:
        from securefpt.node.personal import load_personalized

        return load_personalized(run_dir, node)
    from securefpt.learning.classifier import load_classifier as load

    return load(run_dir, language)
