"""The operator's experiment: its file (config.py), how it is read (loading.py) and, for local
trials, its data (trial_data.py). It runs at the coordinator's operator; a node never reads it."""

from securefpt.experiment.config import ExperimentConfig
from securefpt.experiment.loading import load_config

__all__ = ["ExperimentConfig", "load_config"]
