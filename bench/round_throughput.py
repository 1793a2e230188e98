"""Training throughput of a federated round against a bare PyTorch loop, same run.

Both do the same optimizer steps on the same model (packaged MiniLM, prompt tuning)
and the same batches: 5 clients x N examples, batch 16, length L. The federated round
runs through Flower's simulation engine (plaintext, then with SecAgg+); the bare loop
trains the 5 clients one after the other in this process. Reported: examples/s of
each and the ratios federated/bare and secure/plaintext (round training time).

    python bench/round_throughput.py [--per-client 48] [--rounds 3] [--max-length 128]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from securefpt.engines.runner import run_experiment
from securefpt.experiment.loading import load_config
from securefpt.experiment.trial_data import label_space, load_client_data
from securefpt.learning.modeling import build_model
from securefpt.learning.training import make_loader


def bare_loop(cfg) -> float:
    """Examples/s of a plain loop: AdamW on the trainable parameters, client after client."""
    labels = label_space(cfg.data)
    data = [load_client_data(cfg.data, lang, labels, cfg.seed).train for lang in cfg.data.languages]
    assembled = build_model(cfg.model, cfg.peft, len(labels), cfg.seed)
    model = assembled.model
    model.train()
    loaders = [list(make_loader(assembled, d, cfg.fl.batch_size, True, i)) for i, d in enumerate(data)]
    loss_fn = nn.CrossEntropyLoss()
    n = sum(len(d) for d in data)
    start = time.perf_counter()
    for batches in loaders:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.fl.lr)
        for batch in batches:
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(batch["input_ids"], batch["attention_mask"]), batch["labels"]).backward()
            optimizer.step()
    return n / (time.perf_counter() - start)


def federated(cfg, out: Path) -> float:
    """Examples/s of the rounds' training phase (rounds after the first, which warms up)."""
    shutil.rmtree(out, ignore_errors=True)  # a fresh run each time
    summary = run_experiment(cfg, out, show_progress=False)
    n = sum(len(load_client_data(cfg.data, lang, summary["labels"], cfg.seed).train) for lang in cfg.data.languages)
    times = [r["train_seconds"] for r in summary["rounds"][1:]] or [summary["rounds"][0]["train_seconds"]]
    return n / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--per-client", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-throughput"))
    args = parser.parse_args()
    root = Path(__file__).resolve().parents[2] / "shared" / "data" / "masakhanews"
    data = (["data.source=masakhanews_tsv", f"data.root={root}", "data.train_split=test", "data.eval_split=dev"]
            if (root / "eng" / "test.tsv").is_file() else ["data.source=demo"])
    base = data + [f"data.max_train_per_client={args.per_client}", "data.max_eval_per_client=16",
                   f"model.max_length={args.max_length}", f"fl.rounds={args.rounds}", "fl.batch_size=16"]
    print(f"torch threads: {torch.get_num_threads()}; data: {data[0]}")
    bare = bare_loop(load_config(None, base))
    print(f"bare loop:           {bare:7.2f} examples/s")
    plain = federated(load_config(None, base + ["secagg.enabled=false"]), args.out / "plain")
    print(f"federated plaintext: {plain:7.2f} examples/s   ratio to bare {plain / bare:.2f}")
    secure = federated(load_config(None, base + ["secagg.enabled=true"]), args.out / "secure")
    print(f"federated SecAgg+:   {secure:7.2f} examples/s   ratio to bare {secure / bare:.2f}")
    print(f"secure round time / plaintext round time: {plain / secure:.2f}x")


if __name__ == "__main__":
    main()
