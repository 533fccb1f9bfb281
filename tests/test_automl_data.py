"""Ordinary classification splits: stratified and disjoint, from digits, a class folder and Omniglot."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from allmap.automl import digits, flip_labels, load_data, stratified_split


def test_digits_split_is_stratified_disjoint_and_seeded():
    s = digits(seed=3)
    assert (len(s.y_train), len(s.y_val), len(s.y_test)) == (1078, 359, 360) and s.classes == 10
    assert float(s.x_train.max()) == 1.0 and s.x_train.shape[1] == 64
    counts = torch.bincount(s.y_val, minlength=10)
    assert int(counts.min()) >= 35 and int(counts.max()) <= 37
    rows = {tuple(r.tolist()) for r in torch.cat([s.x_train, s.x_val, s.x_test])}
    assert len(rows) > 1700  # (digits has a few duplicate images) no example is used twice
    assert torch.equal(digits(seed=3).y_train, s.y_train) and not torch.equal(digits(seed=4).y_train, s.y_train)
    assert digits(flat=False).x_test.shape[1:] == (1, 8, 8)


def test_bad_fractions_and_noise_are_refused():
    x, y = torch.zeros(4, 2), torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match="three positive fractions"):
        stratified_split(x, y, (0.5, 0.5))
    with pytest.raises(ValueError, match="too few to split three ways"):
        stratified_split(x, y)
    with pytest.raises(ValueError, match="0 <= fraction < 1"):
        flip_labels(digits(), 1.0)
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        load_data("mnist")


def test_a_class_folder_becomes_a_classification_split(tmp_path: Path):
    from PIL import Image

    for c in range(3):
        (tmp_path / "data" / f"class{c}").mkdir(parents=True)
        for i in range(10):
            Image.fromarray(np.full((6, 6), 40 * c + i, dtype=np.uint8)).save(
                tmp_path / "data" / f"class{c}" / f"{i}.png"
            )
    s = load_data("folder", root=str(tmp_path / "data"), size=4, cache_dir=tmp_path / "cache")
    assert s.classes == 3 and (len(s.y_train), len(s.y_val), len(s.y_test)) == (18, 6, 6)
    assert s.x_train.shape[1] == 16
    assert torch.allclose(s.x_train[s.y_train == 2].min(), torch.tensor(80 / 255))


def test_omniglot_background_characters_as_classes():
    try:
        s = load_data("omniglot", classes=5, size=14, flat=False)
    except (OSError, FileNotFoundError) as err:  # the data folder is optional outside this repository
        pytest.skip(f"Omniglot not available: {err}")
    assert s.classes == 5 and s.x_train.shape[1:] == (1, 14, 14)
    assert (len(s.y_train), len(s.y_val), len(s.y_test)) == (60, 20, 20)
