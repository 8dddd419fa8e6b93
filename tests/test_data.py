"""flatmin.data: the offline data sets, CIFAR files of the real format, image folders, batched
augmentation against per-image references, and the reproducibility of the loaders."""
import pickle
import random
import socket
import tarfile

import numpy as np
import pytest
import torch

from flatmin.data import DATASETS, BatchLoader, Dataset, FolderLoader, load_dataset, make_loaders, split_loader, splits
from flatmin.data.augment import cutout, random_crop_flip
from flatmin.data.cifar import LAYOUTS, Augment, Normalize
from flatmin.data.dataset import with_validation
from flatmin.data.imagefolder import random_resized_crop, resize_centre_crop, to_tensor
from flatmin.data.loader import mix_seed

# ---------------------------------------------------------------------------------------- digits


def test_digits_is_all_1797_images_scaled_to_unit_range_with_a_fixed_test_split():
    from sklearn.datasets import load_digits

    ds = load_dataset("digits")
    assert isinstance(ds, Dataset) and ds.name == "digits" and ds.num_classes == 10 and ds.input_shape == (1, 8, 8)
    assert ds.train_x.shape == (1347, 1, 8, 8) and ds.test_x.shape == (450, 1, 8, 8)
    assert ds.train_x.dtype == torch.float32 and ds.train_y.dtype == torch.int64
    assert float(ds.train_x.min()) == 0.0 and float(ds.train_x.max()) == 1.0  # pixel values 0..16, divided by 16
    assert ds.val_x is None and ds.augment is None and ds.transform is None
    # Train and test together are exactly the 1797 images: same pixel total, same labels.
    sk = load_digits()
    assert float(ds.train_x.double().sum() + ds.test_x.double().sum()) == pytest.approx(sk.images.sum() / 16)
    assert sorted(torch.cat([ds.train_y, ds.test_y]).tolist()) == sorted(sk.target.tolist())
    # The test split is fixed, whatever the seed of the validation split.
    other = load_dataset("digits", val_fraction=0.1, seed=7)
    assert torch.equal(ds.test_x, other.test_x) and torch.equal(ds.test_y, other.test_y)


def test_digits_test_split_is_stratified():
    ds = load_dataset("digits")
    per_class = torch.bincount(torch.cat([ds.train_y, ds.test_y]), minlength=10)
    in_test = torch.bincount(ds.test_y, minlength=10)
    assert torch.all((in_test - 0.25 * per_class).abs() <= 1), (in_test, per_class)


# ---------------------------------------------------------------------------------- validation


def test_validation_split_is_carved_from_train_only_and_keeps_class_proportions():
    full = load_dataset("digits")
    ds = load_dataset("digits", val_fraction=0.2, seed=0)
    assert torch.equal(ds.test_x, full.test_x) and torch.equal(ds.test_y, full.test_y)
    assert len(ds.train_y) + len(ds.val_y) == len(full.train_y) and len(ds.val_y) == 270
    pixels = float(ds.train_x.double().sum() + ds.val_x.double().sum())
    assert pixels == pytest.approx(float(full.train_x.double().sum()))
    per_class = torch.bincount(full.train_y, minlength=10)
    assert torch.all((torch.bincount(ds.val_y, minlength=10) - 0.2 * per_class).abs() <= 1)


def _indexed(n=200, classes=4):
    """A data set whose every input is its own index, so splits can be traced sample by sample."""
    x = torch.arange(n).float().unsqueeze(1)
    y = torch.arange(n) % classes
    return Dataset("indexed", x, y, x[:10], y[:10], num_classes=classes, input_shape=(1,))


def test_validation_split_is_disjoint_from_train_and_fixed_by_the_seed():
    ds = with_validation(_indexed(), 0.25, seed=3)
    train, val = set(ds.train_x.flatten().tolist()), set(ds.val_x.flatten().tolist())
    assert not train & val and train | val == set(map(float, range(200))) and len(val) == 50
    assert torch.equal(ds.val_y, ds.val_x.flatten().long() % 4)  # labels travel with their inputs
    assert torch.equal(with_validation(_indexed(), 0.25, seed=3).val_x, ds.val_x)
    assert not torch.equal(with_validation(_indexed(), 0.25, seed=4).val_x, ds.val_x)


@pytest.mark.parametrize("fraction", [1.0, -0.1, 1.5])
def test_out_of_range_val_fraction_is_a_clear_error(fraction):
    with pytest.raises(ValueError, match=f"val_fraction={fraction} .*\\[0, 1\\)"):
        load_dataset("digits", val_fraction=fraction)


def test_too_small_val_fraction_is_a_clear_error():
    with pytest.raises(ValueError, match="val_fraction=0.001 cannot hold out every class"):
        load_dataset("digits", val_fraction=0.001)


def test_unknown_name_and_misplaced_options_are_clear_errors():
    with pytest.raises(ValueError, match="unknown data 'mnist': choose one of " + ", ".join(DATASETS)):
        load_dataset("mnist")
    with pytest.raises(ValueError, match="cutout=16 .* digits: Cutout applies to cifar10 and cifar100 only"):
        load_dataset("digits", cutout=16)
    with pytest.raises(ValueError, match="cutout=-1"):
        load_dataset("cifar10", cutout=-1)


# ------------------------------------------------------------------------------------- mnist1d


def _refuse_network(*args, **kwargs):
    raise AssertionError("tried to reach the network")


@pytest.fixture(scope="module")
def mnist1d(tmp_path_factory):
    """MNIST-1D generated once into a fresh cache folder, with the network blocked; also the
    global random states before and after."""
    folder = tmp_path_factory.mktemp("mnist1d")
    before = (random.getstate(), np.random.get_state())
    with pytest.MonkeyPatch.context() as mp:
        for name in ("connect", "connect_ex"):
            mp.setattr(socket.socket, name, _refuse_network)
        mp.setattr(socket, "getaddrinfo", _refuse_network)
        ds = load_dataset("mnist1d", data_dir=str(folder))
    after = (random.getstate(), np.random.get_state())
    return folder, ds, before, after


def test_mnist1d_is_generated_offline_with_the_published_split(mnist1d):
    folder, ds, _, _ = mnist1d
    assert ds.name == "mnist1d" and ds.num_classes == 10 and ds.input_shape == (1, 40)
    assert ds.train_x.shape == (4000, 1, 40) and ds.test_x.shape == (1000, 1, 40)
    assert ds.train_x.dtype == torch.float32 and ds.train_y.dtype == torch.int64
    assert torch.bincount(ds.train_y, minlength=10).min() > 300 and set(ds.test_y.tolist()) == set(range(10))
    # Only the cache is left behind: the temporary file was renamed into place.
    assert sorted(p.name for p in folder.iterdir()) == ["mnist1d.npz"]


def test_mnist1d_generation_leaves_the_global_random_state_alone(mnist1d):
    _, _, (py_before, np_before), (py_after, np_after) = mnist1d
    assert py_before == py_after
    assert all(np.array_equal(a, b) for a, b in zip(np_before, np_after))


def test_mnist1d_is_read_from_the_cache_and_regenerated_identically(mnist1d, tmp_path, monkeypatch):
    folder, ds, _, _ = mnist1d
    # A second run reads the cache: generating again would fail here.
    monkeypatch.setattr("mnist1d.data.make_dataset", _refuse_network)
    cached = load_dataset("mnist1d", data_dir=str(folder))
    assert torch.equal(cached.train_x, ds.train_x) and torch.equal(cached.test_y, ds.test_y)
    monkeypatch.undo()
    # A damaged cache is replaced by a fresh generation, which is deterministic.
    (tmp_path / "mnist1d.npz").write_bytes(b"PK\x03\x04 half a file")
    again = load_dataset("mnist1d", data_dir=str(tmp_path))
    assert torch.equal(again.train_x, ds.train_x) and torch.equal(again.test_x, ds.test_x)
    assert torch.equal(again.train_y, ds.train_y) and torch.equal(again.test_y, ds.test_y)
    assert np.load(tmp_path / "mnist1d.npz")["x"].shape == (4000, 40)


# --------------------------------------------------------------------------------------- CIFAR


def _write_cifar(root, name, archive):
    """A tiny CIFAR data set in the real format: pickled dicts (protocol 2) with bytes keys, in the
    folder the archive extracts to, or in the .tar.gz archive itself. Returns the images and
    labels each part holds."""
    layout = LAYOUTS[name]
    rng = np.random.default_rng(0)
    folder = root / layout.folder
    folder.mkdir(parents=True)
    parts = {}
    for part in layout.train_parts + layout.test_parts:
        n = 3 if part in layout.test_parts else 2 if name == "cifar10" else 5
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = rng.integers(0, layout.num_classes, size=n).tolist()
        batch = {b"batch_label": part.encode(), b"data": data, layout.label_key: labels}
        if name == "cifar100":
            batch[b"coarse_labels"] = [label // 5 for label in labels]  # must not be read
        with open(folder / part, "wb") as handle:
            pickle.dump(batch, handle, protocol=2)
        parts[part] = (data, labels)
    if archive:
        with tarfile.open(root / layout.archive, "w:gz") as tar:
            tar.add(folder, arcname=layout.folder)
        for f in folder.iterdir():
            f.unlink()
        folder.rmdir()
    return parts


@pytest.mark.parametrize("archive", [False, True], ids=["folder", "archive"])
@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_reads_the_python_pickle_format(tmp_path, name, archive):
    parts = _write_cifar(tmp_path, name, archive)
    layout = LAYOUTS[name]
    ds = load_dataset(name, data_dir=str(tmp_path))
    assert ds.num_classes == layout.num_classes and ds.input_shape == (3, 32, 32)
    assert ds.train_x.shape == (10 if name == "cifar10" else 5, 3, 32, 32) and ds.test_x.shape == (3, 3, 32, 32)
    assert ds.train_x.dtype == torch.uint8  # kept compact; floats are made per batch
    # Every image and label in order, the train batches one after the other.
    train = [parts[p] for p in layout.train_parts]
    assert np.array_equal(ds.train_x.numpy(), np.concatenate([d for d, _ in train]).reshape(-1, 3, 32, 32))
    assert ds.train_y.tolist() == sum((labels for _, labels in train), [])
    assert ds.test_y.tolist() == parts[layout.test_parts[0]][1]
    # The red plane is the first 1024 values of a row.
    assert np.array_equal(ds.test_x[1, 0].numpy().ravel(), parts[layout.test_parts[0]][0][1, :1024])


def test_cifar_normalisation_is_per_channel_mean_and_std(tmp_path):
    _write_cifar(tmp_path, "cifar10", archive=False)
    ds = load_dataset("cifar10", data_dir=str(tmp_path))
    x = ds.transform(ds.train_x)
    mean, std = torch.tensor([0.4914, 0.4822, 0.4465]), torch.tensor([0.2470, 0.2435, 0.2616])
    expected = (ds.train_x.double() / 255 - mean.double().view(3, 1, 1)) / std.double().view(3, 1, 1)
    assert x.dtype == torch.float32 and torch.allclose(x.double(), expected, atol=1e-5)


def test_cifar_augmentation_pads_with_black_pixels():
    mean, std = LAYOUTS["cifar10"].mean, LAYOUTS["cifar10"].std
    white = Normalize(mean, std)(torch.full((64, 3, 32, 32), 255, dtype=torch.uint8))
    out = Augment(mean, std)(white, torch.Generator().manual_seed(0))
    pixels = (out * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)) * 255
    black = pixels.abs() < 1e-3
    assert torch.all(black | ((pixels - 255).abs() < 1e-3))  # every pixel is either image or padding
    assert black.any() and not black.all()
    assert torch.equal(black, black[:, :1].expand_as(black))  # padding is black in every channel


def test_cifar_cutout_option_zeroes_a_square_in_every_training_image(tmp_path):
    _write_cifar(tmp_path, "cifar10", archive=False)
    ds = load_dataset("cifar10", data_dir=str(tmp_path), cutout=16)
    out = ds.augment(ds.transform(ds.train_x), torch.Generator().manual_seed(0))
    zeros = (out == 0).all(1).flatten(1).sum(1)
    assert torch.all(zeros >= 8 * 8) and torch.all(zeros <= 16 * 16)  # at least a corner's quarter of the square
    plain = load_dataset("cifar10", data_dir=str(tmp_path))
    assert not (plain.augment(plain.transform(plain.train_x), torch.Generator().manual_seed(0)) == 0).all(1).any()


def test_missing_cifar_names_the_archive_and_the_folder_it_looked_in(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("cifar100", data_dir=str(tmp_path))
    message = str(info.value)
    assert "download cifar-100-python.tar.gz" in message and str(tmp_path) in message
    assert "cifar-100-python/" in message and "\n" not in message


def test_damaged_cifar_files_are_clear_errors(tmp_path):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"\x1f\x8bnot really gzip")
    with pytest.raises(ValueError, match="cifar-10-python.tar.gz is damaged"):
        load_dataset("cifar10", data_dir=str(tmp_path))

    good = tmp_path / "good"
    _write_cifar(good, "cifar10", archive=True)
    truncated = tmp_path / "cut" / "cifar-10-python.tar.gz"
    truncated.parent.mkdir()
    truncated.write_bytes((good / "cifar-10-python.tar.gz").read_bytes()[:-200])
    with pytest.raises(ValueError, match="cifar-10-python.tar.gz"):
        load_dataset("cifar10", data_dir=str(truncated.parent))


def test_incomplete_or_foreign_cifar_folders_are_clear_errors(tmp_path):
    _write_cifar(tmp_path, "cifar10", archive=False)
    folder = tmp_path / "cifar-10-batches-py"
    (folder / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3 is missing"):
        load_dataset("cifar10", data_dir=str(tmp_path))
    with open(folder / "data_batch_3", "wb") as handle:
        pickle.dump({b"pixels": [1, 2, 3]}, handle, protocol=2)
    with pytest.raises(ValueError, match="data_batch_3 is not a CIFAR python batch"):
        load_dataset("cifar10", data_dir=str(tmp_path))
    (folder / "data_batch_3").write_bytes(b"\x80\x02garbage")
    with pytest.raises(ValueError, match="data_batch_3 is damaged"):
        load_dataset("cifar10", data_dir=str(tmp_path))


# ---------------------------------------------------------------------------------- augmentation


def _crop_flip_one_by_one(x, offsets, flips, padding, fill):
    """The reference: pad one image, cut the crop at its offset, mirror it if asked."""
    out = []
    for image, (dy, dx), flip in zip(x, offsets, flips):
        c, h, w = image.shape
        padded = torch.stack([torch.full((h + 2 * padding, w + 2 * padding), fill[ch]) for ch in range(c)])
        padded[:, padding:padding + h, padding:padding + w] = image
        crop = padded[:, dy:dy + h, dx:dx + w]
        out.append(torch.flip(crop, dims=[2]) if flip else crop)
    return torch.stack(out)


def test_random_crop_and_flip_match_a_per_image_reference():
    x = torch.randn(32, 3, 8, 6)
    fill = [-1.5, 0.25, 2.0]
    out = random_crop_flip(x, torch.Generator().manual_seed(11), padding=2, fill=fill)
    recorded = torch.Generator().manual_seed(11)  # the same draws, in the documented order
    offsets = torch.randint(0, 5, (2, 32), generator=recorded).T.tolist()
    flips = (torch.rand(32, generator=recorded) < 0.5).tolist()
    assert torch.equal(out, _crop_flip_one_by_one(x, offsets, flips, 2, fill))
    # The draws exercised every case: shifted and centred crops, mirrored and plain.
    assert any(flips) and not all(flips) and [2, 2] in offsets and any(o != [2, 2] for o in offsets)
    centred_plain = [i for i, (o, f) in enumerate(zip(offsets, flips)) if o == [2, 2] and not f]
    assert all(torch.equal(out[i], x[i]) for i in centred_plain)


def test_crop_and_flip_check_their_arguments():
    with pytest.raises(ValueError, match="fill has 1 values for images of 3 channels"):
        random_crop_flip(torch.zeros(2, 3, 4, 4), torch.Generator(), 1, [0.0])
    with pytest.raises(ValueError, match="image batches \\(N, C, H, W\\)"):
        random_crop_flip(torch.zeros(3, 4, 4), torch.Generator(), 1, [0.0] * 3)


@pytest.mark.parametrize("size", [16, 5])
def test_cutout_zeroes_exactly_one_clipped_square_per_image(size):
    x = torch.ones(64, 3, 32, 32)
    out = cutout(x, torch.Generator().manual_seed(0), size)
    recorded = torch.Generator().manual_seed(0)
    rows, cols = torch.randint(0, 32, (64,), generator=recorded), torch.randint(0, 32, (64,), generator=recorded)
    for i in range(64):
        top, left = int(rows[i]) - size // 2, int(cols[i]) - size // 2
        expected = torch.ones(32, 32)
        expected[max(top, 0):max(top + size, 0), max(left, 0):max(left + size, 0)] = 0  # clipped at the borders
        assert all(torch.equal(out[i, c], expected) for c in range(3)), i
    clipped = [(r, c) for r, c in zip(rows.tolist(), cols.tolist())
               if min(r, c) < size // 2 or max(r, c) >= 32 - size // 2]
    assert clipped and len(clipped) < 64  # both clipped and whole squares occurred


# -------------------------------------------------------------------------------------- loaders


def _ids(batches):
    return torch.cat([y for _, y in batches]).tolist()


def test_loader_covers_every_sample_exactly_once_per_epoch():
    x, y = torch.arange(103).float().unsqueeze(1), torch.arange(103)
    loader = BatchLoader(x, y, 10, seed=3)
    assert len(loader) == 11
    for epoch in range(3):
        loader.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == 11 and [len(b) for _, b in batches] == [10] * 10 + [3]
        assert sorted(_ids(batches)) == list(range(103))
        assert all(torch.equal(bx.flatten().long(), by) for bx, by in batches)  # inputs stay with their labels
    dropping = BatchLoader(x, y, 10, drop_last=True)
    assert len(dropping) == 10 and len(list(dropping)) == 10 and len(set(_ids(dropping))) == 100


def test_loader_order_is_fixed_by_seed_and_epoch_alone():
    x, y = torch.zeros(50, 2), torch.arange(50)
    first = BatchLoader(x, y, 8, seed=1)
    epochs = []
    for epoch in range(3):
        first.set_epoch(epoch)
        epochs.append(_ids(first))
    resumed = BatchLoader(x, y, 8, seed=1)  # a fresh loader, as after a restart, at epoch 2
    resumed.set_epoch(2)
    assert _ids(resumed) == epochs[2] and _ids(resumed) == epochs[2]
    assert epochs[0] != epochs[1] != epochs[2]
    other_seed = BatchLoader(x, y, 8, seed=2)
    assert _ids(other_seed) != epochs[0]
    assert _ids(BatchLoader(x, y, 8, shuffle=False)) == list(range(50))


def _noise(x, generator):
    return x + torch.randn(x.shape, generator=generator)


def test_iter_from_yields_the_tail_of_a_full_epoch_augmentation_included():
    x, y = torch.randn(45, 3), torch.arange(45)
    loader = BatchLoader(x, y, 6, seed=5, augment=_noise)
    loader.set_epoch(4)
    full = list(loader)
    for k in (0, 3, 7, 8):
        tail = list(loader.iter_from(k))
        assert len(tail) == len(full) - k
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full[k:], tail))
    loader.set_epoch(5)
    assert not torch.equal(list(loader)[0][0], full[0][0])
    for bad in (-1, 9):
        with pytest.raises(ValueError, match=f"start_batch={bad} is not allowed: it must be in 0..8"):
            loader.iter_from(bad)


def test_transform_comes_before_augment_and_eval_loaders_do_not_augment():
    x = torch.arange(12, dtype=torch.uint8).view(12, 1)
    loader = BatchLoader(x, torch.arange(12), 12, shuffle=False, transform=lambda b: b.float() * 10,
                         augment=lambda b, g: b + 1)
    assert torch.equal(next(iter(loader))[0], x.float() * 10 + 1)
    ds = Dataset("toy", x, torch.arange(12) % 2, x[:5], torch.arange(5) % 2, num_classes=2, input_shape=(1,),
                 val_x=x[5:9], val_y=torch.arange(4) % 2, augment=lambda b, g: b + 1,
                 transform=lambda b: b.float() * 10)
    train, evals = make_loaders(ds, batch_size=4, eval_batch_size=3, seed=0)
    assert set(evals) == {"train", "test", "val"}
    assert torch.equal(torch.cat([b for b, _ in evals["test"]]), x[:5].float() * 10)
    assert torch.equal(torch.cat([b for b, _ in evals["train"]]), x.float() * 10)
    assert sorted(torch.cat([b for b, _ in train]).flatten().tolist()) == [10.0 * i + 1 for i in range(12)]


def test_sharded_loaders_split_every_global_batch_between_the_ranks():
    x, y = torch.zeros(43, 1), torch.arange(43)
    whole = BatchLoader(x, y, 8, seed=1)
    ranks = [BatchLoader(x, y, 4, seed=1, shard=(r, 2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 5  # the incomplete last global batch is dropped on every rank
    for parts, full in zip(zip(*ranks), whole):
        assert torch.equal(torch.cat([parts[0][1], parts[1][1]]), full[1])
    ds = Dataset("toy", x, y, x[:11], y[:11], num_classes=43, input_shape=(1,))
    shares = [make_loaders(ds, 4, eval_batch_size=2, shard=(r, 3))[1]["test"] for r in range(3)]
    assert sorted(sum((_ids(s) for s in shares), [])) == list(range(11))


def test_loader_arguments_are_checked():
    x, y = torch.zeros(10, 1), torch.arange(10)
    with pytest.raises(ValueError, match="x has 10 samples but y has 9"):
        BatchLoader(x, y[:9], 2)
    with pytest.raises(ValueError, match="batch_size=0 is not allowed"):
        BatchLoader(x, y, 0)
    with pytest.raises(ValueError, match="shard=\\(2, 2\\) is not allowed"):
        BatchLoader(x, y, 2, shard=(2, 2))


def test_cifar_loaders_augment_training_batches_only(tmp_path):
    _write_cifar(tmp_path, "cifar10", archive=False)
    ds = load_dataset("cifar10", data_dir=str(tmp_path), cutout=8)
    train, evals = make_loaders(ds, batch_size=5, device="cpu", seed=0, eval_batch_size=16)
    assert set(evals) == {"train", "test"} and len(train) == 2
    x, y = next(iter(train))
    assert x.shape == (5, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    plain = ds.transform(ds.train_x)
    assert not any(torch.equal(a, b) for a in x for b in plain)  # cropped, flipped or cut out
    x, y = next(iter(evals["train"]))
    assert torch.equal(x, plain) and torch.equal(y, ds.train_y)


# --------------------------------------------------------------------------------- image folders

COLOURS = {"zebra": (250, 250, 250), "apple": (200, 30, 10)}


def square_image_folder(root, side=16, train=4, val=2):
    """``root/train`` and ``root/val`` with ``train`` and ``val`` noisy side×side PNGs of each class
    in ``COLOURS`` (other test files build their image-folder runs with it)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("val", val)):
        for name, colour in COLOURS.items():
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                noise = rng.integers(-40, 41, (side, side, 3))
                pixels = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


@pytest.fixture
def folder(tmp_path):
    """train/ and val/ class folders of small PNGs in several modes and sizes."""
    from PIL import Image

    for split, count in (("train", 3), ("val", 2)):
        for name, colour in COLOURS.items():
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(count):
                image = Image.new("RGB", (20 + 3 * i, 14 + 2 * i), colour)
                if i == 1:  # a palette image must come out as RGB too
                    image = image.convert("P", palette=Image.Palette.ADAPTIVE)
                image.save(tmp_path / split / name / f"{i}.png")
    return tmp_path


def test_imagefolder_is_lazy_sorted_by_class_and_centre_cropped_for_evaluation(folder):
    ds = load_dataset("imagefolder", data_dir=str(folder), image_size=8, normalize="imagenet")
    assert ds.classes == ["apple", "zebra"] and ds.num_classes == 2 and ds.input_shape == (3, 8, 8)
    assert len(ds.train) == 6 and len(ds.test) == 4
    assert not any(isinstance(v, torch.Tensor) for v in vars(ds.train).values())  # paths, not pixels
    _, evals = make_loaders(ds, batch_size=3, eval_batch_size=3)
    assert set(evals) == {"test"}
    x, y = zip(*evals["test"])
    x, y = torch.cat(x), torch.cat(y)
    assert x.shape == (4, 3, 8, 8) and y.tolist() == [0, 0, 1, 1]
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    for image, label in zip(x, y):
        colour = torch.tensor(COLOURS[ds.classes[label]], dtype=torch.float32) / 255
        assert torch.allclose(image, ((colour - mean) / std).view(3, 1, 1).expand(3, 8, 8), atol=1e-5)


def test_imagefolder_training_batches_are_reproducible_and_resumable(folder):
    ds = load_dataset("imagefolder", data_dir=str(folder), image_size=8)
    loader = FolderLoader(ds.train, 4, seed=3)
    assert len(loader) == 2
    loader.set_epoch(1)
    full = list(loader)
    assert [x.shape for x, _ in full] == [(4, 3, 8, 8), (2, 3, 8, 8)] and sorted(_ids(full)) == [0, 0, 0, 1, 1, 1]
    tail = list(loader.iter_from(1))
    assert len(tail) == 1 and torch.equal(tail[0][0], full[1][0])
    workers = FolderLoader(ds.train, 4, seed=3, num_workers=2)
    workers.set_epoch(1)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full, workers))
    with pytest.raises(ValueError, match="num_workers=-1"):
        FolderLoader(ds.train, 4, num_workers=-1)


def test_imagefolder_training_images_are_random_resized_crops_flipped_by_seed_epoch_and_index(folder):
    from PIL import Image

    ds = load_dataset("imagefolder", data_dir=str(folder), image_size=8)
    # An image whose halves differ, so a mirror image shows.
    path = ds.train.samples[0][0]
    halves = np.concatenate([np.zeros((14, 10, 3), np.uint8), np.full((14, 10, 3), 255, np.uint8)], axis=1)
    Image.fromarray(halves).save(path)
    flipped = set()
    for epoch in range(12):
        rng = random.Random(mix_seed(3, epoch, 0))
        with Image.open(path) as file:
            crop = random_resized_crop(file.convert("RGB"), 8, rng)
        flip = rng.random() < 0.5
        expected = to_tensor(crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else crop, ds.train.mean,
                             ds.train.std)
        assert torch.equal(ds.train.load(0, seed=3, epoch=epoch)[0], expected)
        flipped.add(flip)
    assert flipped == {True, False}


def test_random_resized_crop_and_centre_crop_geometry():
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (10, 100, 3), dtype=np.uint8))
    # No crop of 8–100 % of the area with aspect 3/4–4/3 fits a 100×10 strip: the fallback is the
    # widest central crop of aspect 4/3, 13×10 at x = 43.
    out = random_resized_crop(image, 6, random.Random(0))
    expected = image.resize((6, 6), Image.Resampling.BILINEAR, box=(43, 0, 56, 10))
    assert np.array_equal(np.asarray(out), np.asarray(expected))
    # The whole image when the area and the aspect ratio are pinned to it.
    square = image.crop((0, 0, 10, 10))
    out = random_resized_crop(square, 6, random.Random(0), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert np.array_equal(np.asarray(out), np.asarray(square.resize((6, 6), Image.Resampling.BILINEAR)))
    # Resize(256) + CenterCrop(224) on a 500×375 photo: short side 256, so 341×256, then the middle.
    photo = Image.fromarray(np.random.default_rng(1).integers(0, 256, (375, 500, 3), dtype=np.uint8))
    out = resize_centre_crop(photo, 224)
    expected = photo.resize((341, 256), Image.Resampling.BILINEAR).crop((58, 16, 282, 240))
    assert out.size == (224, 224) and np.array_equal(np.asarray(out), np.asarray(expected))


def test_imagefolder_problems_are_clear_errors(folder, tmp_path_factory):
    nowhere = tmp_path_factory.mktemp("empty") / "nowhere"
    with pytest.raises(FileNotFoundError, match=f"image folder {nowhere / 'train'} not found"):
        load_dataset("imagefolder", data_dir=str(nowhere))
    with pytest.raises(ValueError, match="val_fraction=0.1 is not allowed for imagefolder"):
        load_dataset("imagefolder", data_dir=str(folder), val_fraction=0.1)
    (folder / "val" / "zebra" / "1.png").write_bytes(b"not a png")
    ds = load_dataset("imagefolder", data_dir=str(folder), image_size=8)
    with pytest.raises(ValueError, match="1.png is not a readable image"):
        list(make_loaders(ds, 4)[1]["test"])
    (folder / "val" / "mango").mkdir()
    (folder / "val" / "mango" / "0.png").write_bytes((folder / "val" / "zebra" / "0.png").read_bytes())
    with pytest.raises(ValueError, match="class folders .* differ: mango"):
        load_dataset("imagefolder", data_dir=str(folder))


def test_imagefolder_defaults_to_the_images_own_size_and_channel_statistics(folder):
    # Training images are 20×14, 23×16 and 26×18 per class: the median short side is 16.
    ds = load_dataset("imagefolder", data_dir=str(folder))
    assert ds.input_shape == (3, 16, 16) and ds.preprocessing["image_size"] == 16
    assert ds.preprocessing["normalize"] == "data"
    # Two solid colours in equal shares: per channel the mean is their midpoint and the std half
    # their distance, so every normalised pixel is +1 or -1 (or 0 where the colours agree: std 1).
    apple, zebra = (np.array(COLOURS[c], dtype=np.float64) / 255 for c in ("apple", "zebra"))
    assert np.allclose(ds.preprocessing["mean"], (apple + zebra) / 2, atol=1e-5)
    assert np.allclose(ds.preprocessing["std"], np.abs(zebra - apple) / 2, atol=1e-5)
    for split in ("train", "test"):
        x, y = next(iter(split_loader(ds, split, batch_size=8)))
        assert x.shape[1:] == (3, 16, 16)
        sign = torch.where(y == ds.classes.index("zebra"), 1.0, -1.0).view(-1, 1, 1, 1)
        assert torch.allclose(x, sign.expand_as(x), atol=1e-4)


def test_small_images_are_not_enlarged_and_large_ones_default_to_224(tmp_path):
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    assert np.array_equal(np.asarray(resize_centre_crop(image, 16)), pixels)  # not 18 px cropped back to 16
    # A non-square image is centre-cropped only.
    wide = Image.fromarray(np.random.default_rng(1).integers(0, 256, (16, 20, 3), dtype=np.uint8))
    assert np.array_equal(np.asarray(resize_centre_crop(wide, 16)), np.asarray(wide)[:, 2:18])
    for split in ("train", "val"):
        for name in ("a", "b"):
            (tmp_path / split / name).mkdir(parents=True)
            Image.new("RGB", (300, 260), (10, 20, 30) if name == "a" else (200, 100, 0)).save(
                tmp_path / split / name / "0.png")
    ds = load_dataset("imagefolder", data_dir=str(tmp_path), normalize="imagenet")
    assert ds.input_shape == (3, 224, 224) and ds.preprocessing["mean"] == [0.485, 0.456, 0.406]
    asked = load_dataset("imagefolder", data_dir=str(tmp_path), image_size=32)
    assert asked.input_shape == (3, 32, 32)


def test_imagefolder_class_folders_must_match_and_hold_training_images(folder):
    (folder / "train" / "mango").mkdir()
    (folder / "val" / "mango").mkdir()
    with pytest.raises(ValueError, match=f"class folder {folder / 'train' / 'mango'} holds no images"):
        load_dataset("imagefolder", data_dir=str(folder))
    # With training images it is a class; an empty val/ folder of it (no test images) is allowed.
    (folder / "train" / "mango" / "0.png").write_bytes((folder / "train" / "zebra" / "0.png").read_bytes())
    assert load_dataset("imagefolder", data_dir=str(folder)).classes == ["apple", "mango", "zebra"]
    (folder / "val" / "kiwi").mkdir()
    (folder / "val" / "kiwi" / "0.png").write_bytes((folder / "val" / "zebra" / "0.png").read_bytes())
    with pytest.raises(ValueError, match="class folders .* differ: kiwi"):
        load_dataset("imagefolder", data_dir=str(folder))


def test_image_options_are_for_image_folders_only_and_checked(folder):
    with pytest.raises(ValueError, match="image_size=32 is not allowed for digits"):
        load_dataset("digits", image_size=32)
    with pytest.raises(ValueError, match="normalize='data' is not allowed for mnist1d"):
        load_dataset("mnist1d", normalize="data")
    with pytest.raises(ValueError, match="unknown normalize 'cifar'"):
        load_dataset("imagefolder", data_dir=str(folder), normalize="cifar")
    with pytest.raises(ValueError, match="image_size=0 is not allowed"):
        load_dataset("imagefolder", data_dir=str(folder), image_size=0)


def test_split_loaders_name_the_splits_and_mix_an_image_folders_classes(folder):
    ds = load_dataset("imagefolder", data_dir=str(folder), image_size=8)
    assert splits(ds) == ("train", "test")
    # Stored by class, yet the first batch of 3 of the 6 training images holds both classes
    # (for this seed), unaugmented: the same tensors every time.
    first = next(iter(split_loader(ds, "train", batch_size=3, seed=0)))
    assert set(first[1].tolist()) == {0, 1}
    assert torch.equal(first[0], next(iter(split_loader(ds, "train", batch_size=3, seed=0)))[0])
    with pytest.raises(ValueError, match="split='val' is not allowed for this imagefolder: it has train, test"):
        split_loader(ds, "val", batch_size=3)
    digits = load_dataset("digits", val_fraction=0.2)
    assert splits(digits) == ("train", "test", "val")
    x, y = next(iter(split_loader(digits, "val", batch_size=5)))
    assert torch.equal(y, digits.val_y[:5]) and torch.allclose(x, digits.val_x[:5])
