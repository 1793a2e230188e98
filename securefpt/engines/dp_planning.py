"""The operator's planning of a distributed-DP run: which noise multiplier of the sum reaches a target epsilon.

Distributed DP needs a public `dp.noise_multiplier` (nodes size their Skellam shares from
it; no node's size may move it). The operator derives it once, before the run (both engines
do it in engines/preflight.py when the config leaves it to dp.target_epsilon), from
public values and its own trial data: the nodes' Poisson rate (batch over the row cap,
where every node samples at that rate; else over the fewest rows), one step a round, and
the smallest rounded sensitivity a node accepts (privacy/distributed.py).
"""

from __future__ import annotations

from securefpt.errors import ConfigError
from securefpt.experiment.config import ExperimentConfig
from securefpt.experiment.trial_data import label_space, load_client_data
from securefpt.learning.modeling import build_model, get_trainable
from securefpt.privacy.distributed import smallest_rounded_sensitivity
from securefpt.privacy.skellam import noise_multiplier_for


def with_planned_noise(cfg: ExperimentConfig) -> ExperimentConfig:
    """Distributed DP without a fixed `dp.noise_multiplier`: the sum's, planned for `dp.target_epsilon`
    over the run (which stays each node's cap). Planned on public values: the row cap; for the operator's
    own trial data without a cap, its fewest rows; a federation's nodes without a cap cannot be planned for."""
    if not cfg.dp.distributed or cfg.dp.noise_multiplier is not None:
        return cfg
    if cfg.clients is not None and cfg.data.largest_train() is None:
        raise ConfigError("dp.mode=distributed: planning the sum's noise multiplier needs the public row cap "
                          "(data.max_train_per_client) or a fixed dp.noise_multiplier")
    sigma = distributed_noise(cfg, cfg.dp.target_epsilon)
    return cfg.model_copy(update={"dp": cfg.dp.model_copy(update={"noise_multiplier": sigma})})


def sampling_rate(cfg: ExperimentConfig) -> float:
    """The nodes' rate: batch over the row cap (every node samples at it), else over the fewest rows."""
    rows = cfg.data.largest_train() or min(len(load_client_data(cfg.data, lang, label_space(cfg.data), cfg.seed)
                                               .train) for lang in cfg.data.languages)
    return min(1.0, cfg.fl.batch_size / rows)


def central_noise(cfg: ExperimentConfig, eps: float) -> float:
    """A trusted server's Gaussian noise multiplier for `eps` over the run, at the nodes' sampling rate."""
    from opacus.accountants.utils import get_noise_multiplier

    return get_noise_multiplier(target_epsilon=eps, target_delta=cfg.dp.delta, sample_rate=sampling_rate(cfg),
                                steps=cfg.fl.rounds, accountant="prv")


def distributed_noise(cfg: ExperimentConfig, eps: float) -> float:
    """The sum's noise multiplier for `eps` over the run."""
    model = build_model(cfg.model, cfg.peft, len(label_space(cfg.data)), cfg.seed).model
    l2, l1 = smallest_rounded_sensitivity(cfg.dp.max_grad_norm, sum(a.size for a in get_trainable(model).values()))
    return noise_multiplier_for(eps, cfg.dp.delta, sampling_rate(cfg), cfg.fl.rounds, l2, l1)
