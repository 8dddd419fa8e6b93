"""`flatmin train` under torchrun: 2 workers on CPU with gloo, on loopback, each run time-bounded."""
import json
import os
import subprocess
import sys

import pytest
import torch

from flatmin.distributed import free_port
from flatmin.train.checkpoint import load_checkpoint

BASE = ["--data", "digits", "--model", "mlp", "--batch-size", "64", "--progress", "none"]


def torchrun(*args, timeout=180):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
               "127.0.0.1", "--master-port", str(free_port()), "-m", "flatmin", "train", *BASE, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # start_new_session: on a timeout the whole group (torchrun and its workers) is killed.
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
    return proc.returncode, out


@pytest.mark.parametrize("method, extra", [("m-arwp", ["--parallel"]), ("sam", []), ("arwp", []), ("nrs", [])])
def test_torchrun_trains_and_rank0_alone_writes(tmp_path, method, extra):
    code, out = torchrun("--method", method, "--epochs", "2", "--out", str(tmp_path / "run"), *extra)
    assert code == 0, out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["workers"] == 2 and summary["completed"]
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2
    assert out.count(f"{method} on digits/mlp") == 1  # one report, from rank 0
    # Evaluation covers the test set once across both ranks: accuracy is a multiple of 1/450.
    assert abs(summary["test_acc"] * 450 - round(summary["test_acc"] * 450)) < 1e-6


def test_torchrun_resume_ends_on_the_same_weights(tmp_path):
    args = ["--method", "m-arwp", "--parallel", "--epochs", "3"]
    code, out = torchrun(*args, "--out", str(tmp_path / "full"))
    assert code == 0, out
    ckpt = tmp_path / "cut" / "checkpoint.pt"
    code, out = torchrun(*args, "--stop-after", "1", "--out", str(tmp_path / "cut"))
    assert code == 0, out
    assert load_checkpoint(ckpt)["epoch"] == 1
    assert f"stopped after epoch 1 of 3; continue with: flatmin train --resume {ckpt}" in out
    summary = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert (summary["completed"], summary["stopped_early"], summary["epochs_done"]) == (False, True, 1)
    code, out = torchrun("--resume", str(ckpt))  # continues to the end: --stop-after is not inherited
    assert code == 0, out
    assert "stopped after" not in out and json.loads((tmp_path / "cut" / "summary.json").read_text())["completed"]
    full, cut = load_checkpoint(tmp_path / "full")["model"], load_checkpoint(tmp_path / "cut")["model"]
    for k in full:
        assert torch.equal(full[k], cut[k]), k


def test_parallel_needs_an_even_number_of_workers_and_a_mixed_method(tmp_path, capsys):
    from flatmin.cli import main

    assert main(["train", *BASE, "--method", "m-rwp", "--parallel", "--out", str(tmp_path)]) == 2
    assert "even number of workers" in capsys.readouterr().err
    assert main(["train", *BASE, "--method", "sam", "--parallel", "--out", str(tmp_path)]) == 2
    assert "--parallel is for the mixed methods" in capsys.readouterr().err
