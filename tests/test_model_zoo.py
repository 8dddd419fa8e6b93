"""Models by name: shapes, sizes, initialisation and errors."""
import pytest
import torch

from flatmin.models import MODELS, create_model


@pytest.mark.parametrize("name, shape, classes", [
    ("mlp", (1, 8, 8), 10), ("mlp", (1, 40), 10), ("cnn", (1, 8, 8), 10), ("cnn", (1, 40), 10),
    ("cnn", (3, 32, 32), 100), ("resnet18", (3, 32, 32), 10), ("vgg16bn", (3, 32, 32), 10),
    ("wrn16-8", (3, 32, 32), 10), ("resnet18-imagenet", (3, 64, 64), 7), ("resnet50-imagenet", (3, 64, 64), 7),
])
def test_output_shape(name, shape, classes):
    model = create_model(name, classes, shape)
    assert model(torch.randn(2, *shape)).shape == (2, classes)


@pytest.mark.parametrize("name, shape, classes, millions", [
    ("resnet18", (3, 32, 32), 10, 11.17), ("wrn28-10", (3, 32, 32), 10, 36.48), ("wrn16-8", (3, 32, 32), 10, 10.96),
    ("resnet18-imagenet", (3, 224, 224), 1000, 11.69), ("resnet50-imagenet", (3, 224, 224), 1000, 25.56),
    ("vgg16bn", (3, 32, 32), 10, 14.72),
])
def test_parameter_counts_match_the_published_architectures(name, shape, classes, millions):
    count = sum(p.numel() for p in create_model(name, classes, shape).parameters())
    assert count / 1e6 == pytest.approx(millions, abs=0.01)


def test_initialisation_is_deterministic_under_a_seed():
    torch.manual_seed(1)
    a = create_model("resnet18", 10, (3, 32, 32))
    torch.manual_seed(1)
    b = create_model("resnet18", 10, (3, 32, 32))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_unknown_name_and_unfit_input_are_clear_errors():
    with pytest.raises(ValueError, match="unknown model 'resnet34'.*" + MODELS[-1]):
        create_model("resnet34", 10, (3, 32, 32))
    with pytest.raises(ValueError, match="resnet18.*input shape \\(1, 40\\)"):
        create_model("resnet18", 10, (1, 40))
