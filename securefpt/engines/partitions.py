"""Clients that are not languages: the trial data pooled and split with flwr-datasets.

With `data.partition`, the languages' training rows (each language capped and sampled as
usual) are pooled and split across `clients` partitions by flwr-datasets: IID
(`IidPartitioner` over the pool shuffled with the experiment's seed) or Dirichlet over
languages (`DirichletPartitioner(partition_by="language", alpha)`, the paper's non-IID
setting: small alpha, one language dominates a client). The evaluation rows are split
IID into as many shares, so each client's accuracy estimates the pooled one. Every row
lands in exactly one client. The partitions are written as `jsonl` language folders under
the run directory and the experiment is rewritten to read them, so from there on the
clients are trial nodes like any other; `partitions.json` records what each holds.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from pathlib import Path

from securefpt.errors import DataError
from securefpt.experiment.config import DataConfig, ExperimentConfig
from securefpt.experiment.trial_data import label_space, load_client_data
from securefpt.learning.data import Example

RECORD = "partitions.json"


def client_ids(count: int) -> list[str]:
    return [f"client{k:02d}" for k in range(count)]


def _split_train(rows: list[dict], cfg: ExperimentConfig) -> list[list[int]]:
    """Row indices of each client's training share."""
    import datasets
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    part = cfg.data.partition
    order = list(range(len(rows)))
    random.Random(f"{cfg.seed}:partition").shuffle(order)
    pool = datasets.Dataset.from_dict({"row": order, "language": [rows[i]["language"] for i in order]})
    if part.scheme == "iid":
        partitioner = IidPartitioner(num_partitions=part.clients)
    else:
        partitioner = DirichletPartitioner(num_partitions=part.clients, partition_by="language", alpha=part.alpha,
                                           min_partition_size=1, self_balancing=False, seed=cfg.seed)
    partitioner.dataset = pool
    try:
        return [list(partitioner.load_partition(k)["row"]) for k in range(part.clients)]
    except ValueError as exc:  # Dirichlet draws that leave a client empty, too few rows ...
        raise DataError(f"data.partition: {exc}") from None


def _split_eval(count: int, clients: int, seed: int) -> list[list[int]]:
    order = list(range(count))
    random.Random(f"{seed}:partition-eval").shuffle(order)
    return [order[k::clients] for k in range(clients)]


def _row(ex: Example, labels: list[str], language: str) -> dict:
    return {"text": ex.text, "text_pair": ex.pair, "label": labels[ex.label], "language": language}


def partition_trial_data(cfg: ExperimentConfig, folder: Path) -> ExperimentConfig:
    """Write the clients' partitions under `folder` and return the experiment that reads them."""
    part = cfg.data.partition
    assert part is not None
    labels = list(cfg.data.labels or label_space(cfg.data))
    train, evals = [], []
    for language in cfg.data.languages:
        data = load_client_data(cfg.data, language, labels, cfg.seed)
        train += [_row(ex, labels, language) for ex in data.train]
        evals += [_row(ex, labels, language) for ex in data.eval]
    if len(train) < part.clients or len(evals) < part.clients:
        raise DataError(f"data.partition: {len(train)} training and {len(evals)} evaluation rows cannot "
                        f"give each of {part.clients} clients at least one")
    shares = list(zip(_split_train(train, cfg), _split_eval(len(evals), part.clients, cfg.seed)))
    record = {"scheme": part.scheme, "alpha": part.alpha if part.scheme == "dirichlet" else None,
              "seed": cfg.seed, "clients": {}}
    for client, (train_rows, eval_rows) in zip(client_ids(part.clients), shares):
        home = Path(folder) / client
        home.mkdir(parents=True, exist_ok=True)
        for split, rows in (("train", [train[i] for i in train_rows]), ("dev", [evals[i] for i in eval_rows])):
            text = "".join(json.dumps({k: v for k, v in r.items() if v is not None}, ensure_ascii=False) + "\n"
                           for r in rows)
            (home / f"{split}.jsonl").write_text(text, encoding="utf-8")
        record["clients"][client] = {
            "train": len(train_rows), "eval": len(eval_rows),
            "languages": dict(sorted(Counter(train[i]["language"] for i in train_rows).items())),
            "labels": dict(sorted(Counter(train[i]["label"] for i in train_rows).items())),
            "rows_sha256": hashlib.sha256(json.dumps([sorted(train_rows), sorted(eval_rows)]).encode()).hexdigest(),
        }
    (Path(folder) / RECORD).write_text(json.dumps(record, indent=2), encoding="utf-8")
    data = DataConfig(task=cfg.data.task, labels=labels, source="jsonl", root=Path(folder).resolve(),
                      languages=client_ids(part.clients), train_split="train", eval_split="dev",
                      max_train_per_client=max(len(t) for t, _ in shares), max_eval_per_client=None)
    return cfg.model_copy(update={"data": data})
