"""flatmin under PyTorch Lightning: automatic optimization equals the direct API for every method
(BatchNorm statistics included), bf16-mixed, 16-mixed through FlatminMixedPrecision, what is refused
and how, and two batches per update with manual_step."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import lightning.pytorch as L
from lightning.pytorch.plugins.precision import MixedPrecision

from flatmin.integrations.lightning import FlatminMixedPrecision, manual_step
from integration_common import (BATCH, METHODS, assert_same_model, batches, closure_on, create, data, direct,
                                direct_pairs, docs_example, make_body)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore:.*LeafSpec.*")
QUIET = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
             enable_model_summary=False)


class Module(L.LightningModule):
    """The shared BatchNorm model; ``zero`` replaces Lightning's zero_grad inside its closure."""

    def __init__(self, name, manual=False, zero=None, **opt_kw):
        super().__init__()
        self.body = make_body()
        self.name, self.opt_kw, self.zero = name, opt_kw, zero
        self.automatic_optimization = not manual

    def loss(self, batch):
        x, y = batch
        return F.cross_entropy(self.body(x), y)

    def training_step(self, batch, batch_idx):
        if self.automatic_optimization:
            return self.loss(batch)
        return manual_step(self, batch, batch_idx, self.loss)

    def configure_optimizers(self):
        return create(self.name, self, **self.opt_kw)

    def optimizer_zero_grad(self, epoch, batch_idx, optimizer):
        if self.zero is None:
            return super().optimizer_zero_grad(epoch, batch_idx, optimizer)
        self.zero(optimizer, self)


def fit(module, n_batches=2, **trainer_kw):
    x, y = data(n_batches * BATCH)
    trainer = L.Trainer(max_epochs=1, **QUIET, **trainer_kw)
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=BATCH))
    return trainer


@pytest.mark.parametrize("name", METHODS)
def test_automatic_optimization_gives_the_direct_update(name):
    module = Module(name)
    fit(module, n_batches=2)
    assert_same_model(module.body, direct(name, [[b] for b in batches(2)]))


ZEROING = {
    "opt.zero_grad()": lambda opt, model: opt.zero_grad(),
    "opt.zero_grad(set_to_none=False)": lambda opt, model: opt.zero_grad(set_to_none=False),
    "model.zero_grad()": lambda opt, model: model.zero_grad(),
    "model.zero_grad(set_to_none=False)": lambda opt, model: model.zero_grad(set_to_none=False),
}


@pytest.mark.parametrize("how", ZEROING)
@pytest.mark.parametrize("name", ["m-rwp", "m-arwp"])
def test_lightning_zeroing_inside_its_closure_leaves_the_mixed_update_alone(name, how):
    # Lightning zeroes .grad between the forward and the backward of every closure call, through the
    # module's optimizer_zero_grad hook; each way of zeroing gives the direct update.
    module = Module(name, zero=ZEROING[how])
    fit(module, n_batches=2)
    assert_same_model(module.body, direct(name, [[b] for b in batches(2)]))


@pytest.mark.parametrize("name", ["sam", "m-arwp"])
def test_bf16_mixed_gives_the_direct_update_under_autocast(name):
    module = Module(name)
    fit(module, n_batches=2, precision="bf16-mixed")
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    assert_same_model(module.body, direct(name, [[b] for b in batches(2)], autocast=autocast))


def direct_fp16(name, updates):
    """The direct API's AMP recipe: fp16 autocast forward, scaled backward, the scaler in the
    optimizer, one ``scaler.update()`` per update; ``updates`` lists the batches of each step."""
    model = make_body()
    scaler = torch.amp.GradScaler("cpu")
    opt = create(name, model, grad_scaler=scaler)

    def closure_on(x, y):
        def closure():
            with torch.autocast("cpu", dtype=torch.float16):
                loss = F.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            return loss
        return closure

    for step_batches in updates:
        opt.step(*[closure_on(x, y) for x, y in step_batches])
        scaler.update()
    return model, scaler


@pytest.mark.parametrize("name", ["rwp", "m-arwp"])
def test_16_mixed_through_flatmin_mixed_precision_equals_the_direct_update_with_its_scaler(name):
    module = Module(name)
    trainer = fit(module, n_batches=2, plugins=[FlatminMixedPrecision("16-mixed", "cpu")])
    model, scaler = direct_fp16(name, [[b] for b in batches(2)])
    assert_same_model(module.body, model)
    plugin_scaler = trainer.precision_plugin.scaler
    assert module.optimizers().optimizer.grad_scaler is plugin_scaler
    # One scaler update per flatmin update: the growth tracker counts updates, as the direct API's does.
    assert plugin_scaler.state_dict() == scaler.state_dict()


def test_two_batch_updates_under_flatmin_mixed_precision():
    module = Module("m-arwp", manual=True)
    fit(module, n_batches=4, plugins=[FlatminMixedPrecision("16-mixed", "cpu")])
    b = batches(4)
    model, _ = direct_fp16("m-arwp", [[b[0], b[1]], [b[2], b[3]]])
    assert_same_model(module.body, model)


def test_lightnings_own_16_mixed_plugin_is_refused_with_a_pointer_to_the_flatmin_one():
    # Lightning's plugin runs the closure before optimizer.step and steps without one.
    with pytest.raises(ValueError, match=r"closure is required.*FlatminMixedPrecision for Lightning's 16-mixed"):
        fit(Module("rwp"), n_batches=1, plugins=[MixedPrecision("16-mixed", "cpu")])


def test_gradient_clipping_is_refused_under_flatmin_mixed_precision():
    with pytest.raises(ValueError, match=r"gradient_clip_val=0.5 .*max_grad_norm="):
        fit(Module("m-arwp"), n_batches=1, plugins=[FlatminMixedPrecision("16-mixed", "cpu")], gradient_clip_val=0.5)


@pytest.mark.parametrize("name", ["sam", "rwp", "m-arwp"])
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_gradient_clipping_is_refused_with_a_pointer_to_max_grad_norm(name, precision):
    # Lightning would clip each pass's gradient inside the closure, not the update's.
    module = Module(name)
    before = [p.detach().clone() for p in module.body.parameters()]
    with pytest.raises(ValueError, match=r"^gradient_clip_val=0.5 would clip each pass's gradient .*max_grad_norm="):
        fit(module, n_batches=1, precision=precision, gradient_clip_val=0.5)
    assert all(torch.equal(a, b) for a, b in zip(before, module.body.parameters()))


def test_a_plain_optimizer_keeps_lightnings_gradient_clipping():
    module = Module("sgd")
    fit(module, n_batches=1, gradient_clip_val=0.5)
    want = make_body()
    closure_on(want, batches(1))()
    assert torch.nn.utils.clip_grad_norm_(want.parameters(), 0.5) > 0.5  # the clip matters
    create("sgd", want).step()
    assert_same_model(module.body, want)


@pytest.mark.parametrize("name", ["rwp", "m-arwp"])
def test_accumulate_grad_batches_is_refused_not_silently_discarded(name):
    # The first batch's backward runs outside optimizer.step; the step would throw that gradient away.
    module = Module(name)
    before = [p.detach().clone() for p in module.body.parameters()]
    with pytest.raises(RuntimeError, match=r"gradient computed outside step\(\).*accumulate_grad_batches"):
        fit(module, n_batches=2, accumulate_grad_batches=2)
    assert all(torch.equal(a, b) for a, b in zip(before, module.body.parameters()))


def test_two_batch_m_arwp_equals_step_on_B1_and_B2():
    # Five batches: updates on (B1, B2) and (B3, B4); the fifth, without a partner, is dropped.
    module = Module("m-arwp", manual=True)
    trainer = fit(module, n_batches=5)
    b = batches(5)
    assert_same_model(module.body, direct_pairs("m-arwp", [(b[0], b[1]), (b[2], b[3])]))
    assert trainer.global_step == 2


@pytest.mark.parametrize("name", ["sgd", "arwp"])
def test_manual_step_takes_one_batch_per_update_for_single_batch_methods(name):
    module = Module(name, manual=True)
    trainer = fit(module, n_batches=3)
    assert_same_model(module.body, direct(name, [[b] for b in batches(3)]))
    assert trainer.global_step == 3


def test_manual_step_needs_manual_optimization():
    module = Module("m-arwp")
    with pytest.raises(ValueError, match="self.automatic_optimization = False"):
        manual_step(module, batches(1)[0], 0, module.loss)


def test_documented_lightning_examples_run():
    namespace = {}
    exec(docs_example("lightning"), namespace)
    exec(docs_example("lightning-pairs"), namespace)
    assert namespace["trainer"].global_step > 0
