"""Omniglot loading (both layouts), splits, rotations, within-alphabet and seeded episodes, bad input."""

from __future__ import annotations

import math
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from allmap.app.build import build_family
from allmap.app.config import ConfigError, load_config
from allmap.app.evaluation import protocol as protocol_line
from allmap.tasks import ClassImages, Episodes, Omniglot, load_omniglot
from allmap.tasks.episodes import affine, translate, warp
from allmap.tasks.omniglot import PROTOCOLS, REPTILE_SPLITS, SHUFFLED_SPLITS, SPLITS, reptile_order, shuffled_order

ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"
pytestmark = pytest.mark.skipif(not ROOT.is_dir(), reason="needs ../shared/data/omniglot")


@pytest.fixture(scope="module")
def data():
    return load_omniglot(ROOT)  # cached in ~/.cache/allmap after the first run


def _write_release(dest: Path, picks: dict[str, list[int]]) -> None:
    """An official-layout folder with the characters ``picks[set]`` (global numbers) from the archives."""
    import json

    table = json.loads((ROOT / "alphabets.json").read_text())
    for which, numbers in picks.items():
        first = 1 if which == "background" else 965
        raw = np.load(ROOT / f"images_{which}.npz")["images"]
        for number in numbers:
            entry = next(a for a in table[which] if a["first_character"] <= number <= a["last_character"])
            folder = (
                dest / f"images_{which}" / entry["alphabet"] / f"character{number - entry['first_character'] + 1:02d}"
            )
            folder.mkdir(parents=True, exist_ok=True)
            for d in range(20):
                Image.fromarray(raw[number - first, d]).convert("1").save(folder / f"{number:04d}_{d + 1:02d}.png")


PICKS = {"background": [1, 2, 27], "evaluation": [965, 1201]}


def test_archives_load_shapes_and_ink(data):
    assert data.images.shape == (1623, 20, 28, 28) and data.images.dtype == torch.float32
    assert torch.equal(data.numbers, torch.arange(1, 1624))
    assert len(data.alphabets) == 50 and data.alphabets[0] == "Arcadian"
    assert 0.0 <= float(data.images.min()) and float(data.images.max()) <= 1.0
    # ink is 1.0 and strokes are thin: a small mean, corners blank
    assert 0.02 < float(data.images.mean()) < 0.25
    assert float(data.images[:, :, 0, 0].max()) < 0.5


@pytest.mark.parametrize("resize, pil_filter", [("bilinear", Image.BILINEAR), ("lanczos", Image.LANCZOS)])
def test_resize_filters_match_pillow(resize, pil_filter):
    from allmap.tasks.omniglot import preprocess

    raw = np.load(ROOT / "images_background.npz")["images"][:12, :3]  # True = paper
    ours = preprocess(torch.from_numpy(raw), 28, resize).numpy()
    pil = np.stack(
        [
            [
                1.0
                - np.asarray(Image.fromarray((a * 255).astype(np.uint8)).resize((28, 28), pil_filter), np.float32) / 255
                for a in row
            ]
            for row in raw
        ]
    )
    assert np.abs(ours - pil).max() < 0.005  # Pillow rounds to 1/255 (and between its two passes)
    with pytest.raises(ValueError, match="unknown resize filter 'nearest'; expected one of bilinear, lanczos"):
        preprocess(torch.from_numpy(raw), 28, "nearest")


def test_official_layout_folder_and_zip_give_the_same_tensors(data, tmp_path):
    _write_release(tmp_path / "release", PICKS)
    folder = load_omniglot(tmp_path / "release", cache_dir=tmp_path / "cache", complete=False)
    numbers = sum(PICKS.values(), [])
    assert folder.numbers.tolist() == numbers
    assert torch.equal(folder.images, data.images[torch.tensor(numbers) - 1])
    assert [folder.alphabets[int(a)] for a in folder.alphabet] == [
        data.alphabets[int(data.alphabet[n - 1])] for n in numbers
    ]
    # zip files of the same folders
    zipped = tmp_path / "zipped"
    zipped.mkdir()
    for which in PICKS:
        with zipfile.ZipFile(zipped / f"images_{which}.zip", "w") as zf:
            for p in sorted((tmp_path / "release" / f"images_{which}").rglob("*.png")):
                zf.write(p, p.relative_to(tmp_path / "release"))
    from_zip = load_omniglot(zipped, cache_dir=tmp_path / "cache", complete=False)
    assert torch.equal(from_zip.images, folder.images)
    # the second start reads the cache
    assert len(list((tmp_path / "cache").glob("omniglot-*.pt"))) == 2
    again = load_omniglot(zipped, cache_dir=tmp_path / "cache", complete=False)
    assert torch.equal(again.images, folder.images)


def test_cache_keeps_one_copy_of_the_same_release_read_from_two_paths(data, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setenv("ALLMAP_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("ALLMAP_CACHE_LIMIT", raising=False)
    _write_release(tmp_path / "a", PICKS)
    shutil.copytree(tmp_path / "a", tmp_path / "b", copy_function=shutil.copyfile)  # new modification times
    # hidden entries (a notebook's checkpoints, macOS resource forks) are not part of the release
    hidden = tmp_path / "b" / "images_background" / ".ipynb_checkpoints" / "character01"
    hidden.mkdir(parents=True)
    (hidden / "0001_01.png").write_bytes(b"not an image")
    (tmp_path / "b" / "images_evaluation" / "._0965_01.png").write_bytes(b"\x00\x05\x16\x07")
    a = load_omniglot(tmp_path / "a", complete=False)
    b = load_omniglot(tmp_path / "b", complete=False)
    assert torch.equal(a.images, b.images) and a.numbers.tolist() == sum(PICKS.values(), [])
    assert len(list((tmp_path / "cache").glob("omniglot-*.pt"))) == 1
    load_omniglot(tmp_path / "b", complete=False, size=14)  # other preprocessing: its own entry
    assert len(list((tmp_path / "cache").glob("omniglot-*.pt"))) == 2


def test_partial_or_wrong_folders_fail_clearly(tmp_path):
    _write_release(tmp_path / "r", {"background": [1], "evaluation": [965]})
    with pytest.raises(ValueError, match="partial"):
        load_omniglot(tmp_path / "r", cache_dir=tmp_path / "c")
    (tmp_path / "r" / "images_background" / "Arcadian" / "character01" / "0001_07.png").unlink()
    with pytest.raises(ValueError, match="drawings"):
        load_omniglot(tmp_path / "r", cache_dir=tmp_path / "c", complete=False)
    Image.new("1", (50, 50)).save(tmp_path / "r" / "images_background" / "Arcadian" / "character01" / "0001_07.png")
    with pytest.raises(ValueError, match="105x105"):
        load_omniglot(tmp_path / "r", cache_dir=tmp_path / "c", complete=False)
    (tmp_path / "r" / "images_background" / "Arcadian" / "character01" / "0001_07.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="corrupt"):
        load_omniglot(tmp_path / "r", cache_dir=tmp_path / "c", complete=False)
    with pytest.raises(ValueError, match="no Omniglot data"):
        load_omniglot(tmp_path / "empty", cache_dir=tmp_path / "c")


def test_corrupt_archive_fails_clearly(tmp_path):
    for which in ("background", "evaluation"):
        (tmp_path / f"images_{which}.npz").write_bytes(b"PK\x03\x04 this is not a real archive")
    (tmp_path / "alphabets.json").write_text((ROOT / "alphabets.json").read_text())
    with pytest.raises(ValueError, match="sha256 .* corrupt, partial or a different archive"):
        load_omniglot(tmp_path, cache_dir=tmp_path / "c")
    # past the checksum (e.g. a re-packed archive), the contents are still verified
    from allmap.tasks import omniglot

    np.savez(tmp_path / "images_background.npz", images=np.zeros((3, 20, 105, 105), bool), labels=np.zeros((3, 20)))
    monkey = pytest.MonkeyPatch()
    monkey.setattr(
        omniglot,
        "SHA256",
        {
            "background": omniglot.hashlib.sha256((tmp_path / "images_background.npz").read_bytes()).hexdigest(),
            "evaluation": "",
        },
    )
    try:
        with pytest.raises(ValueError, match="partial or different"):
            load_omniglot(tmp_path, cache_dir=tmp_path / "c")
    finally:
        monkey.undo()
    (tmp_path / "zipped").mkdir()
    (tmp_path / "zipped" / "images_background.zip").write_bytes(b"garbage")
    (tmp_path / "zipped" / "images_evaluation.zip").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a valid zip"):
        load_omniglot(tmp_path / "zipped", cache_dir=tmp_path / "c")


def test_split_sizes_disjointness_and_alphabets(data):
    sizes = {name: len(data.split(name)) for name in SPLITS}
    assert sizes["vinyals-train"] == 1028 and sizes["vinyals-val"] == 172 and sizes["vinyals-trainval"] == 1200
    assert sizes["vinyals-test"] == 423 and sizes["background"] == 964 and sizes["evaluation"] == 659
    for protocol in PROTOCOLS.values():
        train, test = (set(data.split(protocol[p]).numbers.tolist()) for p in ("train", "test"))
        assert not train & test
    held = PROTOCOLS["standard-holdout"]
    assert not set(data.split(held["train"]).numbers.tolist()) & set(data.split(held["val"]).numbers.tolist())
    test = data.split("vinyals-test")
    names = [data.alphabets[int(a)] for a in test.alphabet]
    assert names[0] == "Gurmukhi" and names.count("Gurmukhi") == 4 and names[-1] == "ULOG"
    bg = {data.alphabets[int(a)] for a in data.split("background").alphabet}
    ev = {data.alphabets[int(a)] for a in data.split("evaluation").alphabet}
    assert len(bg) == 30 and len(ev) == 20 and not bg & ev


def test_shuffled_split_is_fixed_and_mixes_alphabets(data):
    order = shuffled_order()
    assert order[:8].tolist() == [1398, 61, 1486, 1166, 993, 1187, 1021, 1320]  # pinned: the split never moves
    assert sorted(order.tolist()) == list(range(1, 1624))
    sizes = {name: len(data.split(name)) for name in SHUFFLED_SPLITS}
    assert sizes == {"shuffled-train": 1100, "shuffled-val": 100, "shuffled-trainval": 1200, "shuffled-test": 423}
    split = {name: set(data.split(name).numbers.tolist()) for name in SHUFFLED_SPLITS}
    assert split["shuffled-train"] | split["shuffled-val"] == split["shuffled-trainval"]
    assert (
        not split["shuffled-train"] & split["shuffled-val"] and not split["shuffled-trainval"] & split["shuffled-test"]
    )
    assert split["shuffled-test"] == set(order[1200:].tolist())
    # unlike the Vinyals split, test characters share alphabets with the training side
    test_alphabets = set(data.split("shuffled-test").alphabet.tolist())
    assert len(test_alphabets & set(data.split("shuffled-trainval").alphabet.tolist())) >= 45
    family = Omniglot(ROOT, split="test", protocol="shuffled", ways=5, shots=1, queries=1)
    assert family.classes == 4 * 423 and "shuffled-test" in family.describe()
    with pytest.raises(ValueError, match="shuffled-test"):
        Omniglot(ROOT, split="shuffled-tset")


def test_reptile_split_is_what_the_reptile_code_draws_from_the_release_folders(data):
    """run_omniglot.py lists the merged release folders sorted (alphabet, then characterNN), then calls
    ``random.seed(0)`` and ``random.shuffle``; the first 1,200 train, the rest test."""
    import json
    import random

    table = json.loads((ROOT / "alphabets.json").read_text())
    folders = {
        f"{a['alphabet']}/character{j + 1:02d}": a["first_character"] + j
        for half in table.values()
        for a in half
        for j in range(a["last_character"] - a["first_character"] + 1)
    }
    listing = [f"{alphabet}/{char}" for alphabet in sorted({k.split("/")[0] for k in folders})
               for char in sorted(k.split("/")[1] for k in folders if k.startswith(alphabet + "/"))]  # fmt: skip
    random.seed(0)
    random.shuffle(listing)
    assert reptile_order().tolist() == [folders[f] for f in listing]
    assert reptile_order()[:8].tolist() == [534, 1481, 649, 757, 1218, 1013, 806, 437]  # pinned
    sizes = {name: len(data.split(name)) for name in REPTILE_SPLITS}
    assert sizes == {"reptile-train": 1100, "reptile-val": 100, "reptile-trainval": 1200, "reptile-test": 423}
    test = set(data.split("reptile-test").numbers.tolist())
    assert test == {folders[f] for f in listing[1200:]} and not test & set(
        data.split("reptile-trainval").numbers.tolist()
    )
    family = Omniglot(ROOT, split="val", protocol="reptile", ways=5, shots=1, queries=1)
    assert family.overlaps_training and "reptile-val" in family.describe()


def test_shuffle_support_reorders_the_support_set_only(data):
    kwargs = dict(split="test", ways=5, shots=3, queries=2)
    plain = Omniglot(ROOT, **kwargs).sample(4, torch.Generator().manual_seed(3))
    mixed = Omniglot(ROOT, shuffle_support=True, **kwargs).sample(4, torch.Generator().manual_seed(3))
    assert torch.equal(plain.query_x, mixed.query_x) and torch.equal(plain.query_y, mixed.query_y)
    assert not torch.equal(plain.support_y, mixed.support_y)
    for i in range(4):  # the same images with the same labels, in another order
        key = lambda x, y: sorted(zip(y.tolist(), x.flatten(1).sum(1).tolist()))  # noqa: E731
        assert key(plain.support_x[i], plain.support_y[i]) == key(mixed.support_x[i], mixed.support_y[i])
    with pytest.raises(ValueError, match="shuffle_support to be true or false"):
        Omniglot(ROOT, shuffle_support="yes", **kwargs)


def test_rotations_are_new_classes(data):
    family = Omniglot(ROOT, split="test", ways=20, shots=2, queries=1)
    base = 423
    assert family.classes == 4 * base
    tasks = family.sample(4, torch.Generator().manual_seed(0))
    test = data.split("vinyals-test").images
    rotated_seen = 0
    for t in range(4):
        for j, c in enumerate(tasks.info["classes"][t].tolist()):
            char, r = c % base, c // base
            rotated_seen += r > 0
            for img in tasks.support_x[t, 2 * j : 2 * j + 2, 0]:
                assert any(torch.equal(torch.rot90(test[char, d], r), img) for d in range(20))
            assert (tasks.support_y[t, 2 * j : 2 * j + 2] == j).all()
    assert rotated_seen > 0
    # the same character under two rotations is two labels of one episode
    small = ClassImages.from_grid(test[:2])
    tasks = Episodes(small, ways=8, shots=1, queries=1, rotations=(0, 90, 180, 270)).sample(1, torch.Generator())
    assert sorted(tasks.info["classes"][0].tolist()) == list(range(8))
    assert len(set(tasks.support_y[0].tolist())) == 8


def test_within_alphabet_episodes_draw_one_alphabet(data):
    family = Omniglot(
        ROOT, split="test", protocol="lake", ways=5, shots=1, queries=2, rotations=(0,), within_alphabet=True
    )
    tasks = family.sample(50, torch.Generator().manual_seed(3))
    evaluation = data.split("evaluation")
    alphabet_of = evaluation.alphabet[tasks.info["classes"] % len(evaluation)]
    assert (alphabet_of == tasks.info["group"][:, None]).all()
    assert len(set(tasks.info["group"].tolist())) > 5


def test_seeded_episodes_repeat_exactly():
    family = Omniglot(ROOT, split="train", ways=5, shots=1, queries=3)
    a = family.sample(8, torch.Generator().manual_seed(11))
    b = family.sample(8, torch.Generator().manual_seed(11))
    c = family.sample(8, torch.Generator().manual_seed(12))
    for name in ("support_x", "support_y", "query_x", "query_y"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert not torch.equal(a.support_x, c.support_x)
    fixed = family.fixed(30, seed=5, batch=7)
    again = family.fixed(30, seed=5, batch=7)
    assert sum(len(t) for t in fixed) == 30
    assert all(torch.equal(x.query_x, y.query_x) for x, y in zip(fixed, again))


def test_shift_translates_each_image_by_its_own_seeded_offset():
    # one lit pixel per image: after translate it sits at its old place minus the image's offset
    x = torch.zeros(40, 1, 12, 12)
    x[:, 0, 5, 6] = 1.0
    moved = translate(x, 2, torch.Generator().manual_seed(0))
    offset = torch.randint(0, 5, (2, 40), generator=torch.Generator().manual_seed(0)) - 2  # the same draw
    where = torch.nonzero(moved[:, 0])  # [40, 3]: image, row, col; exactly one pixel each
    assert where.shape == (40, 3) and torch.equal(where[:, 0], torch.arange(40))
    assert torch.equal(where[:, 1], 5 - offset[0]) and torch.equal(where[:, 2], 6 - offset[1])
    assert len(torch.unique(offset.T, dim=0)) > 10  # offsets differ across images
    # in episodes: seeded (repeats exactly), applied to support and query, only where asked
    plain = Omniglot(ROOT, split="train", ways=5, shots=1, queries=3)
    shifted = Omniglot(ROOT, split="train", ways=5, shots=1, queries=3, shift=2)
    a = shifted.sample(4, torch.Generator().manual_seed(3))
    b = shifted.sample(4, torch.Generator().manual_seed(3))
    c = plain.sample(4, torch.Generator().manual_seed(3))
    assert torch.equal(a.query_x, b.query_x) and torch.equal(a.support_y, c.support_y)
    assert not torch.equal(a.support_x, c.support_x) and not torch.equal(a.query_x, c.query_x)
    ink, ink0 = a.query_x.sum((-1, -2)), c.query_x.sum((-1, -2))
    assert bool((ink <= ink0 + 1e-4).all()) and float(ink.sum()) > 0.97 * float(ink0.sum())  # ink moves, little is cut
    with pytest.raises(ValueError, match="shift .* integer in \\[0, 27\\], got 28"):
        Omniglot(ROOT, split="train", shift=28)


def test_affine_turns_and_zooms_about_the_centre():
    x = torch.rand(3, 2, 6, 6, dtype=torch.float64)
    one, zero = torch.ones(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    torch.testing.assert_close(affine(x, zero, one), x, atol=1e-12, rtol=0)
    torch.testing.assert_close(affine(x, zero + math.pi / 2, one), torch.rot90(x, 1, (2, 3)), atol=1e-12, rtol=0)
    torch.testing.assert_close(affine(x, zero + math.pi, one), torch.rot90(x, 2, (2, 3)), atol=1e-12, rtol=0)
    # zoom 2: the centre 3x3 of a 6x6 image fills it; output pixel (i, j) samples input (1.25 + i/2, 1.25 + j/2)
    big = affine(x, zero, one * 2)
    ref = torch.nn.functional.interpolate(x, size=(12, 12), mode="bilinear", align_corners=False)[..., 3:9, 3:9]
    torch.testing.assert_close(big, ref, atol=1e-12, rtol=0)


def test_warp_augments_episodes_seeded_and_within_bounds():
    x = torch.zeros(50, 1, 28, 28)
    x[:, 0, 10:18, 13:15] = 1.0  # a vertical bar: a turn tilts it, a zoom lengthens or shortens it
    a = warp(x, 10, 0.1, torch.Generator().manual_seed(0))
    b = warp(x, 10, 0.1, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and not torch.equal(a, x)
    ink = a.sum((1, 2, 3)) / x.sum((1, 2, 3))  # area scales by zoom^2 within [0.9^2, 1.1^2]
    assert bool((ink > 0.9**2 - 0.02).all() and (ink < 1.1**2 + 0.02).all()) and float(ink.std()) > 0.02
    torch.testing.assert_close(warp(x, 0, 0, torch.Generator()), x, atol=1e-6, rtol=0)
    family = Omniglot(ROOT, split="train", ways=5, shots=1, queries=3, rotate=10, scale=0.1)
    plain = Omniglot(ROOT, split="train", ways=5, shots=1, queries=3)
    t, u = (f.sample(2, torch.Generator().manual_seed(3)) for f in (family, plain))
    assert torch.equal(t.support_y, u.support_y) and not torch.equal(t.query_x, u.query_x)
    torch.testing.assert_close(t.query_x.sum(), u.query_x.sum(), rtol=0.1, atol=0)
    for bad in ({"rotate": 180}, {"rotate": -1}, {"scale": 1.0}, {"scale": True}):
        with pytest.raises(ValueError, match=f"{next(iter(bad))} .* in \\[0, "):
            Omniglot(ROOT, split="train", **bad)


def test_run_configs_augment_training_episodes_only():
    config = load_config("omniglot-5w1s-protonet", ["task.shift=2", "task.rotate=10", "task.scale=0.1"])
    train_family = build_family(config, "train")
    assert (train_family.shift, train_family.rotate, train_family.scale) == (2, 10.0, 0.1)
    for split in ("val", "test"):
        family = build_family(config, split)
        assert (family.shift, family.rotate, family.scale) == (0, 0.0, 0.0)


def test_eval_task_sets_the_test_episodes_apart_from_the_training_ones():
    # train across alphabets with rotated copies as classes; validate and test within one alphabet, as drawn
    config = load_config(
        "omniglot-5w1s-protonet-lake",
        ["task.rotations=[0, 90, 180, 270]", "eval.ways=20", "eval.task={within_alphabet: true, rotations: [0]}"],
    )
    train_family = build_family(config, "train")
    assert (train_family.rotations, train_family.within_group, train_family.ways) == ((0, 90, 180, 270), False, 60)
    for split in ("val", "test"):
        family = build_family(config, split)
        assert (family.rotations, family.within_group, family.ways) == ((0,), True, 20)
        tasks = family.sample(3, torch.Generator().manual_seed(0))
        alphabet = family.data.group[tasks.info["classes"]]
        assert (alphabet == alphabet[:, :1]).all()
    assert "within-alphabet" in build_family(config, "test").describe()
    refined = load_config("omniglot-5w1s-protonet-lake", ["learner.transductive=3"])
    assert "transductive: prototypes refined 3 times" in protocol_line(refined, build_family(refined, "test"), 10)
    for bad in ("eval.task={family: sinusoid}", "eval.task=[0]"):
        with pytest.raises(ConfigError, match="eval.task"):
            load_config("omniglot-5w1s-protonet-lake", [bad])


def test_support_and_query_images_are_distinct_drawings():
    family = Omniglot(ROOT, split="test", ways=5, shots=5, queries=15, rotations=(0,))
    tasks = family.sample(3, torch.Generator().manual_seed(0))
    x = torch.cat([tasks.support_x, tasks.query_x], 1).flatten(2)  # [3, 100, 784]
    for t in range(3):
        assert len(torch.unique(x[t], dim=0)) == 100


def test_bad_episode_settings_fail_clearly():
    with pytest.raises(ValueError, match="only 423 classes"):
        Omniglot(ROOT, split="test", ways=500, rotations=(0,))
    with pytest.raises(ValueError, match="fewer than shots \\+ queries = 21"):
        Omniglot(ROOT, split="test", shots=1, queries=20)
    with pytest.raises(ValueError, match="unknown protocol"):
        Omniglot(ROOT, protocol="vinyals")
    with pytest.raises(ValueError, match="no group has 60 classes"):
        Omniglot(ROOT, split="test", ways=60, rotations=(0,), within_alphabet=True)
    with pytest.raises(ValueError, match="multiples of 90"):
        Omniglot(ROOT, split="test", rotations=(0, 45))
