"""torch.compile(model) under flatmin: the compiled model trains as the eager one, and the cost is
one recompile for the methods that freeze BatchNorm statistics for a pass (measured with Dynamo's
counters). ``backend="aot_eager"`` traces and guards as Inductor does, without its slow codegen."""
import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters, guard_failures

from integration_common import assert_same_model, batches, closure_on, create, direct, make_body, docs_example


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    guard_failures.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name, graphs", [("rwp", 1), ("arwp", 1), ("sam", 2), ("m-rwp", 2), ("m-arwp", 2)])
def test_a_compiled_model_trains_as_the_eager_one_and_recompiles_at_most_once(name, graphs):
    model = make_body()
    compiled = torch.compile(model, backend="aot_eager")
    opt = create(name, compiled)
    for b in batches(3):
        opt.step(closure_on(compiled, [b]))
    assert_same_model(model, direct(name, [[b] for b in batches(3)]))
    # One graph per setting of BatchNorm's track_running_stats the method uses, compiled once.
    assert counters["stats"]["unique_graphs"] == graphs
    reasons = [str(r) for failures in guard_failures.values() for r in failures]
    assert len(reasons) == graphs - 1
    assert all("track_running_stats" in r for r in reasons)


def test_documented_compile_example_runs(monkeypatch):
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compile_(model, backend="aot_eager", **kw))
    namespace = {}
    exec(docs_example("compile"), namespace)
    assert counters["stats"]["unique_graphs"] == 2  # SAM with BatchNorm: the second pass's graph
