"""One entry point for an experiment, whatever its paradigm."""

from __future__ import annotations

from pathlib import Path

from securefpt.experiment.config import ExperimentConfig

PARTITIONS = "partitions"  # the clients' data of a partitioned trial, inside the run directory


def run_experiment(cfg: ExperimentConfig, out_dir: Path, show_progress: bool = True, verbose: bool = False) -> dict:
    """Run `cfg` and return its summary (also written to `out_dir/summary.json`)."""
    if cfg.data.partition is not None:
        from securefpt.engines.partitions import partition_trial_data

        cfg = partition_trial_data(cfg, Path(out_dir) / PARTITIONS)
    if cfg.paradigm == "federated":
        from securefpt.engines.simulation import run_federated_simulation

        return run_federated_simulation(cfg, out_dir, show_progress=show_progress, verbose=verbose)
    from securefpt.engines.paradigms import run_local_paradigm

    return run_local_paradigm(cfg, out_dir, show_progress=show_progress)
