"""Offline data sets, CIFAR files of the real format, image folders, augmentation and loaders."""
import pickle
import socket
import tarfile

import numpy as np
import pytest
import torch

from flatmin.data import BatchLoader, load_dataset, make_loaders
from flatmin.data.augment import cutout, random_crop_flip


def test_digits_has_a_fixed_stratified_split():
    ds = load_dataset("digits")
    assert len(ds.train_y) + len(ds.test_y) == 1797 and len(ds.test_y) == 450
    assert ds.train_x.shape[1:] == (1, 8, 8) and ds.num_classes == 10
    assert 0.0 <= float(ds.train_x.min()) and float(ds.train_x.max()) <= 1.0
    again = load_dataset("digits")
    assert torch.equal(ds.test_x, again.test_x)
    train_share = torch.bincount(ds.train_y, minlength=10).float() / len(ds.train_y)
    test_share = torch.bincount(ds.test_y, minlength=10).float() / len(ds.test_y)
    assert torch.allclose(train_share, test_share, atol=0.01)


def test_validation_split_comes_from_train_only():
    full = load_dataset("digits")
    ds = load_dataset("digits", val_fraction=0.2, seed=0)
    assert torch.equal(ds.test_x, full.test_x)
    assert len(ds.train_y) + len(ds.val_y) == len(full.train_y)
    rows = {tuple(r.flatten().tolist()) for r in full.train_x}
    assert all(tuple(r.flatten().tolist()) in rows for r in ds.val_x)
    share = torch.bincount(ds.val_y, minlength=10).float() / len(ds.val_y)
    assert torch.allclose(share, torch.bincount(ds.train_y, minlength=10).float() / len(ds.train_y), atol=0.02)


def test_mnist1d_is_generated_offline_with_the_published_split(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("mnist1d tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    ds = load_dataset("mnist1d", data_dir=str(tmp_path))
    assert ds.train_x.shape == (4000, 1, 40) and ds.test_x.shape == (1000, 1, 40)
    assert set(ds.train_y.unique().tolist()) == set(range(10))
    assert (tmp_path / "mnist1d.npz").exists()
    cached = load_dataset("mnist1d", data_dir=str(tmp_path))
    assert torch.equal(cached.train_x, ds.train_x)


def _write_cifar(root, name="cifar10", n_train=10, n_test=6, archive=False):
    rng = np.random.default_rng(0)
    if name == "cifar10":
        folder, parts, label = "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], b"labels"
    else:
        folder, parts, label = "cifar-100-python", ["train", "test"], b"fine_labels"
    base = root / folder
    base.mkdir(parents=True)
    expected = {}
    for part in parts:
        n = n_test if "test" in part else n_train
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).tolist()
        with open(base / part, "wb") as handle:
            pickle.dump({b"data": data, label: labels}, handle, protocol=2)
        expected[part] = (data, labels)
    if archive:
        with tarfile.open(root / f"{name.replace('cifar', 'cifar-')}-python.tar.gz", "w:gz") as tar:
            tar.add(base, arcname=folder)
        for f in base.iterdir():
            f.unlink()
        base.rmdir()
    return expected


@pytest.mark.parametrize("archive", [False, True])
def test_cifar10_reads_the_python_pickle_format(tmp_path, archive):
    expected = _write_cifar(tmp_path, archive=archive)
    ds = load_dataset("cifar10", data_dir=str(tmp_path))
    assert ds.train_x.shape == (50, 3, 32, 32) and ds.train_x.dtype == torch.uint8
    assert ds.test_x.shape == (6, 3, 32, 32)
    first = expected["data_batch_1"][0][0].reshape(3, 32, 32)
    assert np.array_equal(ds.train_x[0].numpy(), first)
    assert ds.test_y.tolist() == expected["test_batch"][1]
    x = ds.transform(ds.train_x[:2])
    assert x.dtype == torch.float32 and abs(float(x.mean())) < 1.0


def test_cifar100_uses_fine_labels(tmp_path):
    expected = _write_cifar(tmp_path, name="cifar100")
    ds = load_dataset("cifar100", data_dir=str(tmp_path))
    assert ds.num_classes == 100 and ds.train_y.tolist() == expected["train"][1]


def test_missing_and_damaged_cifar_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("cifar10", data_dir=str(tmp_path))
    assert "cifar-10-python.tar.gz" in str(info.value) and str(tmp_path) in str(info.value)
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"\x1f\x8bgarbage")
    with pytest.raises(ValueError, match="damaged"):
        load_dataset("cifar10", data_dir=str(tmp_path))


def _reference_crop_flip(x, offsets, flips, padding, fill):
    """One image at a time, plainly."""
    out = []
    for img, (dy, dx), flip in zip(x, offsets, flips):
        c, h, w = img.shape
        padded = torch.empty(c, h + 2 * padding, w + 2 * padding)
        for ch in range(c):
            padded[ch] = fill[ch]
        padded[:, padding:padding + h, padding:padding + w] = img
        crop = padded[:, dy:dy + h, dx:dx + w]
        out.append(crop.flip(2) if flip else crop)
    return torch.stack(out)


def test_random_crop_and_flip_match_a_per_image_reference():
    x = torch.randn(16, 3, 8, 8)
    fill = [-1.0, -2.0, -3.0]
    out = random_crop_flip(x, torch.Generator().manual_seed(5), padding=2, fill=fill)
    g = torch.Generator().manual_seed(5)
    offsets = torch.randint(0, 5, (2, 16), generator=g).T.tolist()
    flips = (torch.rand(16, generator=g) < 0.5).tolist()
    assert torch.equal(out, _reference_crop_flip(x, offsets, flips, 2, fill))
    assert any(flips) and not all(flips) and any(o != [2, 2] for o in offsets)


def test_cutout_zeroes_one_clipped_square_per_image():
    x = torch.ones(64, 3, 32, 32)
    out = cutout(x, torch.Generator().manual_seed(0), 16)
    g = torch.Generator().manual_seed(0)
    cy, cx = torch.randint(0, 32, (64,), generator=g), torch.randint(0, 32, (64,), generator=g)
    for i in range(64):
        rows = min(32, int(cy[i]) + 8) - max(0, int(cy[i]) - 8)
        cols = min(32, int(cx[i]) + 8) - max(0, int(cx[i]) - 8)
        zeros = (out[i, 0] == 0)
        assert int(zeros.sum()) == rows * cols
        assert bool((out[i] == 0).all(0).eq(zeros).all())  # the same square in every channel


def test_loader_covers_every_sample_once_and_is_reproducible_per_epoch():
    x = torch.arange(103).float().unsqueeze(1)
    y = torch.arange(103)
    loader = BatchLoader(x, y, 10, seed=3)
    loader.set_epoch(0)
    seen = torch.cat([b for _, b in loader])
    assert sorted(seen.tolist()) == list(range(103)) and len(loader) == 11
    again = torch.cat([b for _, b in loader])
    assert torch.equal(seen, again)
    loader.set_epoch(1)
    assert not torch.equal(torch.cat([b for _, b in loader]), seen)
    loader.set_epoch(0)
    tail = torch.cat([b for _, b in loader.iter_from(4)])
    assert torch.equal(tail, seen[40:])


def test_sharded_loaders_split_each_global_batch():
    x, y = torch.zeros(40, 1), torch.arange(40)
    shards = [BatchLoader(x, y, 5, seed=1, shard=(r, 2)) for r in range(2)]
    full = BatchLoader(x, y, 10, seed=1)
    for a, b, f in zip(shards[0], shards[1], full):
        assert torch.equal(torch.cat([a[1], b[1]]), f[1])


def test_augmentation_is_reproducible_when_resuming_mid_epoch():
    ds_x = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8)
    y = torch.arange(40)

    def augment(x, g):
        return random_crop_flip(x, g, 4, [0.0, 0.0, 0.0])

    loader = BatchLoader(ds_x.float(), y, 8, seed=0, augment=augment)
    full = [b for b, _ in loader]
    assert all(torch.equal(a, b) for a, b in zip(full[2:], [b for b, _ in loader.iter_from(2)]))


def test_imagefolder_reads_class_folders(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for c, colour in enumerate([(255, 0, 0), (0, 0, 255)]):
            folder = tmp_path / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (40 + i, 30), colour).save(folder / f"{i}.png")
    ds = load_dataset("imagefolder", data_dir=str(tmp_path), image_size=16)
    train, evals = make_loaders(ds, batch_size=4, eval_batch_size=4)
    x, y = next(iter(evals["test"]))
    assert x.shape == (4, 3, 16, 16) and ds.num_classes == 2
    red = x[y == 0][0]
    assert float(red[0].mean()) > float(red[2].mean())
    train.set_epoch(0)
    assert sum(len(b[1]) for b in train) == 6
    with pytest.raises(FileNotFoundError, match="train"):
        load_dataset("imagefolder", data_dir=str(tmp_path / "nowhere"))


def test_unknown_data_name():
    with pytest.raises(ValueError, match="unknown data 'mnist'.*digits"):
        load_dataset("mnist")
