"""Checks before an engine starts, on the operator's machine: one line per mistake, in seconds.

On the simulation engine every node's files are on this machine, so each node's
configuration, its data binding for the task, its data and labels, and the model it
would load are checked here first. A node still checks all of it again itself (it
trusts no one); this only makes a mistake fail fast, with the file and field named,
before anything is started or written. Both engines on one machine (securefpt's simulation
and `flwr run .`) call `preflight`; `prepare_nodes` picks the virtual nodes' files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from securefpt.coordinator.audit_key import coordinator_key
from securefpt.coordinator.checkpoint import load_checkpoint
from securefpt.coordinator.run_plan import RunPlan, resolve_run
from securefpt.coordinator.secure_aggregation import resolve_settings
from securefpt.engines.dp_planning import with_planned_noise
from securefpt.engines.trial_nodes import write_trial_nodes
from securefpt.errors import ConfigError, DataError, FederationError, ModelUnavailableError
from securefpt.experiment.config import ExperimentConfig
from securefpt.experiment.trial_data import label_space
from securefpt.learning.data import load_examples, read_rows
from securefpt.node.config import Node, load_node
from securefpt.protocol.policy import load_manifests


def _binding(node: Node, path, task: str):
    binding = node.data.get(task)
    if binding is None:
        raise ConfigError(f"{path}: data: no binding for the experiment's task '{task}' "
                          f"(binds {sorted(node.data)})")
    return binding


def federation_nodes(cfg: ExperimentConfig) -> list[Path]:
    """The node configurations of the federation's institutions that serve the experiment's languages."""
    by_language = {m.language: cid for cid, m in load_manifests(cfg.clients).items()}
    paths = []
    for language in cfg.data.languages:
        if language not in by_language:
            continue
        path = Path(cfg.clients) / by_language[language] / "node.yaml"
        if not path.is_file():
            raise ConfigError(f"{path}: institution '{by_language[language]}' has no node configuration")
        paths.append(path)
    return paths


def _nodes(cfg: ExperimentConfig) -> list[tuple[Path, Node]]:
    return [(p, load_node(p, state_base=Path("unused"))) for p in federation_nodes(cfg)]


def task_labels(cfg: ExperimentConfig) -> list[str]:
    """The experiment's label space: declared, else the union of the labels on this machine
    (the federation's node data on the simulation engine, or the trial data)."""
    if cfg.data.labels:
        return list(cfg.data.labels)
    if cfg.clients is None:
        return label_space(cfg.data)
    labels: set[str] = set()
    for path, node in _nodes(cfg):
        binding = _binding(node, path, cfg.data.task)
        language = binding.language or node.language
        try:
            for split in (binding.train_split, binding.eval_split):
                rows = read_rows(binding, language, split)
                labels.update(binding.label_map.get(row.label, row.label) for row in rows)
        except DataError as exc:
            raise DataError(f"{path}: {exc}") from None
    return sorted(labels)


def check_nodes(paths: list[Path], cfg: ExperimentConfig) -> None:
    """Each node's configuration, data, labels and model, as its node would read them."""
    from securefpt.learning.backbone import load_tokenizer, torch_device

    torch_device(cfg.model.device)
    labels = list(cfg.data.labels or task_labels(cfg))
    if len(labels) < 2:
        raise DataError(f"the task '{cfg.data.task}' needs at least 2 labels, the data has {labels}")
    checked_models: set[str] = set()
    for path in paths:
        node = load_node(path, state_base=Path("unused"))  # its state is not touched here
        # a trial node's file lives in a run directory that is removed when the run cannot start
        where = path if cfg.clients is not None else f"data ({node.language})"
        binding = _binding(node, where, cfg.data.task)
        source = node.model_source(cfg.model.name)
        if source is None:
            raise ConfigError(f"{where}: models: this node does not load '{cfg.model.name}' (add it to models:)")
        try:
            load_examples(binding, binding.language or node.language, labels, None, None, cfg.seed, binding.label_map)
        except DataError as exc:
            raise DataError(f"{where}: {exc}") from None
        if source not in checked_models:
            try:
                load_tokenizer(cfg.model.model_copy(update={"name": source}))
            except ModelUnavailableError as exc:
                raise ModelUnavailableError(f"{where}: {exc}") from None
            checked_models.add(source)


def prepare_nodes(cfg: ExperimentConfig, out_dir: Path) -> list[Path]:
    """The virtual nodes' configuration files: the federation's, or trial nodes written for the experiment."""
    if cfg.clients is not None:
        return federation_nodes(cfg)
    folder = out_dir / "nodes"
    existing = [folder / lang / "node.yaml" for lang in cfg.data.languages]
    if all(p.is_file() for p in existing):  # a resumed run keeps its trial nodes (and their ledgers)
        return existing
    return write_trial_nodes(cfg, folder)


def preflight(cfg: ExperimentConfig, out_dir: Path, nodes: Optional[list[Path]]) -> tuple[RunPlan, list[Path]]:
    """A finished run directory or one of another experiment, a node whose files, data, labels or
    model are wrong, a policy that admits nobody, bad secagg.* settings, a wrong audit key: in
    that order. The run, resolved once (coordinator/run_plan.py), and the nodes' files."""
    load_checkpoint(out_dir, cfg, check_experiment=False)  # a finished run directory, before reading any data
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"labels": task_labels(cfg)})})
    cfg = with_planned_noise(cfg)  # distributed DP: the sum's noise multiplier, from target_epsilon
    plan = resolve_run(cfg, out_dir)
    nodes = nodes or prepare_nodes(plan.cfg, out_dir)
    if not nodes:
        raise FederationError("no institution of the federation serves the experiment's languages")
    check_nodes(nodes, plan.cfg)
    if cfg.secagg.enabled:
        resolve_settings(plan.cfg, sum(p.decision.included for p in plan.participants.values()))
    coordinator_key(plan.cfg, out_dir, plan.policy)
    return plan, nodes
