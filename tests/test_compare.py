"""Comparisons as the papers make them: budgets against SGD, paired differences with a t-interval,
flatness side by side."""
import csv
import itertools
import json
import math

import numpy as np
import pytest
import torch

from flatmin.analysis import plots
from flatmin.cli import main
from flatmin.train import TrainConfig, Trainer, compare, train
from flatmin.train.checkpoint import load_checkpoint
from flatmin.train.compare import markdown_report, table_rows
from flatmin.train.loop import budget_updates
from flatmin.train.stats import paired_t_interval

# The 8×8 digits at batch 128: 1347 training samples make 11 batches per epoch (the last one of 67),
# an odd number, so a mixed method pairs 5 per epoch and never matches SGD's 11 updates by whole epochs.
QUICK = dict(data="digits", model="mlp", batch_size=128, progress="none", threads=1)
BATCHES = 11


def cfg_for(tmp_path, name, **kw):
    return TrainConfig(**{**QUICK, "out": str(tmp_path / name), **kw})


def test_budget_formula_by_hand():
    # MNIST-1D at batch 64: 63 batches per epoch, a mixed method makes 31 updates of two batches each.
    assert budget_updates("epochs", 60, 63, 31, 2) == 1860
    assert budget_updates("updates", 60, 63, 31, 2) == 3780
    assert budget_updates("gradients", 60, 63, 31, 2) == 1890
    assert budget_updates("gradients", 60, 63, 63, 3) == 1260  # NRS with the adversarial neighbour
    assert budget_updates("gradients", 1, 11, 11, 2) == 5  # at most SGD's 11 gradients: 10
    with pytest.raises(ValueError, match="unknown budget 'steps'"):
        budget_updates("steps", 1, 11, 11, 1)


# method, budget, base epochs -> updates, gradient evaluations, samples, updates of each epoch begun.
# An epoch of single-batch updates sees all 1347 samples; pairs of full batches never reach the short one.
CASES = [
    ("sgd", "updates", 2, 22, 22, 2 * 1347, [11, 11]),
    ("sam", "updates", 2, 22, 44, 2 * 1347, [11, 11]),
    ("m-rwp", "updates", 2, 22, 44, 22 * 256, [5, 5, 5, 5, 2]),
    ("m-rwp", "epochs", 2, 10, 20, 10 * 256, [5, 5]),
    ("sam", "epochs", 2, 22, 44, 2 * 1347, [11, 11]),
    ("rwp", "gradients", 2, 22, 22, 2 * 1347, [11, 11]),
    ("sam", "gradients", 2, 11, 22, 1347, [11]),
    ("m-rwp", "gradients", 2, 11, 22, 11 * 256, [5, 5, 1]),
    ("nrs", "gradients", 1, 5, 10, 5 * 128, [5]),
]


@pytest.mark.parametrize("method, budget, epochs, updates, grads, samples, per_epoch", CASES)
def test_budgets_give_the_stated_updates_and_gradients(tmp_path, method, budget, epochs, updates, grads, samples,
                                                       per_epoch):
    s = train(cfg_for(tmp_path, "run", method=method, budget=budget, epochs=epochs))
    assert (s["updates"], s["grad_evals"], s["samples_seen"]) == (updates, grads, samples)
    assert [row["updates"] for row in s["history"]] == per_epoch
    assert s["epochs"] == len(per_epoch) and s["completed"] and s["budget"] == budget


def test_budget_too_small_for_a_run_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="leaves nrs no update"):
        Trainer(cfg_for(tmp_path, "x", method="nrs", budget="gradients", epochs=1, batch_size=1024,
                        neighbour="adversarial"))


@pytest.mark.parametrize("method, budget", [("m-arwp", "updates"), ("sam", "gradients"), ("m-rwp", "gradients"),
                                            ("m-arwp", "epochs")])
def test_checkpoint_and_resume_under_each_budget(tmp_path, monkeypatch, method, budget):
    kw = dict(method=method, budget=budget, epochs=3, lr=0.1)
    full = train(cfg_for(tmp_path, "full", **kw))
    cfg = cfg_for(tmp_path, "cut", **kw)
    ctrl_c_at = full["history"][0]["updates"] + 2  # in the middle of the second epoch
    calls = itertools.count()
    update = Trainer._update

    def update_until_ctrl_c(self, batches):
        if next(calls) == ctrl_c_at:
            raise KeyboardInterrupt
        return update(self, batches)

    monkeypatch.setattr(Trainer, "_update", update_until_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg).run()
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "cut")["epoch"] == 1
    resumed = Trainer(cfg, resume=str(tmp_path / "cut")).run()
    assert (resumed["updates"], resumed["grad_evals"]) == (full["updates"], full["grad_evals"])
    a, b = load_checkpoint(tmp_path / "full")["model"], load_checkpoint(tmp_path / "cut")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["test_acc"] == full["test_acc"]


# ---------------------------------------------------------------- differences with uncertainty

def test_paired_t_interval_by_hand():
    # d = 1, 2, 3, 4: mean 2.5, s² = (2.25 + 0.25 + 0.25 + 2.25)/3 = 5/3, t_{0.975, 3} = 3.182446305 (t table).
    mean, half = paired_t_interval([1.0, 2.0, 3.0, 4.0])
    assert mean == pytest.approx(2.5)
    assert half == pytest.approx(3.182446305284263 * math.sqrt(5 / 3) / 2, rel=1e-9)
    # Two differences: t_{0.975, 1} = 12.7062047; a 90 % interval uses t_{0.95, 1} = 6.3137515.
    assert paired_t_interval([0.5, 1.5])[1] == pytest.approx(12.706204736174698 * math.sqrt(0.5) / math.sqrt(2))
    assert paired_t_interval([0.5, 1.5], 0.9)[1] == pytest.approx(6.313751514675041 * 0.5)
    assert paired_t_interval([0.7]) == (0.7, None)
    with pytest.raises(ValueError):
        paired_t_interval([])


def summary(method, seed, acc):
    return {"method": method, "seed": seed, "test_acc": acc, "budget": "updates", "train_loss": 0.1, "gap": 0.2,
            "train_time_s": 1.0, "updates": 10, "updates_per_epoch": 5, "grad_evals": 10, "samples_seen": 640}


def test_rows_pair_differences_by_seed_and_mark_intervals_that_exclude_zero():
    sgd = [0.70, 0.72, 0.71]
    better = [0.73, 0.76, 0.74]  # differences 0.03, 0.04, 0.03: every seed ahead
    mixed = [0.74, 0.70, 0.72]  # differences 0.04, -0.02, 0.01
    summaries = ([summary("sgd", i, a) for i, a in enumerate(sgd)] + [summary("rwp", i, a) for i, a in enumerate(better)]
                 + [summary("sam", i, a) for i, a in reversed(list(enumerate(mixed)))])  # order must not matter
    rows = {r["method"]: r for r in table_rows(summaries, ["sgd", "rwp", "sam"])}
    t = 4.302652729911275  # t_{0.975, 2}
    for method, accs in (("rwp", better), ("sam", mixed)):
        d = np.subtract(accs, sgd)
        assert rows[method]["delta_vs_sgd"] == pytest.approx(d.mean())
        assert rows[method]["delta_ci95"] == pytest.approx(t * d.std(ddof=1) / math.sqrt(3))
    assert rows["sgd"]["delta_vs_sgd"] is None and rows["rwp"]["epochs"] == 2
    md = markdown_report(list(rows.values()), TrainConfig(data="digits", epochs=2, budget="updates"))
    assert "| rwp |" in md and "**+3.33 ± 1.43**" in md
    sam_line = next(line for line in md.splitlines() if line.startswith("| sam |"))
    assert "+1.00 ± 7.45" in sam_line and "**" not in sam_line
    assert "equal updates" in md and "excludes 0" in md


def test_compare_states_budget_counts_and_differences(tmp_path):
    base = cfg_for(tmp_path, "cmp", epochs=1, budget="updates")
    rows = compare(base, ["sgd", "m-rwp", "sam"], seeds=2, log=lambda *_: None)
    assert [(r["method"], r["updates"], r["grad_evals"]) for r in rows] == [
        ("sgd", 11, 11), ("m-rwp", 11, 22), ("sam", 11, 22)]
    assert rows[1]["epochs"] == pytest.approx(11 / 5) and rows[1]["samples"] == 11 * 2 * 128
    out = tmp_path / "cmp"
    with open(out / "results.csv") as handle:
        table = list(csv.DictReader(handle))
    assert {"budget", "epochs", "updates", "grad_evals", "samples", "delta_vs_sgd", "delta_ci95"} <= set(table[0])
    assert all(r["budget"] == "updates" for r in table) and table[0]["delta_vs_sgd"] == ""
    assert float(table[1]["delta_vs_sgd"]) == pytest.approx(rows[1]["delta_vs_sgd"])
    assert "Budget: equal updates" in (out / "results.md").read_text()
    for name in ("accuracy.png", "accuracy_vs_grads.png", "accuracy_vs_time.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG", name


def test_compare_in_two_processes_matches_one(tmp_path):
    # threads=1 in both: the runs then sum in the same order, whichever process trains them.
    rows = [compare(cfg_for(tmp_path, f"jobs{jobs}", epochs=1), ["sgd", "m-arwp"], seeds=1, jobs=jobs,
                    log=lambda *_: None) for jobs in (1, 2)]
    keys = ("method", "test_acc_mean", "delta_vs_sgd", "updates", "grad_evals")
    assert [[r[k] for k in keys] for r in rows[0]] == [[r[k] for k in keys] for r in rows[1]]


# ---------------------------------------------------------------- flatness side by side

def curve_labels(fig):
    return [line.get_label() for ax in fig.axes for line in ax.get_lines() if not line.get_label().startswith("_")]


def test_radius_overlay_pools_the_draws_of_a_group(tmp_path, figures):
    one = {"radii": [0.0, 0.01, 0.1], "losses": [[1.0, 1.0], [1.0, 3.0], [2.0, 6.0]]}
    two = {"radii": [0.0, 0.01, 0.1], "losses": [[2.0, 2.0], [3.0, 5.0], [4.0, 4.0]]}
    plots.overlay_loss_vs_radius([("a", [one]), ("a and b", [one, two])], tmp_path / "r.png")
    fig = figures["r.png"]
    assert curve_labels(fig) == ["a", "a and b"]
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert list(lines["a"].get_xdata()) == [0.01, 0.1]  # σ = 0 is off the log axis
    assert list(lines["a and b"].get_ydata()) == pytest.approx([np.mean([1, 3, 3, 5]), np.mean([2, 6, 4, 4])])
    with pytest.raises(ValueError, match="radii"):
        plots.overlay_loss_vs_radius([("a", [one]), ("c", [{**two, "radii": [0.0, 0.02, 0.1]}])], tmp_path / "x.png")


def test_analyze_overlays_two_checkpoints(tmp_path, capsys, figures):
    for method in ("sgd", "rwp"):
        train(cfg_for(tmp_path, method, method=method, epochs=1))
    out = tmp_path / "both"
    code = main(["analyze", str(tmp_path / "sgd" / "checkpoint.pt"), str(tmp_path / "rwp"), "--what",
                 "trace,density,landscape,radius", "--batches", "1", "--batch-size", "64", "--probes", "3",
                 "--steps", "5", "--draws", "2", "--out", str(out)])
    assert code == 0
    result = json.loads((out / "analysis.json").read_text())
    assert [(e["label"], e["method"], e["seed"]) for e in result["checkpoints"]] == [
        ("sgd seed 0", "sgd", 0), ("rwp seed 0", "rwp", 0)]
    for entry in result["checkpoints"]:
        assert {"trace", "density", "landscape_1d", "landscape_2d", "radius"} <= set(entry)
    for name in ("radius.png", "density.png", "landscape_1d.png"):
        assert curve_labels(figures[name]) == ["sgd seed 0", "rwp seed 0"], name
    assert (out / "landscape_2d-1.png").exists() and (out / "landscape_2d-2.png").exists()
    assert "sgd seed 0" in capsys.readouterr().out


def test_compare_flatness_overlays_every_method(tmp_path, figures):
    base = cfg_for(tmp_path, "cmp", epochs=1, flatness=1, eval_batch_size=256)
    compare(base, ["sgd", "rwp"], seeds=2, log=lambda *_: None)
    out = tmp_path / "cmp"
    result = json.loads((out / "analysis.json").read_text())
    assert sorted((e["method"], e["seed"]) for e in result["checkpoints"]) == [
        ("rwp", 0), ("rwp", 1), ("sgd", 0), ("sgd", 1)]
    for name in ("flatness_radius.png", "flatness_density.png", "flatness_landscape_1d.png"):
        assert curve_labels(figures[name]) == ["sgd (2 seeds)", "rwp (2 seeds)"], name
    bars = figures["flatness.png"]
    assert [ax.get_title() for ax in bars.axes] == ["top Hessian eigenvalue λ_max", "Hessian trace tr H"]
    assert all(len(ax.patches) == 2 for ax in bars.axes)  # one bar per method


# ---------------------------------------------------------------- command line

def run_cli(*args, capsys):
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(code, err, needle):
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("command", ["train", "compare"])
@pytest.mark.parametrize("value", ["weekly", "nan", "0", "-1", ""])
def test_bad_budget_is_one_line(tmp_path, capsys, command, value):
    code, _, err = run_cli(command, "--budget", value, "--epochs", "1", "--out", str(tmp_path / "x"), capsys=capsys)
    one_line_error(code, err, f"unknown budget {value!r}")


def test_bad_checkpoint_lists_are_one_line(tmp_path, capsys):
    train(cfg_for(tmp_path, "a", method="sgd", epochs=1))
    train(cfg_for(tmp_path, "b", method="sgd", epochs=1, data="mnist1d", batch_size=512))
    a, b = str(tmp_path / "a" / "checkpoint.pt"), str(tmp_path / "b")
    code, _, err = run_cli("analyze", a, a, capsys=capsys)
    one_line_error(code, err, "need --out")
    code, _, err = run_cli("analyze", a, str(tmp_path / "a"), "--out", str(tmp_path / "o"), capsys=capsys)
    one_line_error(code, err, "given twice")
    code, _, err = run_cli("analyze", a, b, "--out", str(tmp_path / "o"), capsys=capsys)
    one_line_error(code, err, "different data (digits, mnist1d)")
    code, _, err = run_cli("analyze", a, str(tmp_path / "missing.pt"), "--out", str(tmp_path / "o"), capsys=capsys)
    one_line_error(code, err, "no checkpoint at")


def test_compare_defaults_to_the_papers_protocol_on_mnist1d(capsys):
    assert main(["compare", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: mnist1d" in text and "(default: updates)" in text
