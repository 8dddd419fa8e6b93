"""flatmin under the Hugging Face Trainer: FlatminTrainer's updates equal the direct API for every
method (BatchNorm statistics included), and gradient accumulation, max_grad_norm, the LR schedule,
bf16 and fp16's GradScaler keep their meaning; the method can be picked by name."""
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import SequentialSampler

from transformers import TrainerCallback, TrainingArguments

import flatmin
from flatmin.integrations.huggingface import FlatminTrainer
from integration_common import (BATCH, HP, METHODS, assert_same_model, batches, closure_on, create, data, direct,
                                make_body, docs_example)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


@pytest.fixture(autouse=True)
def fresh_accelerate_precision():
    # TrainingArguments(bf16=True) leaves ACCELERATE_MIXED_PRECISION in the environment, and every
    # later Accelerator of the process would pick it up.
    os.environ.pop("ACCELERATE_MIXED_PRECISION", None)
    yield
    os.environ.pop("ACCELERATE_MIXED_PRECISION", None)


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = make_body()

    def forward(self, x, labels):
        logits = self.body(x)
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


class InOrder(FlatminTrainer):
    """Batches in data order, so that the direct API can take the same ones."""

    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


def dataset(n_batches=4):
    x, y = data(n_batches * BATCH)
    return [{"x": x[i], "labels": y[i]} for i in range(len(y))]


def arguments(tmp_path, **kw):
    settings = dict(output_dir=str(tmp_path), use_cpu=True, report_to="none", disable_tqdm=True, save_strategy="no",
                    logging_strategy="no", per_device_train_batch_size=BATCH, max_steps=2, learning_rate=HP["lr"],
                    lr_scheduler_type="constant", max_grad_norm=0.0, seed=0)
    return TrainingArguments(**{**settings, **kw})


def train(tmp_path, optimizer=None, trainer_class=InOrder, **kw):
    trainer_kw = {key: kw.pop(key) for key in ("flatmin_method", "flatmin_kwargs") if key in kw}
    model = Classifier()
    optimizers = (optimizer(model), None) if optimizer else (None, None)
    trainer = trainer_class(model=model, args=arguments(tmp_path, **kw), train_dataset=dataset(),
                            optimizers=optimizers, **trainer_kw)
    trainer.train()
    return trainer, model


@pytest.mark.parametrize("name", METHODS)
def test_each_update_equals_the_direct_update(tmp_path, name):
    trainer, model = train(tmp_path, lambda m: create(name, m))
    assert_same_model(model.body, direct(name, [[b] for b in batches(2)]))
    assert trainer.state.global_step == 2


def test_accumulation_clipping_schedule_and_logged_loss_keep_their_meaning(tmp_path):
    # Two updates of two micro-batches each, clipped to 0.3, the learning rate decaying linearly to 0
    # over the two updates: the second update runs at half the rate.
    trainer, model = train(tmp_path, lambda m: create("m-arwp", m), gradient_accumulation_steps=2,
                           per_device_train_batch_size=BATCH // 2, max_grad_norm=0.3, lr_scheduler_type="linear",
                           logging_strategy="steps", logging_steps=1)
    want = make_body()
    opt = create("m-arwp", want, max_grad_norm=0.3)
    micro = batches(4, size=BATCH // 2)
    losses = []
    for update, lr in ((0, HP["lr"]), (1, HP["lr"] / 2)):
        for group in opt.param_groups:
            group["lr"] = lr
        losses.append(float(opt.step(closure_on(want, micro[2 * update:2 * update + 2]))))
    assert_same_model(model.body, want)
    logged = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert logged == pytest.approx(losses, abs=1e-4)  # the Trainer rounds the logged loss to 4 places
    assert trainer.flatmin_optimizer.max_grad_norm == 0.3


def test_bf16_gives_the_direct_update_under_autocast(tmp_path):
    trainer, model = train(tmp_path, lambda m: create("m-arwp", m), bf16=True)
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    assert_same_model(model.body, direct("m-arwp", [[b] for b in batches(2)], autocast=autocast))


class WithScaler(InOrder):
    """fp16 on a GPU gives Accelerate a GradScaler; on this CPU-only machine Accelerate makes none
    (fp16 there is plain float32), so the test lends it a CPU one: the scaler's path is the same."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)


def test_fp16_grad_scaler_gives_the_unscaled_update(tmp_path):
    trainer, model = train(tmp_path, lambda m: create("m-arwp", m), trainer_class=WithScaler, max_grad_norm=1.0)
    assert_same_model(model.body, direct("m-arwp", [[b] for b in batches(2)], max_grad_norm=1.0))
    assert trainer.flatmin_optimizer.grad_scaler is trainer.accelerator.scaler
    assert trainer.accelerator.scaler.get_scale() == 2.0**10  # no overflow, no backoff


def test_a_step_the_scaler_skips_is_skipped_for_the_trainer_too(tmp_path):
    # A non-finite loss: the scaler skips the base step and halves its scale once, and the Trainer
    # sees a skipped step, so its linear schedule does not advance either.
    class Poisoned(WithScaler):
        def compute_loss(self, model, inputs, *args, **kwargs):
            return super().compute_loss(model, inputs, *args, **kwargs) * float("inf")

    init = make_body()
    trainer, model = train(tmp_path, lambda m: create("rwp", m, exact_restore=True), trainer_class=Poisoned, max_steps=1,
                           lr_scheduler_type="linear")
    for got, want in zip(model.body.parameters(), init.parameters()):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert trainer.accelerator.scaler.get_scale() == 2.0**9
    assert trainer.accelerator.optimizer_step_was_skipped
    assert trainer.flatmin_optimizer.param_groups[0]["lr"] == HP["lr"]


def test_the_method_by_name_is_built_from_the_training_arguments(tmp_path):
    trainer, model = train(tmp_path, flatmin_method="m-arwp", flatmin_kwargs={"sigma": 0.02}, optim="sgd",
                           weight_decay=0.1, seed=3)
    # The Trainer's recipe: its optimizer class and rate, weight decay except on biases, its seed.
    want = make_body()
    groups = [{"params": [p for n, p in want.named_parameters() if not n.endswith("bias")], "weight_decay": 0.1},
              {"params": [p for n, p in want.named_parameters() if n.endswith("bias")], "weight_decay": 0.0}]
    opt = flatmin.MARWP(groups, torch.optim.SGD, model=want, sigma=0.02, seed=3, lr=HP["lr"])
    for b in batches(2):
        opt.step(closure_on(want, [b]))
    assert_same_model(model.body, want)
    assert isinstance(trainer.flatmin_optimizer, flatmin.MARWP)


@pytest.mark.parametrize("zero", ["optimizer", "model", "model set_to_none=False"])
def test_a_compute_loss_that_zeroes_gradients_leaves_the_mixed_update_alone(tmp_path, zero):
    class Zeroing(InOrder):
        def compute_loss(self, model, inputs, *args, **kwargs):
            loss = super().compute_loss(model, inputs, *args, **kwargs)
            if zero == "optimizer":
                self.optimizer.zero_grad()
            else:
                model.zero_grad(set_to_none=zero == "model")
            return loss

    trainer, model = train(tmp_path, lambda m: create("m-rwp", m), trainer_class=Zeroing)
    assert_same_model(model.body, direct("m-rwp", [[b] for b in batches(2)]))


def test_a_run_resumed_from_a_trainer_checkpoint_ends_on_the_same_weights(tmp_path):
    # The noise generator and m-ARWP's statistics travel in the optimizer's state_dict.
    class StopAfterTwo(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 2

    def run(out, resume=None, callbacks=None):
        model = Classifier()
        trainer = InOrder(model=model, args=arguments(out, max_steps=3, lr_scheduler_type="linear",
                                                      save_strategy="steps", save_steps=1),
                          train_dataset=dataset(), optimizers=(create("m-arwp", model), None), callbacks=callbacks)
        trainer.train(resume_from_checkpoint=resume)
        return model

    whole = run(tmp_path / "whole")
    run(tmp_path / "cut", callbacks=[StopAfterTwo()])
    resumed = run(tmp_path / "cut", resume=str(tmp_path / "cut" / "checkpoint-2"))
    assert_same_model(resumed.body, whole.body, atol=0)


def test_bad_arguments_are_named(tmp_path):
    args = arguments(tmp_path)
    with pytest.raises(ValueError, match="unknown flatmin_method 'mrwp': choose one of sgd, sam"):
        FlatminTrainer(model=Classifier(), args=args, flatmin_method="mrwp")
    with pytest.raises(ValueError, match="flatmin_kwargs needs flatmin_method"):
        FlatminTrainer(model=Classifier(), args=args, flatmin_kwargs={"sigma": 0.1})
    # Neither a method nor an optimizer: the Trainer would train its plain AdamW.
    with pytest.raises(ValueError, match=r"FlatminTrainer needs flatmin_method= \(one of sgd, sam.*'sgd' trains as the "
                                         r"plain Trainer\) or optimizers=\(flatmin optimizer, scheduler\)$"):
        FlatminTrainer(model=Classifier(), args=args, train_dataset=dataset())
    assert FlatminTrainer(model=Classifier(), args=args, flatmin_method="sgd").flatmin_method == "sgd"
    model = Classifier()
    with pytest.raises(ValueError, match="either optimizers=.* or flatmin_method, not both"):
        FlatminTrainer(model=model, args=args, optimizers=(create("rwp", model), None), flatmin_method="rwp")
    own = create("rwp", model, grad_scaler=torch.amp.GradScaler("cpu"))
    trainer = FlatminTrainer(model=model, args=args, train_dataset=dataset(), optimizers=(own, None))
    with pytest.raises(ValueError, match="grad_scaler of its own"):
        trainer.train()


def test_documented_huggingface_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(docs_example("huggingface"), namespace)
    assert namespace["trainer"].state.global_step > 0
