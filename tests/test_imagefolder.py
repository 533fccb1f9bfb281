"""Few-shot episodes over a user's image folder (one sub-folder per class) or a mini-ImageNet CSV split."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from allmap.tasks import ImageFolder
from allmap.tasks.cache import cache_limit, evict
from allmap.tasks.imagefolder import PHASES, load_image_folder, split_classes


def _make_folder(root: Path, classes: int = 4, per_class: int = 6, sizes=((20, 16), (12, 12))) -> dict[str, list]:
    rng = np.random.default_rng(0)
    colours = {}
    for c in range(classes):
        d = root / f"class_{c}"
        d.mkdir(parents=True)
        colour = rng.integers(0, 256, 3)
        colours[d.name] = colour
        for i in range(per_class):
            w, h = sizes[i % len(sizes)]
            Image.fromarray(np.broadcast_to(colour.astype(np.uint8), (h, w, 3)).copy()).save(d / f"{i:03d}.png")
    return colours


def test_folder_layout_resizes_and_samples_episodes(tmp_path):
    colours = _make_folder(tmp_path / "data")
    data = load_image_folder(tmp_path / "data", size=8, cache_dir=tmp_path / "cache")
    assert data.images.shape == (24, 3, 8, 8) and data.images.dtype == torch.uint8
    assert data.names == ("class_0", "class_1", "class_2", "class_3") and data.counts.tolist() == [6] * 4
    family = ImageFolder(tmp_path / "data", ways=3, shots=2, queries=3, size=8, cache_dir=tmp_path / "cache")
    tasks = family.sample(5, torch.Generator().manual_seed(0))
    assert tasks.support_x.shape == (5, 6, 3, 8, 8) and tasks.support_x.dtype == torch.float32
    for t in range(5):
        for j, c in enumerate(tasks.info["classes"][t].tolist()):
            expect = torch.tensor(colours[f"class_{c}"], dtype=torch.float32) / 255
            img = tasks.query_x[t, 3 * j]
            torch.testing.assert_close(img[:, 4, 4], expect)
    assert len(list((tmp_path / "cache").glob("imagefolder-*.pt"))) == 1
    mixed = ImageFolder(
        tmp_path / "data", ways=3, shots=2, queries=3, size=8, cache_dir=tmp_path / "cache", shuffle_support=True
    ).sample(5, torch.Generator().manual_seed(0))
    # the same episodes, each support set a permutation of the class-by-class one (image matched to label)
    torch.testing.assert_close(mixed.query_x, tasks.query_x)
    assert not torch.equal(mixed.support_y, tasks.support_y)
    for t in range(5):
        assert sorted(mixed.support_y[t].tolist()) == sorted(tasks.support_y[t].tolist())
        for x, y in zip(mixed.support_x[t], mixed.support_y[t]):
            torch.testing.assert_close(x[:, 4, 4], tasks.support_x[t][tasks.support_y[t] == y][0][:, 4, 4])


def test_csv_split_layout_and_grey(tmp_path):
    _make_folder(tmp_path / "flat")
    images = tmp_path / "mini" / "images"
    images.mkdir(parents=True)
    rows = ["filename,label"]
    for d in sorted((tmp_path / "flat").iterdir()):
        for p in sorted(d.iterdir()):
            name = f"{d.name}_{p.name}"
            p.rename(images / name)
            rows.append(f"{name},n0{d.name[-1]}")
    (tmp_path / "mini" / "test.csv").write_text("\n".join(rows) + "\n")
    family = ImageFolder(
        tmp_path / "mini", split="test", ways=4, shots=1, queries=5, size=10, channels=1, cache_dir=tmp_path / "c"
    )
    assert family.data.names == ("n00", "n01", "n02", "n03")
    assert family.sample(2, torch.Generator()).query_x.shape == (2, 20, 1, 10, 10)
    (tmp_path / "mini" / "val.csv").write_text("name,class\nx.png,a\n")
    with pytest.raises(ValueError, match="filename,label"):
        load_image_folder(tmp_path / "mini", split="val", cache_dir=tmp_path / "c")
    (tmp_path / "mini" / "val.csv").write_text("filename,label\nmissing.png,a\n")
    with pytest.raises(ValueError, match="missing"):
        load_image_folder(tmp_path / "mini", split="val", cache_dir=tmp_path / "c")


def test_bad_folders_fail_clearly(tmp_path):
    _make_folder(tmp_path / "data", per_class=4)
    with pytest.raises(ValueError, match="fewer than shots \\+ queries = 5"):
        ImageFolder(tmp_path / "data", ways=2, shots=1, queries=4, size=8, cache_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="only 4 classes"):
        ImageFolder(tmp_path / "data", ways=5, shots=1, queries=1, size=8, cache_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="different sizes.*size=N"):
        load_image_folder(tmp_path / "data", size=None, cache_dir=tmp_path / "c")
    (tmp_path / "data" / "class_0" / "000.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(ValueError, match="corrupt"):
        load_image_folder(tmp_path / "data", size=8, cache_dir=tmp_path / "c")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="one sub-folder per class"):
        load_image_folder(tmp_path / "empty", cache_dir=tmp_path / "c")


def test_hidden_entries_are_skipped(tmp_path):
    _make_folder(tmp_path / "data")
    (tmp_path / "data" / ".ipynb_checkpoints").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "data" / ".ipynb_checkpoints" / "000.png")
    (tmp_path / "data" / "class_0" / "._000.png").write_bytes(b"\x00\x05\x16\x07 a macOS resource fork")
    (tmp_path / "data" / "class_1" / ".hidden").mkdir()
    data = load_image_folder(tmp_path / "data", size=8, cache_dir=tmp_path / "c")
    assert data.names == ("class_0", "class_1", "class_2", "class_3") and data.counts.tolist() == [6] * 4


def test_flat_folder_classes_are_split_by_a_seeded_rule(tmp_path):
    _make_folder(tmp_path / "data", classes=12, per_class=2)
    names = [f"class_{c}" for c in range(12)]
    kwargs = dict(ways=2, shots=1, queries=1, size=8, cache_dir=tmp_path / "c")
    phases = {s: ImageFolder(tmp_path / "data", split=s, **kwargs) for s in PHASES}
    got = {s: set(f.data.names) for s, f in phases.items()}
    assert [len(got[s]) for s in PHASES] == [8, 2, 2]  # 64/16/20% of 12, rounded half up
    assert got["train"] | got["val"] | got["test"] == set(names) and not got["train"] & (got["val"] | got["test"])
    order = [sorted(names)[i] for i in np.random.RandomState(0).permutation(12)]  # the documented rule
    assert got == {"train": set(order[:8]), "val": set(order[8:10]), "test": set(order[10:])}
    assert (
        "test classes of a flat folder: 2 of 12, sorted class names shuffled with seed 0, 64/16/20%"
        in phases["test"].describe()
    )
    assert len(list((tmp_path / "c").glob("imagefolder-*.pt"))) == 1  # one decoded copy for the three phases
    other = ImageFolder(tmp_path / "data", split="test", split_seed=1, **kwargs)
    assert set(other.data.names) != got["test"]
    assert {k: len(v) for k, v in split_classes(names, fractions=[0.5, 0.25, 0.25]).items()} == {
        "train": 6,
        "val": 3,
        "test": 3,
    }
    with pytest.raises(ValueError, match="split_fractions to be three shares"):
        ImageFolder(tmp_path / "data", split="test", split_fractions=[0.8, 0.3, 0.1], **kwargs)
    with pytest.raises(ValueError, match="only 2 classes.*test classes of a flat folder.*task.split_fractions"):
        ImageFolder(tmp_path / "data", split="test", **{**kwargs, "ways": 3})


def test_split_layouts_name_the_missing_phase(tmp_path):
    for phase in ("train", "test"):
        _make_folder(tmp_path / "data" / phase, classes=3)
    assert load_image_folder(tmp_path / "data", split="test", size=8, cache_dir=tmp_path / "c").classes == 3
    with pytest.raises(
        ValueError,
        match=r"data/val/ is missing\. .* holds test/, train/, so it is read as split "
        r"folders: ROOT/train/CLASS/\*\.png, ROOT/val/CLASS/\*\.png",
    ):
        load_image_folder(tmp_path / "data", split="val", size=8, cache_dir=tmp_path / "c")
    (tmp_path / "mini").mkdir()
    (tmp_path / "mini" / "train.csv").write_text("filename,label\n")
    with pytest.raises(ValueError, match=r"mini/test\.csv is missing\. .* CSV split \(mini-ImageNet\)"):
        load_image_folder(tmp_path / "mini", split="test", size=8, cache_dir=tmp_path / "c")


def _entries(cache: Path) -> list[Path]:
    return sorted(cache.glob("imagefolder-*.pt"))


def test_cache_keeps_one_copy_of_the_same_images_at_two_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("ALLMAP_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("ALLMAP_CACHE_LIMIT", raising=False)
    _make_folder(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b", copy_function=shutil.copyfile)  # new modification times
    a, b = (load_image_folder(tmp_path / p, size=8) for p in "ab")
    assert torch.equal(a.images, b.images) and len(_entries(tmp_path / "cache")) == 1
    os.utime(tmp_path / "b" / "class_0" / "000.png", ns=(1, 1))  # touched, same bytes: the same entry
    assert torch.equal(load_image_folder(tmp_path / "b", size=8).images, a.images)
    assert len(_entries(tmp_path / "cache")) == 1
    Image.fromarray(np.zeros((16, 20, 3), np.uint8)).save(tmp_path / "b" / "class_0" / "000.png")  # new content
    changed = load_image_folder(tmp_path / "b", size=8)
    assert changed.images[0].sum() == 0 and len(_entries(tmp_path / "cache")) == 2


def test_cache_evicts_the_least_recently_used_entries_beyond_its_limit(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("ALLMAP_CACHE", str(cache))
    monkeypatch.delenv("ALLMAP_CACHE_LIMIT", raising=False)
    assert cache_limit() == 2 << 30
    _make_folder(tmp_path / "data")
    load_image_folder(tmp_path / "data", size=8)
    (e8,) = _entries(cache)
    load_image_folder(tmp_path / "data", size=9)
    (e9,) = set(_entries(cache)) - {e8}
    os.utime(e8, (1000, 1000))
    os.utime(e9, (2000, 2000))
    load_image_folder(tmp_path / "data", size=8)  # a hit: e8 becomes the most recently used
    assert e8.stat().st_mtime > e9.stat().st_mtime
    # room for e8, e9 and 2 kB: the larger 10x10 entry pushes out e9, the least recently used
    monkeypatch.setenv("ALLMAP_CACHE_LIMIT", str(e8.stat().st_size + e9.stat().st_size + 2000))
    load_image_folder(tmp_path / "data", size=10)
    left = _entries(cache)
    assert e8 in left and e9 not in left and len(left) == 2
    assert sum(p.stat().st_size for p in left) <= cache_limit()
    # entries of older versions count too, and other files in the folder are never touched
    (cache / "omniglot-npz-0123456789abcdef.pt").write_bytes(b"x" * 100)
    (cache / "notes.txt").write_bytes(b"x" * 10**6)
    os.utime(cache / "omniglot-npz-0123456789abcdef.pt", (10, 10))
    assert evict(cache, limit=sum(p.stat().st_size for p in left)) == [cache / "omniglot-npz-0123456789abcdef.pt"]
    assert (cache / "notes.txt").is_file()
    monkeypatch.setenv("ALLMAP_CACHE_LIMIT", "0")  # no disk cache
    load_image_folder(tmp_path / "data", size=11)
    assert _entries(cache) == left
    monkeypatch.setenv("ALLMAP_CACHE_LIMIT", "500M")
    assert cache_limit() == 500 << 20
    monkeypatch.setenv("ALLMAP_CACHE_LIMIT", "lots")
    with pytest.raises(ValueError, match="ALLMAP_CACHE_LIMIT: expected a size in bytes such as 2000000000, 500M"):
        load_image_folder(tmp_path / "data", size=12)
