"""securefpt: privacy-hardened federated prompt tuning of multilingual language models."""

__version__ = "0.1.0"
