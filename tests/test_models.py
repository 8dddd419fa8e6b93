"""flatmin.models: output shapes, published sizes, architecture details, initialisation, errors."""
import functools
import math

import pytest
import torch
from torch import nn

from flatmin.models import MODELS, create_model
from flatmin.models.resnet import BasicBlock, Bottleneck
from flatmin.models.wide_resnet import WideBlock

CIFAR = (3, 32, 32)


@functools.lru_cache(maxsize=None)
def built(name, num_classes, shape):
    """Each big model once per test run: building WRN-28-10 alone takes a noticeable fraction of a second."""
    torch.manual_seed(0)
    return create_model(name, num_classes, shape)


def count(model):
    return sum(p.numel() for p in model.parameters())


def layers(model, kind):
    return [m for m in model.modules() if isinstance(m, kind)]


@pytest.mark.parametrize("name, shape, classes", [
    ("mlp", (1, 8, 8), 10), ("mlp", (1, 40), 10), ("cnn", (1, 8, 8), 10), ("cnn", (1, 40), 10),
    ("cnn", CIFAR, 100), ("resnet18", CIFAR, 10), ("resnet18", (1, 8, 8), 10), ("vgg16bn", CIFAR, 10),
    ("wrn16-8", CIFAR, 10), ("wrn28-10", CIFAR, 10), ("resnet18-imagenet", CIFAR, 7),
    ("resnet50-imagenet", CIFAR, 7),
    # an image folder of 16×16 images trains at 16×16 (docs/data.md)
    ("resnet18-imagenet", (3, 16, 16), 2), ("resnet50-imagenet", (3, 16, 16), 2), ("wrn16-8", (3, 16, 16), 2),
])
def test_output_shape(name, shape, classes):
    with torch.no_grad():  # training mode: BatchNorm normalises with the statistics of the batch of 2
        out = built(name, classes, shape).train()(torch.randn(2, *shape))
    assert out.shape == (2, classes) and torch.isfinite(out).all()


def test_every_model_name_is_covered_above():
    assert set(MODELS) == {"mlp", "cnn", "resnet18", "vgg16bn", "wrn28-10", "wrn16-8", "resnet18-imagenet",
                           "resnet50-imagenet"}


@pytest.mark.parametrize("name, shape, classes, exact, published_millions", [
    ("resnet18", CIFAR, 10, 11_173_962, 11.17),
    ("vgg16bn", CIFAR, 10, 14_724_042, 14.72),
    ("wrn28-10", CIFAR, 10, 36_479_194, 36.5),
    ("wrn16-8", CIFAR, 10, 10_961_370, 11.0),
    ("resnet18-imagenet", (3, 224, 224), 1000, 11_689_512, 11.69),  # torchvision's resnet18
    ("resnet50-imagenet", (3, 224, 224), 1000, 25_557_032, 25.6),  # torchvision's resnet50
])
def test_parameter_counts_match_the_published_architectures(name, shape, classes, exact, published_millions):
    n = count(built(name, classes, shape))
    assert n == exact and n / 1e6 == pytest.approx(published_millions, abs=0.05)


def test_cifar_and_imagenet_resnets_differ_in_the_stem_only():
    cifar, imagenet = built("resnet18", 10, CIFAR), built("resnet18-imagenet", 1000, (3, 224, 224))
    stem = layers(cifar, nn.Conv2d)[0]
    assert stem.kernel_size == (3, 3) and stem.stride == (1, 1) and not layers(cifar, nn.MaxPool2d)
    stem = layers(imagenet, nn.Conv2d)[0]
    assert stem.kernel_size == (7, 7) and stem.stride == (2, 2) and len(layers(imagenet, nn.MaxPool2d)) == 1
    for model in (cifar, imagenet):
        blocks = layers(model, BasicBlock)
        assert len(blocks) == 8 and [b.conv1.out_channels for b in blocks[::2]] == [64, 128, 256, 512]
        assert len(layers(model, nn.Conv2d)) == 1 + 16 + 3  # stem, two per block, three projection shortcuts
    # 32×32 keeps its resolution into the first stage; 224×224 is down to 56×56 there.
    assert cifar.stem(torch.zeros(1, *CIFAR)).shape[-1] == 32
    assert imagenet.stem(torch.zeros(1, 3, 224, 224)).shape[-1] == 56


def test_resnet50_uses_bottlenecks_ending_in_2048_features():
    model = built("resnet50-imagenet", 1000, (3, 224, 224))
    blocks = layers(model, Bottleneck)
    assert len(blocks) == 3 + 4 + 6 + 3 and not layers(model, BasicBlock)
    assert blocks[1].conv2.stride == (1, 1) and blocks[3].conv2.stride == (2, 2)  # stride on the 3×3 conv
    assert layers(model, nn.Linear)[0].in_features == 2048


@pytest.mark.parametrize("name, blocks, width", [("wrn28-10", 12, 640), ("wrn16-8", 6, 512)])
def test_wide_resnets_are_pre_activation_with_widths_16k_32k_64k(name, blocks, width):
    model = built(name, 10, CIFAR)
    found = layers(model, WideBlock)
    assert len(found) == blocks and layers(model, nn.Linear)[0].in_features == width
    assert [b.conv1.out_channels for b in found[::blocks // 3]] == [width // 4, width // 2, width]
    # Pre-activation: each block normalises its input first, and the net's last BN sits before the head.
    assert all(b.bn1.num_features == b.conv1.in_channels for b in found)
    assert isinstance(model.net[-5], nn.BatchNorm2d) and model.net[-5].num_features == width


def test_vgg16bn_has_13_batch_normalised_convs_and_five_pools():
    model = built("vgg16bn", 10, CIFAR)
    assert len(layers(model, nn.Conv2d)) == len(layers(model, nn.BatchNorm2d)) == 13
    assert len(layers(model, nn.MaxPool2d)) == 5 and len(layers(model, nn.Linear)) == 1


def test_cnn_is_one_dimensional_for_signals_and_two_dimensional_for_images():
    signal, image = create_model("cnn", 10, (1, 40)), create_model("cnn", 10, (1, 8, 8))
    assert len(layers(signal, nn.Conv1d)) == 3 and not layers(signal, nn.Conv2d)
    assert len(layers(image, nn.Conv2d)) == 3 and not layers(image, nn.Conv1d)
    assert len(layers(signal, nn.BatchNorm1d)) == 3 and len(layers(image, nn.BatchNorm2d)) == 3


def test_mlp_has_batch_norm_by_default_and_tracks_running_statistics():
    model = create_model("mlp", 10, (1, 8, 8))
    assert [m.out_features for m in layers(model, nn.Linear)] == [256, 256, 10]
    norms = layers(model, nn.BatchNorm1d)
    assert len(norms) == 2
    x = torch.randn(16, 1, 8, 8) + 3
    model.train()(x)
    assert all(int(n.num_batches_tracked) == 1 and n.running_mean.abs().sum() > 0 for n in norms)
    # In evaluation mode the running statistics are used: a sample's output ignores its batch mates.
    model.eval()
    assert torch.allclose(model(x[:1]), model(x)[:1], atol=1e-6)
    plain = create_model("mlp", 10, (1, 40), batch_norm=False, hidden=(32,))
    assert not layers(plain, nn.BatchNorm1d) and [m.out_features for m in layers(plain, nn.Linear)] == [32, 10]


@pytest.mark.parametrize("name", ["resnet18", "wrn16-8", "vgg16bn"])
def test_convs_are_kaiming_normal_and_batch_norm_starts_as_identity(name):
    model = built(name, 10, CIFAR)
    # The widest convs have over a million weights: their std is within a few % of Kaiming's.
    conv = max(layers(model, nn.Conv2d), key=lambda m: m.weight.numel())
    fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
    assert float(conv.weight.detach().std()) == pytest.approx(math.sqrt(2 / fan_out), rel=0.03)
    assert abs(float(conv.weight.detach().mean())) < 0.1 * math.sqrt(2 / fan_out)
    for bn in layers(model, nn.BatchNorm2d):
        assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)


@pytest.mark.parametrize("name, shape", [("resnet18", CIFAR), ("cnn", (1, 40)), ("mlp", (1, 8, 8))])
def test_initialisation_is_deterministic_under_a_seed(name, shape):
    def weights(seed):
        torch.manual_seed(seed)
        return create_model(name, 10, shape).state_dict()

    a, b, c = weights(1), weights(1), weights(2)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def test_unknown_names_and_unfit_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="unknown model 'resnet34': choose one of " + ", ".join(MODELS)):
        create_model("resnet34", 10, CIFAR)
    with pytest.raises(ValueError, match="model 'resnet18' takes images \\(C, H, W\\), not input shape \\(1, 40\\)"):
        create_model("resnet18", 10, (1, 40))
    with pytest.raises(ValueError, match="'vgg16bn' takes images .* of at least 32×32 pixels, not .*\\(1, 8, 8\\)"):
        create_model("vgg16bn", 10, (1, 8, 8))
    with pytest.raises(ValueError, match="model 'cnn' takes signals \\(C, L\\) or images .*, not .*\\(40,\\)"):
        create_model("cnn", 10, (40,))
    with pytest.raises(ValueError, match="num_classes=0 is not allowed"):
        create_model("mlp", 0, (1, 8, 8))
    with pytest.raises(ValueError, match="input shape \\(3, 0, 32\\) is not allowed"):
        create_model("wrn16-8", 10, (3, 0, 32))
    with pytest.raises(ValueError, match="model 'resnet18' takes no options, not width"):
        create_model("resnet18", 10, CIFAR, width=2)
