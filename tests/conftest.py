"""The devices the device-parametrised tests run on: the CPU always, CUDA when torch sees a GPU.

A test takes the ``device`` fixture (or ``@pytest.mark.parametrize("device", DEVICES)``) to run once
per device; every CUDA case is marked ``cuda``, so ``pytest -m cuda`` runs the CUDA cases alone
(benchmarks/gpu_check.sh). float32 on CUDA is computed in float32: TF32 would round products to 10
mantissa bits and the references compare float32 results at 2e-6.
"""
import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

if torch.cuda.is_available():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: a test, or a device case of one, that runs on a CUDA GPU")


def pytest_collection_modifyitems(config, items):
    for item in items:
        spec = getattr(item, "callspec", None)
        if spec is not None and str(spec.params.get("device", "")).startswith("cuda"):
            item.add_marker(pytest.mark.cuda)


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture
def figures(monkeypatch):
    """Every figure flatmin saves during the test, by file name (the files are written too)."""
    from flatmin.analysis import plots
    from flatmin.train import compare_plots, sweep_plots

    saved = {}
    original = plots.save_figure

    def record(fig, path):
        saved[path.name] = fig
        return original(fig, path)

    for module in (plots, compare_plots, sweep_plots):  # each calls the save_figure it imported
        monkeypatch.setattr(module, "save_figure", record)
    return saved
