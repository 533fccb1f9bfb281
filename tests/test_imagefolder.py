"""Few-shot episodes over a user's image folder (one sub-folder per class) or a mini-ImageNet CSV split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from allmap.tasks import ImageFolder
from allmap.tasks.imagefolder import load_image_folder


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
    family = ImageFolder(tmp_path / "mini", split="test", ways=4, shots=1, queries=5, size=10, channels=1,
                         cache_dir=tmp_path / "c")
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
