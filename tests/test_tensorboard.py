"""`--log tensorboard`: event files that TensorBoard's own reader reads back with the per-epoch
metrics of metrics.jsonl, σ, λ, the learning rate and the skipped steps; a resumed run replaces
the epochs it redoes; a missing tensorboard is a one-line error."""
import json
import shlex
import sys

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from flatmin.cli import main
from integration_common import docs_example

QUICK = ["--data", "digits", "--batch-size", "256", "--progress", "none"]


def scalars(folder):
    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_event_files_hold_the_metrics_and_the_method_state(tmp_path):
    out = tmp_path / "run"
    assert main(["train", *QUICK, "--method", "m-arwp", "--epochs", "2", "--log", "tensorboard", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = scalars(out)
    numbers = {k for k, v in rows[0].items() if isinstance(v, (int, float)) and k not in ("epoch", "epochs")}
    assert set(logged) == numbers | {"lam", "skipped_steps"}
    assert {"step_loss", "test_acc", "test_loss", "lr", "sigma"} <= numbers
    for tag in numbers:
        assert [step for step, _ in logged[tag]] == [1, 2], tag
        assert [value for _, value in logged[tag]] == pytest.approx([row[tag] for row in rows], rel=1e-6), tag
    assert logged["lam"] == [(1, 0.5), (2, 0.5)]
    assert logged["skipped_steps"] == [(1, 0.0), (2, 0.0)]
    # metrics.jsonl keeps its own columns: nothing of the TensorBoard extras leaks into it.
    assert "lam" not in rows[0] and "skipped_steps" not in rows[0]


def test_a_resumed_run_logs_each_epoch_once(tmp_path):
    out = tmp_path / "run"
    args = ["train", *QUICK, "--method", "rwp", "--epochs", "3", "--log", "tensorboard", "--out", str(out)]
    assert main([*args, "--stop-after", "2"]) == 0
    # An interruption after epoch 2 was logged but before it was checkpointed: epoch 2 runs again.
    checkpoint = out / "checkpoint.pt"
    state = torch.load(checkpoint, weights_only=False)
    state["epoch"], state["history"] = 1, state["history"][:1]
    torch.save(state, checkpoint)
    assert main(["train", "--resume", str(checkpoint), "--stop-after", "3", "--progress", "none"]) == 0
    logged = scalars(out)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [step for step, _ in logged["test_acc"]] == [1, 2, 3]
    assert [v for _, v in logged["test_acc"]] == pytest.approx([row["test_acc"] for row in rows], rel=1e-6)


def test_compare_logs_every_run_in_its_own_folder(tmp_path):
    out = tmp_path / "cmp"
    assert main(["compare", *QUICK, "--methods", "sgd,m-rwp", "--seeds", "1", "--epochs", "1", "--budget", "epochs",
                 "--log", "tensorboard", "--out", str(out)]) == 0
    sgd, mixed = scalars(out / "sgd" / "seed0"), scalars(out / "m-rwp" / "seed0")
    assert mixed["lam"] == [(1, 0.5)] and "lam" not in sgd  # plain SGD has no λ
    assert sgd["skipped_steps"] == mixed["skipped_steps"] == [(1, 0.0)]
    assert [step for step, _ in mixed["test_acc"]] == [1]


def test_without_tensorboard_the_error_says_what_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    code = main(["train", *QUICK, "--epochs", "1", "--log", "tensorboard", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "--log tensorboard needs TensorBoard" in err[0] and "pip install 'flatmin[tensorboard]'" in err[0]


def test_an_unknown_log_is_named(tmp_path, capsys):
    assert main(["train", "--log", "wandb", "--out", str(tmp_path / "run")]) == 2
    assert "unknown log 'wandb': choose one of tensorboard" in capsys.readouterr().err


def test_documented_tensorboard_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    commands = [shlex.split(line) for line in docs_example("tensorboard").splitlines() if line.startswith("flatmin ")]
    assert commands
    for command in commands:
        assert main(command[1:] + ["--progress", "none"]) == 0
    assert scalars(tmp_path / "runs" / "tb")["lam"]
