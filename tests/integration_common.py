"""What the framework tests share: a small model with BatchNorm, fixed batches, the direct-API
update they are compared with, and the documentation's examples."""
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import flatmin

METHODS = ["sgd", "sam", "asam", "rwp", "arwp", "m-rwp", "m-arwp"]
HP = {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3}
BATCH = 12
DOCS = Path(__file__).resolve().parents[1] / "docs"


def make_body() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


def data(n: int = 4 * BATCH):
    """The first ``n`` samples of one fixed pool (whatever ``n``, the same samples come first)."""
    assert n <= 10 * BATCH
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(10 * BATCH, 6, generator=g), torch.randint(0, 3, (10 * BATCH,), generator=g)
    return x[:n], y[:n]


def batches(n: int = 4, size: int = BATCH):
    """Consecutive batches of ``data()``, in order."""
    x, y = data(n * size)
    return [(x[i * size:(i + 1) * size], y[i * size:(i + 1) * size]) for i in range(n)]


def create(name: str, model: nn.Module, **kw) -> torch.optim.Optimizer:
    extra = {} if name == "sgd" else {"seed": 0}
    return flatmin.create(name, model, **HP, **extra, **kw)


def closure_on(model, parts, autocast=None):
    """Forward and backward of the mean loss over ``parts`` (micro-batches of one batch, each
    weighted 1/len(parts), as a trainer accumulating them does)."""
    def closure():
        total = torch.zeros(())
        for x, y in parts:
            with autocast() if autocast else torch.enable_grad():
                loss = F.cross_entropy(model(x), y) / len(parts)
            loss.backward()
            total = total + loss.detach()
        return total
    return closure


def direct(name: str, updates, autocast=None, **kw) -> nn.Module:
    """The model after the direct API's updates; ``updates`` is a list of updates, each a list of
    batches: one (micro-batches of a single closure) or, with ``pairs``, B1 and B2 of a mixed step."""
    model = make_body()
    opt = create(name, model, **kw)
    for parts in updates:
        if name == "sgd":
            opt.zero_grad()
        opt.step(closure_on(model, parts, autocast))
    return model


def direct_pairs(name: str, pairs, **kw) -> nn.Module:
    """The model after ``opt.step(closure(B1), closure(B2))`` for each pair."""
    model = make_body()
    opt = create(name, model, **kw)
    for b1, b2 in pairs:
        opt.step(closure_on(model, [b1]), closure_on(model, [b2]))
    return model


def assert_same_model(got: nn.Module, want: nn.Module, atol: float = 1e-6) -> None:
    """Weights and buffers (BatchNorm's running statistics and batch count) alike."""
    got, want = got.state_dict(), want.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key].double(), want[key].double(), rtol=0, atol=atol,
                                   msg=lambda message: f"{key}: {message}")


def docs_example(name: str) -> str:
    """The code block that follows ``<!-- example: name -->`` in a page of the documentation (docs/)."""
    found = [match.group(1) for page in sorted(DOCS.rglob("*.md"))
             for match in re.finditer(rf"<!-- example: {re.escape(name)} -->\s*```\w*\n(.*?)```", page.read_text(), re.S)]
    assert len(found) == 1, f"docs/ has {len(found)} examples marked {name!r}, not one"
    return found[0]
