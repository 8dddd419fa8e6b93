"""The training loop, checkpoints and resume, the comparison and the command line."""
import json
import subprocess
import sys

import pytest
import torch

from flatmin.analysis import hessian_eigenvalues
from flatmin.cli import main
from flatmin.data import split_loader
from flatmin.train import TrainConfig, Trainer, compare, train
from flatmin.train.checkpoint import load_checkpoint, save_checkpoint
from flatmin.train.config import ConfigError
from flatmin.train.loop import load_trained
from test_data import square_image_folder

QUICK = dict(data="digits", model="mlp", epochs=3, batch_size=128, progress="none")


def cfg_for(tmp_path, **kw):
    return TrainConfig(**{**QUICK, "out": str(tmp_path / "run"), **kw})


def test_the_command_imports_neither_dtensor_nor_matplotlib_and_a_run_no_matplotlib(tmp_path):
    # Each takes about half a second to import. (torch's first optimizer loads TorchDynamo, which loads
    # DTensor: a run pays that whatever flatmin does.)
    def imported(code):
        heavy = ("matplotlib", "torch.distributed.tensor")
        probe = f"import sys; {code}; print(sorted(m for m in {heavy!r} if m in sys.modules))"
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip().splitlines()[-1]

    assert imported("import flatmin.cli") == "[]"
    argv = ["train", "--epochs", "1", "--progress", "none", "--out", str(tmp_path)]
    run = f"import flatmin.cli; flatmin.cli.main({argv!r})"
    assert "matplotlib" not in imported(run)


def test_train_writes_metrics_summary_and_checkpoint(tmp_path):
    summary = train(cfg_for(tmp_path, method="m-arwp"))
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk["test_acc"] == summary["test_acc"] and 0.5 < summary["test_acc"] <= 1.0
    # The mixed method takes two batches per update: half the updates, two gradients each.
    batches = -(-1347 // 128)
    assert summary["updates"] == 3 * (batches // 2)
    assert summary["grad_evals"] == 2 * summary["updates"]
    assert summary["gap"] == pytest.approx(summary["train_acc"] - summary["test_acc"])
    for key in ("config", "versions", "seed", "train_loss", "train_time_s", "wall_time_s", "peak_memory_mb"):
        assert key in summary
    assert load_checkpoint(run)["epoch"] == 3


def test_budget_of_each_method(tmp_path):
    batches = -(-1347 // 128)
    for method, updates, grads in [("sgd", batches, 1), ("rwp", batches, 1), ("sam", batches, 2),
                                   ("m-rwp", batches // 2, 2)]:
        s = train(cfg_for(tmp_path, method=method, epochs=1, out=str(tmp_path / method)))
        assert (s["updates"], s["grad_evals"]) == (updates, updates * grads), method


def test_same_seed_gives_identical_runs(tmp_path):
    a = train(cfg_for(tmp_path, method="arwp", out=str(tmp_path / "a")))
    b = train(cfg_for(tmp_path, method="arwp", out=str(tmp_path / "b")))
    assert a["test_acc"] == b["test_acc"] and a["train_loss"] == b["train_loss"]
    wa, wb = load_checkpoint(tmp_path / "a")["model"], load_checkpoint(tmp_path / "b")["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


class Interrupt(Trainer):
    """Ctrl-C after ``stop_after`` updates of the run."""

    stop_after = 0

    def _update(self, batches):
        Interrupt.stop_after -= 1
        if Interrupt.stop_after < 0:
            raise KeyboardInterrupt
        return super()._update(batches)


@pytest.mark.parametrize("method", ["arwp", "m-arwp", "sam"])
def test_resume_after_ctrl_c_ends_on_the_same_weights(tmp_path, method):
    kw = dict(method=method, epochs=4, lr=0.1, val_fraction=0.2)
    train(cfg_for(tmp_path, out=str(tmp_path / "full"), **kw))
    full = load_checkpoint(tmp_path / "full")

    cfg = cfg_for(tmp_path, out=str(tmp_path / "cut"), **kw)
    per_epoch = Trainer(cfg).updates_per_epoch
    Interrupt.stop_after = 2 * per_epoch + 2  # in the middle of epoch 3
    with pytest.raises(KeyboardInterrupt):
        Interrupt(cfg).run()
    assert load_checkpoint(tmp_path / "cut")["epoch"] == 2  # the last complete checkpoint survives
    resumed = Trainer(cfg, resume=str(tmp_path / "cut")).run()
    cut = load_checkpoint(tmp_path / "cut")
    for k, v in full["model"].items():
        assert torch.equal(v, cut["model"][k]), k
    rows = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert resumed["test_acc"] == json.loads((tmp_path / "full" / "summary.json").read_text())["test_acc"]


def cli_train(*args, capsys):
    """``flatmin train`` on the digits in this process: exit code and the lines printed to stdout."""
    code = main(["train", "--data", "digits", "--model", "mlp", "--batch-size", "128", "--progress", "none", *args])
    return code, capsys.readouterr().out.strip().splitlines()


def test_stop_after_then_resume_continues_to_the_end_like_an_uninterrupted_run(tmp_path, capsys):
    full, cut = tmp_path / "full", tmp_path / "cut"
    ckpt = cut / "checkpoint.pt"
    code, lines = cli_train("--epochs", "3", "--out", str(full), capsys=capsys)
    assert code == 0 and lines[-1].startswith("arwp on digits/mlp: test_acc")  # a complete run ends as usual

    code, lines = cli_train("--epochs", "3", "--stop-after", "1", "--out", str(cut), capsys=capsys)
    assert code == 0 and lines[-1] == f"stopped after epoch 1 of 3; continue with: flatmin train --resume {ckpt}"
    summary = json.loads((cut / "summary.json").read_text())
    assert (summary["completed"], summary["stopped_early"], summary["epochs_done"], summary["epochs"]) == (
        False, True, 1, 3)
    # --stop-after given again on resume applies again ...
    code, lines = cli_train("--resume", str(ckpt), "--stop-after", "2", capsys=capsys)
    assert code == 0 and lines[-1] == f"stopped after epoch 2 of 3; continue with: flatmin train --resume {ckpt}"
    assert load_checkpoint(ckpt)["epoch"] == 2
    # ... and one that would stop where the checkpoint already is says it trained nothing.
    code, lines = cli_train("--resume", str(ckpt), "--stop-after", "2", capsys=capsys)
    assert code == 0 and lines[-1].startswith(f"nothing trained: --stop-after 2 and {ckpt} is at epoch 2 of 3;")
    # Without it the resumed run goes to the end of its schedule: the checkpoint's stop_after is not inherited.
    code, lines = cli_train("--resume", str(ckpt), capsys=capsys)
    assert code == 0 and lines[-1].startswith("arwp on digits/mlp: test_acc")
    summary = json.loads((cut / "summary.json").read_text())
    assert (summary["completed"], summary["stopped_early"], summary["epochs_done"], summary["start_epoch"]) == (
        True, False, 3, 2)

    # The same run as the uninterrupted one: weights bit for bit, metrics of every epoch, summary.
    a, b = load_checkpoint(full)["model"], load_checkpoint(cut)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    same = ("epoch", "updates", "samples", "step_loss", "test_loss", "test_acc", "lr", "sigma")
    rows = [[{k: r[k] for k in same} for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]
            for run in (full, cut)]
    assert rows[0] == rows[1] and [r["epoch"] for r in rows[1]] == [1, 2, 3]
    expected = json.loads((full / "summary.json").read_text())
    for key in ("test_acc", "test_loss", "train_acc", "train_loss", "updates", "grad_evals", "samples_seen"):
        assert summary[key] == expected[key], key

    # A complete run resumed again has nothing left to do, and says so; fewer epochs than done is an error.
    code, lines = cli_train("--resume", str(ckpt), capsys=capsys)
    assert code == 0 and lines[-1].startswith(f"nothing left to train: {ckpt} is at epoch 3 of 3, the run is complete")
    assert all(torch.equal(b[k], load_checkpoint(cut)["model"][k]) for k in b)
    code = main(["train", "--resume", str(ckpt), "--epochs", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "epochs=2 is fewer than the 3 epochs checkpoint" in err and len(err.splitlines()) == 1
    # A fresh run in a used folder is refused; with --overwrite it starts its own metrics.jsonl
    # rather than appending to the old one.
    assert main(["train", "--batch-size", "128", "--progress", "none", "--epochs", "1", "--out", str(full)]) == 2
    assert "pass --resume to continue it or --overwrite to replace it" in capsys.readouterr().err
    assert cli_train("--epochs", "1", "--out", str(full), "--overwrite", capsys=capsys)[0] == 0
    assert [json.loads(line)["epoch"] for line in (full / "metrics.jsonl").read_text().splitlines()] == [1]


@pytest.mark.parametrize("method", ["sgd", "m-arwp"])
def test_fp16_amp_trains_and_keeps_its_scaler_in_the_checkpoint(tmp_path, method):
    # The scaler's scale must be updated after every step (GradScaler refuses a second unscale_ before it).
    summary = train(cfg_for(tmp_path, method=method, epochs=2, amp="fp16"))
    assert summary["completed"] and summary["test_acc"] > 0.5 and summary["train_loss"] < 2.0
    assert load_checkpoint(tmp_path / "run")["scaler"]["scale"] > 0


def test_checkpoints_are_written_atomically(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"epoch": 1})

    def broken_save(obj, handle):
        handle.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"epoch": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_compare_writes_the_table_and_the_plot(tmp_path):
    base = cfg_for(tmp_path, epochs=2, out=str(tmp_path / "cmp"))
    rows = compare(base, ["sgd", "rwp", "m-rwp"], seeds=2, log=lambda *_: None)
    assert [r["method"] for r in rows] == ["sgd", "rwp", "m-rwp"]
    assert all(r["seeds"] == 2 for r in rows)
    assert rows[0]["time_vs_sgd"] == pytest.approx(1.0)
    out = tmp_path / "cmp"
    md = (out / "results.md").read_text()
    assert "m-rwp" in md and "±" in md
    assert (out / "results.csv").read_text().startswith("method,")
    assert (out / "accuracy_vs_time.png").stat().st_size > 1000
    assert (out / "rwp" / "seed1" / "summary.json").exists()


# ---------------------------------------------------------------- command line

def run_cli(*args, capsys):
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_yaml_config_and_flag_override(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(f"data: digits\nmodel: mlp\nmethod: sgd\nepochs: 1\nbatch-size: 256\nout: {tmp_path / 'y'}\n"
                      "progress: none\n")
    code, out, _ = run_cli("train", "--config", str(config), "--method", "rwp", capsys=capsys)
    assert code == 0
    summary = json.loads((tmp_path / "y" / "summary.json").read_text())
    assert summary["method"] == "rwp" and summary["config"]["batch_size"] == 256
    config.write_text("epochs: 1\nlearning_rate: 0.1\n")
    code, _, err = run_cli("train", "--config", str(config), capsys=capsys)
    assert code == 2 and "unknown setting 'learning_rate'" in err


def test_python_dash_m_help_documents_every_flag_with_its_default():
    result = subprocess.run([sys.executable, "-m", "flatmin", "train", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0
    for flag in ("--data", "--model", "--method", "--epochs", "--batch-size", "--lr", "--sigma", "--lam", "--eta",
                 "--beta", "--rho", "--seed", "--out", "--resume", "--device", "--amp", "--config"):
        assert flag in result.stdout, flag
    assert "(default: digits)" in result.stdout and "(default: 60)" in result.stdout


def test_nrs_trains_through_the_trainer_and_resumes_its_noise(tmp_path):
    kw = dict(method="nrs", epochs=2, alpha=0.5, sigma=0.02)
    summary = train(cfg_for(tmp_path, out=str(tmp_path / "a"), **kw))
    assert summary["hparams"] == {"alpha": 0.5, "sigma": 0.02, "neighbour": "random", "divergence": "kl"}
    assert summary["grad_evals"] == 2 * summary["updates"]
    ckpt = load_checkpoint(tmp_path / "a")
    assert ckpt["nrs"]["generator"] is not None
    cfg = cfg_for(tmp_path, out=str(tmp_path / "b"), **kw)
    Interrupt.stop_after = Trainer(cfg).updates_per_epoch + 1
    with pytest.raises(KeyboardInterrupt):
        Interrupt(cfg).run()
    Trainer(cfg, resume=str(tmp_path / "b")).run()
    resumed = load_checkpoint(tmp_path / "b")["model"]
    assert all(torch.equal(v, resumed[k]) for k, v in ckpt["model"].items())


def test_flatness_in_the_summary_and_the_comparison(tmp_path):
    base = cfg_for(tmp_path, epochs=1, flatness=2, out=str(tmp_path / "cmp"))
    rows = compare(base, ["sgd", "rwp"], seeds=1, log=lambda *_: None)
    assert all(r["hessian_top"] > 0 and r["hessian_trace"] > 0 for r in rows)
    assert "λ_max" in (tmp_path / "cmp" / "results.md").read_text()


def test_analyze_command_writes_json_and_plots(tmp_path, capsys):
    train(cfg_for(tmp_path, epochs=1))
    run = tmp_path / "run"
    code = main(["analyze", str(run / "checkpoint.pt"), "--batches", "1", "--k", "2", "--probes", "4",
                 "--steps", "5", "--draws", "2", "--out", str(tmp_path / "an")])
    assert code == 0
    result = json.loads((tmp_path / "an" / "analysis.json").read_text())["checkpoints"][0]
    assert len(result["eigenvalues"]) == 2 and result["eigenvalues"][0] >= result["eigenvalues"][1]
    for name in ("density", "landscape_1d", "landscape_2d", "radius"):
        assert (tmp_path / "an" / f"{name}.png").exists()
    code, _, err = run_cli("analyze", str(tmp_path / "missing.pt"), capsys=capsys)
    assert code == 2 and "no checkpoint" in err
    code, _, err = run_cli("analyze", str(run), "--what", "curvature", capsys=capsys)
    assert code == 2 and "curvature" in err and "Traceback" not in err


def test_image_folder_runs_are_measured_on_their_training_split(tmp_path, capsys):
    images = square_image_folder(tmp_path / "images", side=16, train=4, val=2)
    run = tmp_path / "run"
    code = main(["train", "--data", "imagefolder", "--data-dir", str(images), "--model", "mlp", "--method", "sgd",
                 "--epochs", "1", "--batch-size", "4", "--flatness", "1", "--progress", "none", "--out", str(run)])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((run / "summary.json").read_text())
    # The images' own size and statistics, recorded; the flatness of the training split, named.
    assert summary["preprocessing"]["image_size"] == 16 and summary["preprocessing"]["normalize"] == "data"
    assert summary["flatness_split"] == "train"
    _, model, dataset = load_trained(str(run))
    batches = [next(iter(split_loader(dataset, "train", 1024, seed=0)))]
    assert summary["hessian_top"] == pytest.approx(
        hessian_eigenvalues(model, torch.nn.CrossEntropyLoss(), batches, k=1, iters=30, tol=1e-3, seed=0)[0], rel=1e-4)

    # analyze: no val split (that is --val-fraction's), one line, and no analysis/ folder left behind.
    code, _, err = run_cli("analyze", str(run), "--what", "trace", "--probes", "2", "--split", "val", capsys=capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--split val: this run has no val split" in err and "it has train, test" in err
    assert not (run / "analysis").exists()
    # By default the training split (train/), with --split test the val/ folder; each says which.
    for split in ("train", "test"):
        code, out, err = run_cli("analyze", str(run), "--what", "trace,radius", "--probes", "2", "--draws", "1",
                                 *(["--split", split] if split == "test" else []), capsys=capsys)
        assert code == 0, err
        result = json.loads((run / "analysis" / "analysis.json").read_text())
        assert result["split"] == split and result["checkpoints"][0]["split"] == split
        assert f"{split} split" in out


def test_a_run_folder_is_replaced_only_with_overwrite(tmp_path, capsys):
    run = tmp_path / "run"
    args = ("train", "--method", "sgd", "--batch-size", "256", "--progress", "none", "--out", str(run))
    assert run_cli(*args, "--epochs", "1", capsys=capsys)[0] == 0
    before = (run / "summary.json").read_bytes(), (run / "checkpoint.pt").read_bytes()
    code, _, err = run_cli(*args, "--epochs", "2", capsys=capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "holds a run already (checkpoint.pt, summary.json): pass --resume to continue it or --overwrite" in err
    assert ((run / "summary.json").read_bytes(), (run / "checkpoint.pt").read_bytes()) == before
    with pytest.raises(ConfigError, match="holds a run already"):
        train(cfg_for(tmp_path, method="sgd", epochs=1))
    code, _, err = run_cli(*args, "--overwrite", "--resume", capsys=capsys)
    assert code == 2 and "--overwrite does not combine with --resume" in err
    assert run_cli(*args, "--epochs", "2", "--overwrite", capsys=capsys)[0] == 0
    assert json.loads((run / "summary.json").read_text())["epochs"] == 2
    # A resumed run does not inherit --overwrite: the checkpoint's config holds it, the next run not.
    assert load_checkpoint(run)["config"]["overwrite"] is True

    # compare refuses before any run when a run folder of it holds a run, and reruns with --overwrite.
    cmp = ["compare", "--data", "digits", "--methods", "sgd", "--seeds", "1", "--epochs", "1", "--batch-size", "256",
           "--progress", "none", "--out", str(tmp_path / "cmp")]
    assert run_cli(*cmp, capsys=capsys)[0] == 0
    runs = (tmp_path / "cmp" / "runs.json").read_bytes()
    code, _, err = run_cli(*cmp, capsys=capsys)
    assert code == 2 and "holds runs of an earlier comparison" in err and "--overwrite" in err
    assert (tmp_path / "cmp" / "runs.json").read_bytes() == runs
    assert run_cli(*cmp, "--overwrite", capsys=capsys)[0] == 0


def test_compare_runs_use_one_thread_unless_told_so_results_do_not_depend_on_jobs(tmp_path, capsys):
    runs = []
    for jobs in ("1", "2"):
        out = tmp_path / f"jobs{jobs}"
        code, _, err = run_cli("compare", "--data", "digits", "--methods", "sgd", "--seeds", "2", "--epochs", "1",
                               "--batch-size", "128", "--jobs", jobs, "--out", str(out), capsys=capsys)
        assert code == 0, err
        runs.append(json.loads((out / "runs.json").read_text()))
    for a, b in zip(*runs):
        assert a["threads"] == b["threads"] == 1 and a["config"]["threads"] == 1
        assert (a["method"], a["test_acc"], a["test_loss"], a["train_loss"]) == (
            b["method"], b["test_acc"], b["test_loss"], b["train_loss"])
