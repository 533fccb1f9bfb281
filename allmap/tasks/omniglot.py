"""Omniglot (Lake, Salakhutdinov & Tenenbaum, Science 2015): loading, preprocessing, caching and splits.

Two source layouts are read, and give the same tensors:

* the NumPy archives ``images_background.npz`` / ``images_evaluation.npz`` (``images``: bool
  ``[characters, 20, 105, 105]``, True = white paper; see the README next to them), with ``alphabets.json``;
* the official release: folders ``images_background/`` and ``images_evaluation/`` (or their zip files)
  laid out as ``Alphabet/characterNN/NNNN_DD.png``, where ``NNNN`` is the character's global number
  (1-964 background, 965-1623 evaluation) and ``DD`` the drawing (01-20).

Preprocessing follows the few-shot literature (Vinyals et al. 2016, Finn et al. 2017, Snell et al. 2017):
invert so ink is 1.0 and paper 0.0, then resize 105x105 -> 28x28 with an antialiased filter (bilinear, or
Pillow's Lanczos with ``resize="lanczos"``).
Rotations by 90/180/270 degrees are applied at sampling time (see :mod:`allmap.tasks.episodes`), so they
cost no memory. The preprocessed tensor is cached on disk (``cache_dir``), keyed by the source files'
bytes and the preprocessing parameters (see :mod:`allmap.tasks.cache`), so a second start takes well under
a second and one copy of the data is cached however many paths it is read from.

Splits of the 1,623 characters, numbered as in the official release (1-based):

* the standard meta-learning split (Vinyals et al. 2016, used by ProtoNets and Matching Networks): characters 1-1200
  are the training side (every background alphabet plus Angelic ... Gurmukhi character 41 of the
  evaluation set), 1201-1623 the 423 test characters (Gurmukhi 42-45, Kannada ... ULOG); this is the
  published split (its test alphabets are those of the ProtoNets split files). ``vinyals-train`` = 1-1028
  and ``vinyals-val`` = 1029-1200 have the 1,028/172 sizes of Snell et al.; the membership of our
  validation subset is ours (the last 172 characters of the training side). ``vinyals-trainval`` = 1-1200,
  ``vinyals-test`` = 1201-1623.
* the shuffled split (Finn et al. 2017's MAML code): the 1,623 characters in a fixed random order
  (``numpy.random.RandomState(1).permutation``, see :func:`shuffled_order`); the first 1,200 are the training
  side, the remaining 423 the test characters. ``shuffled-train`` = the first 1,100, ``shuffled-val`` = the
  next 100 (MAML's sizes), ``shuffled-trainval`` = all 1,200, ``shuffled-test`` = the last 423. Test characters
  then come from alphabets also seen in training, which makes this split easier than the Vinyals split,
  whose test alphabets are unseen but for Gurmukhi's last 4 characters.
* the Reptile split (Nichol et al. 2018's code): the characters in the folder order of the two halves of the
  release merged (alphabets sorted by name, characters in order), shuffled by Python's ``random.seed(0)``;
  ``random.shuffle`` (see :func:`reptile_order`); the first 1,200 train, the other 423 test, with
  ``reptile-train`` / ``reptile-val`` / ``reptile-trainval`` / ``reptile-test`` sized as the shuffled ones.
* ``background`` / ``evaluation`` (Lake et al. 2015): the 30 background alphabets (964 characters) and the
  20 evaluation alphabets (659 characters); ``background-val`` = its last three alphabets (851-964).

:data:`PROTOCOLS` names which split each phase of training (``train``, ``val``, ``test``) uses.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from allmap.tasks.cache import default_cache_dir, files_digest, load_entry, store_entry
from allmap.tasks.episodes import ClassImages, Episodes

__all__ = [
    "Omniglot",
    "OmniglotData",
    "load_omniglot",
    "omniglot_data",
    "SPLITS",
    "SHUFFLED_SPLITS",
    "REPTILE_SPLITS",
    "PROTOCOLS",
    "default_cache_dir",
    "preprocess",
    "shuffled_order",
    "reptile_order",
]

SETS = ("background", "evaluation")
# Number of characters and the first global character number of each half of the official release.
RELEASE = {"background": (964, 1), "evaluation": (659, 965)}
DRAWINGS = 20
RAW_SIZE = 105
# sha256 of the NumPy archives (their README); checked whenever the archives are read (not on cache hits).
SHA256 = {
    "background": "8bf84167413cd00beacdce3fe582f780ab538d8dbef043a6d688f2527bbce199",
    "evaluation": "0b84c7ffd94c4841c0040e529c86a82eaaccb986d8eadad5673f7991b7475276",
}
PREPROCESS_VERSION = 1

# Character ranges [first, last] (1-based, inclusive) of each named split.
SPLITS: dict[str, tuple[int, int]] = {
    "vinyals-train": (1, 1028),
    "vinyals-val": (1029, 1200),
    "vinyals-trainval": (1, 1200),
    "vinyals-test": (1201, 1623),
    "background": (1, 964),
    "background-train": (1, 850),
    "background-val": (851, 964),
    "evaluation": (965, 1623),
    "all": (1, 1623),
}
CHARACTERS = 1623
SHUFFLE_SEED = 1
# Position ranges [start, stop) in :func:`shuffled_order` of each shuffled split.
SHUFFLED_SPLITS: dict[str, tuple[int, int]] = {
    "shuffled-train": (0, 1100),
    "shuffled-val": (1100, 1200),
    "shuffled-trainval": (0, 1200),
    "shuffled-test": (1200, CHARACTERS),
}

REPTILE_SEED = 0
REPTILE_SPLITS: dict[str, tuple[int, int]] = {
    name.replace("shuffled", "reptile"): span for name, span in SHUFFLED_SPLITS.items()
}
# The first character number of each alphabet, in the release's numbering (its last is the next one's first,
# minus one): the folder layout the Reptile split shuffles.
ALPHABET_FIRST: dict[str, int] = {
    "Arcadian": 1, "Armenian": 27, "Asomtavruli_(Georgian)": 68, "Balinese": 108, "Bengali": 132,
    "Blackfoot_(Canadian_Aboriginal_Syllabics)": 178, "Braille": 192, "Cyrillic": 218, "Early_Aramaic": 251,
    "Syriac_(Estrangelo)": 273, "Anglo-Saxon_Futhorc": 296, "Futurama": 325, "Grantha": 351, "Greek": 394,
    "Gujarati": 418, "Hebrew": 466, "Japanese_(hiragana)": 488, "Inuktitut_(Canadian_Aboriginal_Syllabics)": 540,
    "Malay_(Jawi_-_Arabic)": 556, "Japanese_(katakana)": 596, "Korean": 643, "Latin": 683,
    "Alphabet_of_the_Magi": 709, "Mkhedruli_(Georgian)": 729, "Burmese_(Myanmar)": 770, "N_Ko": 804,
    "Ojibwe_(Canadian_Aboriginal_Syllabics)": 837, "Sanskrit": 851, "Tagalog": 893, "Tifinagh": 910, "Angelic": 965,
    "Atemayar_Qelisayer": 985, "Atlantean": 1011, "Aurek-Besh": 1037, "Avesta": 1063, "Ge_ez": 1089,
    "Glagolitic": 1115, "Gurmukhi": 1160, "Kannada": 1205, "Keble": 1246, "Malayalam": 1272, "Manipuri": 1319,
    "Mongolian": 1359, "Old_Church_Slavonic_(Cyrillic)": 1389, "Oriya": 1434, "Syriac_(Serto)": 1480,
    "Sylheti": 1503, "Tengwar": 1531, "Tibetan": 1556, "ULOG": 1598,
}  # fmt: skip

ALL_SPLITS = (*SPLITS, *SHUFFLED_SPLITS, *REPTILE_SPLITS)

# The training phases ("train", "val", "test", as the training loop asks for them) of each protocol.
PROTOCOLS: dict[str, dict[str, str]] = {
    # Vinyals et al. 2016 / ProtoNets: train on all 1,200 training-side characters (4,800 classes with
    # rotations); "val" is a subset of them, so it tracks fitting, not generalisation.
    "standard": {"train": "vinyals-trainval", "val": "vinyals-val", "test": "vinyals-test"},
    # The same with the 172 validation characters held out of training (for model selection).
    "standard-holdout": {"train": "vinyals-train", "val": "vinyals-val", "test": "vinyals-test"},
    # Lake et al. 2015: the 30 background alphabets for training, the 20 evaluation alphabets for test;
    # "val" (Sanskrit, Tagalog, Tifinagh) is part of the training side.
    "lake": {"train": "background", "val": "background-val", "test": "evaluation"},
    # The same with the three validation alphabets held out of training.
    "lake-holdout": {"train": "background-train", "val": "background-val", "test": "evaluation"},
    # Finn et al. 2017 (MAML's code): a fixed random order of all characters, 1,200 for training (4,800 classes
    # with rotations), the remaining 423 for test; "val" is the last 100 of the training side.
    "shuffled": {"train": "shuffled-trainval", "val": "shuffled-val", "test": "shuffled-test"},
    # The same with the 100 validation characters held out of training (MAML's 1,100 / 100 / 423).
    "shuffled-holdout": {"train": "shuffled-train", "val": "shuffled-val", "test": "shuffled-test"},
    # Nichol et al. 2018 (Reptile's code): its own random order, 1,200 for training, 423 for test; "val" is
    # the last 100 of the training side (the code has no validation set).
    "reptile": {"train": "reptile-trainval", "val": "reptile-val", "test": "reptile-test"},
}

_PNG = re.compile(r"^(\d{4})_(\d{2})\.png$")


def shuffled_order() -> np.ndarray:
    """The 1,623 character numbers in the fixed order of the shuffled split: NumPy's legacy ``RandomState(1)``,
    whose stream NumPy keeps stable across versions and machines (a test pins its first members)."""
    return np.random.RandomState(SHUFFLE_SEED).permutation(CHARACTERS) + 1


def reptile_order() -> np.ndarray:
    """The 1,623 character numbers in the order of the Reptile split: the folders of both halves of the release
    in one directory, listed sorted (alphabets by name, then ``character01``, ``character02``, ...), shuffled
    as Nichol et al.'s ``run_omniglot.py`` does (``random.seed(0)``, then ``random.shuffle``; Python keeps
    that stream stable across versions, and a test pins its first members)."""
    starts = sorted(ALPHABET_FIRST.values()) + [CHARACTERS + 1]
    span = {a: range(a, b) for a, b in zip(starts, starts[1:])}
    folders = [n for name in sorted(ALPHABET_FIRST) for n in span[ALPHABET_FIRST[name]]]
    random.Random(REPTILE_SEED).shuffle(folders)
    return np.asarray(folders)


def _ordered_split(name: str) -> tuple[np.ndarray, int, int] | None:
    """The order and the position range ``[start, stop)`` of a split defined by positions in an order."""
    if name in SHUFFLED_SPLITS:
        return shuffled_order(), *SHUFFLED_SPLITS[name]
    if name in REPTILE_SPLITS:
        return reptile_order(), *REPTILE_SPLITS[name]
    return None


RESIZE_FILTERS = ("bilinear", "lanczos")


def _lanczos_matrix(n_in: int, n_out: int) -> Tensor:
    """``[n_out, n_in]`` weights of a Lanczos-3 resize, as Pillow computes them: the kernel
    ``sinc(x) sinc(x / 3)`` on ``|x| < 3``, stretched by the scale when shrinking, each row normalised."""
    scale = n_in / n_out
    stretch = max(scale, 1.0)
    support = 3.0 * stretch
    rows = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        center = (i + 0.5) * scale
        lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), n_in)
        x = (torch.arange(lo, hi, dtype=torch.float64) - center + 0.5) / stretch
        w = torch.sinc(x) * torch.sinc(x / 3) * (x.abs() < 3)
        rows[i, lo:hi] = w / w.sum()
    return rows.float()


def _resize(ink: Tensor, size: int, resize: str) -> Tensor:
    """Resize ``[B, 1, H, W]`` ink images to ``size x size``, clipped to [0, 1]."""
    if resize == "bilinear":
        return F.interpolate(ink, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    rows, cols = _lanczos_matrix(ink.shape[-2], size), _lanczos_matrix(ink.shape[-1], size)
    return (rows @ (ink @ cols.T).clamp_(0.0, 1.0)).clamp_(0.0, 1.0)  # clipped between passes, like Pillow


def preprocess(raw: Tensor, size: int = 28, resize: str = "bilinear") -> Tensor:
    """Bool images ``[..., 105, 105]`` (True = paper) -> float32 ``[..., size, size]`` with ink 1.0.

    ``resize="bilinear"``: antialiased bilinear (``torch.nn.functional.interpolate(antialias=True)``, equal
    to Pillow's ``BILINEAR`` to 0.004). ``resize="lanczos"``: Pillow's ``LANCZOS`` (called ``ANTIALIAS``
    before Pillow 10), reproduced to 0.004 (1/255). Done in chunks so memory stays
    small.
    """
    if resize not in RESIZE_FILTERS:
        raise ValueError(f"Omniglot: unknown resize filter {resize!r}; expected one of {', '.join(RESIZE_FILTERS)}.")
    lead = raw.shape[:-2]
    flat = raw.reshape(-1, 1, *raw.shape[-2:])
    out = torch.empty(flat.shape[0], 1, size, size)
    for i in range(0, flat.shape[0], 4096):
        out[i : i + 4096] = _resize(1.0 - flat[i : i + 4096].float(), size, resize)
    return out.clamp_(0.0, 1.0).reshape(*lead, size, size)


@dataclass(frozen=True)
class OmniglotData:
    """Preprocessed Omniglot: ``images [C, 20, S, S]`` float32 (ink 1.0), ``numbers [C]`` global character
    numbers (1-based, official numbering), ``alphabet [C]`` alphabet index, ``alphabets`` their names."""

    images: Tensor
    numbers: Tensor
    alphabet: Tensor
    alphabets: tuple[str, ...]

    def split(self, name: str) -> OmniglotData:
        """The characters of a named split (see :data:`SPLITS`, :data:`SHUFFLED_SPLITS`, :data:`REPTILE_SPLITS`)."""
        if (ordered := _ordered_split(name)) is not None:
            order, start, stop = ordered
            members = torch.from_numpy(order[start:stop]).to(self.numbers.dtype)
            keep, which = torch.isin(self.numbers, members), f"positions {start}-{stop - 1} of its order"
        elif name in SPLITS:
            lo, hi = SPLITS[name]
            keep, which = (self.numbers >= lo) & (self.numbers <= hi), f"characters {lo}-{hi}"
        else:
            raise ValueError(f"Omniglot: unknown split {name!r}; expected one of {', '.join(ALL_SPLITS)}.")
        if not bool(keep.any()):
            raise ValueError(
                f"Omniglot: split {name!r} ({which}) has no characters in the loaded data "
                f"(characters {int(self.numbers.min())}-{int(self.numbers.max())})."
            )
        return self.select(keep)

    def select(self, keep: Tensor) -> OmniglotData:
        return OmniglotData(self.images[keep], self.numbers[keep], self.alphabet[keep], self.alphabets)

    def __len__(self) -> int:
        return self.images.shape[0]

    def classes(self) -> ClassImages:
        """The characters as a :class:`~allmap.tasks.ClassImages` (one class per character, group = alphabet)."""
        names = tuple(f"{self.alphabets[int(a)]}/{int(n):04d}" for a, n in zip(self.alphabet, self.numbers))
        return ClassImages.from_grid(self.images, group=self.alphabet.clone(), names=names)


# -- reading the sources -------------------------------------------------------------------------------
def _alphabet_table(root: Path) -> list[tuple[str, int, int]]:
    path = root / "alphabets.json"
    if not path.is_file():
        raise ValueError(
            f"Omniglot: {path} is missing; the NumPy archives need alphabets.json next to them (it maps each "
            "alphabet to its character numbers)."
        )
    table = json.loads(path.read_text())
    return [(a["alphabet"], int(a["first_character"]), int(a["last_character"])) for s in SETS for a in table[s]]


def _read_npz(path: Path, which: str) -> tuple[np.ndarray, np.ndarray]:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SHA256[which]:
        raise ValueError(
            f"Omniglot: {path} has sha256 {digest}, expected {SHA256[which]}; the file is corrupt, partial or a "
            "different archive. Replace it with a fresh copy."
        )
    try:
        with np.load(path) as archive:
            images, labels = archive["images"], archive["labels"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as err:
        raise ValueError(
            f"Omniglot: cannot read {path} ({type(err).__name__}: {err}). The archive is corrupt or not an "
            "Omniglot archive; replace it with a fresh copy (see the README for its sha256)."
        ) from err
    count, first = RELEASE[which]
    if images.dtype != np.bool_ or images.shape != (count, DRAWINGS, RAW_SIZE, RAW_SIZE):
        raise ValueError(
            f"Omniglot: {path} holds images of shape {list(images.shape)} ({images.dtype}); expected bool "
            f"[{count}, {DRAWINGS}, {RAW_SIZE}, {RAW_SIZE}]. Is it a partial or different file?"
        )
    if labels.shape != (count, DRAWINGS) or not np.array_equal(
        labels, np.repeat(np.arange(count)[:, None], DRAWINGS, 1)
    ):
        raise ValueError(f"Omniglot: {path}: labels must be the row index repeated, [{count}, {DRAWINGS}].")
    return images, np.arange(first, first + count)


def _hidden(key: str) -> bool:
    """A path with a hidden part (``.ipynb_checkpoints/``, macOS ``._*`` resource forks, ``__MACOSX/`` of zips
    made on macOS): not part of the release."""
    return any(part.startswith(".") or part == "__MACOSX" for part in key.split("/"))


class _Folder:
    """A directory or a zip file with the official layout, read through one interface."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.zip = zipfile.ZipFile(path) if path.is_file() else None
        if self.zip is not None:
            names = [n for n in self.zip.namelist() if n.lower().endswith(".png")]
            self.files = {n: n for n in names if not _hidden(n)}
        else:
            found = {str(p.relative_to(path)).replace(os.sep, "/"): p for p in path.rglob("*.png")}
            self.files = {k: p for k, p in found.items() if not _hidden(k)}

    def read(self, key: str) -> bytes:
        if self.zip is not None:
            return self.zip.read(self.files[key])
        return Path(self.files[key]).read_bytes()


def _decode_png(data: bytes, where: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if img.size != (RAW_SIZE, RAW_SIZE):
                raise ValueError(
                    f"Omniglot: {where} is {img.size[0]}x{img.size[1]}; every official Omniglot image is "
                    f"{RAW_SIZE}x{RAW_SIZE}. This is not the official release."
                )
            return np.asarray(img.convert("L")) >= 128
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"Omniglot: cannot decode {where} ({err}); the file is corrupt.") from err


def _read_release(path: Path, which: str, complete: bool) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images [C, 20, 105, 105] bool, global numbers [C], alphabet name per character, from one half."""
    try:
        folder = _Folder(path)
    except zipfile.BadZipFile as err:
        raise ValueError(f"Omniglot: {path} is not a valid zip file ({err}); download it again.") from err
    chars: dict[str, dict[int, str]] = {}
    numbers: dict[str, int] = {}
    for key in folder.files:
        parts = key.split("/")
        match = _PNG.match(parts[-1])
        if len(parts) < 3 or not match or not parts[-2].startswith("character"):
            raise ValueError(
                f"Omniglot: unexpected file {path}/{key}; the official layout is Alphabet/characterNN/NNNN_DD.png."
            )
        char_dir = "/".join(parts[-3:-1])
        number, drawing = int(match.group(1)), int(match.group(2))
        if numbers.setdefault(char_dir, number) != number:
            raise ValueError(f"Omniglot: {path}/{char_dir} mixes character numbers {numbers[char_dir]} and {number}.")
        chars.setdefault(char_dir, {})[drawing] = key
    count, first = RELEASE[which]
    if not chars:
        raise ValueError(f"Omniglot: {path} holds no Alphabet/characterNN/NNNN_DD.png images.")
    if complete and len(chars) != count:
        raise ValueError(
            f"Omniglot: {path} has {len(chars)} characters; the official {which} set has {count}. The folder "
            "is partial; unpack the whole images_{which}.zip (or pass complete=False to load a subset)."
        )
    order = sorted(chars, key=lambda c: numbers[c])
    images = np.zeros((len(order), DRAWINGS, RAW_SIZE, RAW_SIZE), dtype=bool)
    for i, char_dir in enumerate(order):
        drawings = chars[char_dir]
        if sorted(drawings) != list(range(1, DRAWINGS + 1)):
            raise ValueError(
                f"Omniglot: {path}/{char_dir} has drawings {sorted(drawings)}; expected 01-{DRAWINGS:02d}. "
                "The folder is partial or damaged."
            )
        if not first <= numbers[char_dir] < first + count:
            raise ValueError(
                f"Omniglot: {path}/{char_dir} is character {numbers[char_dir]}, outside the {which} set "
                f"({first}-{first + count - 1})."
            )
        for d in range(DRAWINGS):
            images[i, d] = _decode_png(folder.read(drawings[d + 1]), f"{path}/{drawings[d + 1]}")
    return images, np.array([numbers[c] for c in order]), [c.split("/")[0] for c in order]


def _sources(root: Path) -> tuple[str, dict[str, Path]]:
    npz = {s: root / f"images_{s}.npz" for s in SETS}
    if all(p.is_file() for p in npz.values()):
        return "npz", npz
    for suffix in ("", ".zip"):
        release = {s: root / f"images_{s}{suffix}" for s in SETS}
        if all(p.exists() for p in release.values()):
            return "release", release
    present = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    raise ValueError(
        f"Omniglot: no Omniglot data in {root} (it holds {present or 'nothing'}). Expected either "
        "images_background.npz + images_evaluation.npz (+ alphabets.json), or the official release "
        "images_background/ + images_evaluation/ (folders or .zip files)."
    )


def _cache_key(kind: str, files: dict[str, Path], size: int, complete: bool, resize: str, cache: Path) -> str:
    """A hash of the sources' bytes (and, for release folders, the images' names, which number the
    characters) and of the preprocessing parameters: the name of the cache entry."""
    h = hashlib.sha256(f"omniglot|{kind}|v{PREPROCESS_VERSION}|{size}|{complete}|{resize}".encode())
    for name in sorted(files):
        path = files[name]
        if path.is_file():
            sources = [path]
        else:
            found = {str(p.relative_to(path)).replace(os.sep, "/"): p for p in path.rglob("*.png")}
            keys = sorted(k for k in found if not _hidden(k))
            h.update("\n".join(keys).encode())
            sources = [found[k] for k in keys]
        h.update(f"|{name}|{files_digest(sources, cache)}".encode())
    table = next(iter(files.values())).parent / "alphabets.json"  # the archives' alphabet names
    if kind == "npz" and table.is_file():
        h.update(f"|alphabets|{files_digest([table], cache)}".encode())
    return h.hexdigest()[:24]


def load_omniglot(
    root: str | os.PathLike,
    size: int = 28,
    cache_dir: str | os.PathLike | None = None,
    complete: bool = True,
    resize: str = "bilinear",
) -> OmniglotData:
    """All of Omniglot from ``root`` (NumPy archives or the official release), preprocessed and cached.

    Args:
        root: folder with ``images_background.npz`` and ``images_evaluation.npz`` (+ ``alphabets.json``), or
            with the official ``images_background`` / ``images_evaluation`` folders or zip files.
        size: side of the resized images (28 in the literature).
        cache_dir: where to keep the preprocessed tensor (default :func:`default_cache_dir`); ``False``-y
            string ``""`` is not allowed, pass ``None`` for the default.
        complete: require the whole release (964 + 659 characters). ``False`` accepts a subset of an
            official-layout folder (still verified character by character).
        resize: the resize filter, ``"bilinear"`` or ``"lanczos"`` (see :func:`preprocess`).

    Returns:
        :class:`OmniglotData` with characters in official order.

    Example:
        >>> data = load_omniglot("../shared/data/omniglot")
        >>> data.split("vinyals-test").images.shape
        torch.Size([423, 20, 28, 28])
    """
    root = Path(root).expanduser()
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"load_omniglot: expected size to be a positive integer, got {size!r}.")
    if resize not in RESIZE_FILTERS:
        raise ValueError(
            f"load_omniglot: unknown resize filter {resize!r}; expected one of {', '.join(RESIZE_FILTERS)}."
        )
    kind, files = _sources(root)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_file = cache / f"omniglot-{_cache_key(kind, files, size, complete, resize, cache)}.pt"
    saved = load_entry(cache_file)
    if isinstance(saved, dict) and {"images", "numbers", "alphabet", "alphabets"} <= set(saved):
        return OmniglotData(saved["images"], saved["numbers"], saved["alphabet"], tuple(saved["alphabets"]))
    raws, numbers, names = [], [], []
    if kind == "npz":
        table = _alphabet_table(root)
        for s in SETS:
            raw, nums = _read_npz(files[s], s)
            raws.append(raw)
            numbers.append(nums)
        all_numbers = np.concatenate(numbers)
        for n in all_numbers:
            names.append(next(a for a, lo, hi in table if lo <= n <= hi))
    else:
        for s in SETS:
            raw, nums, alph = _read_release(files[s], s, complete)
            raws.append(raw)
            numbers.append(nums)
            names += alph
    alphabets = tuple(dict.fromkeys(names))
    data = OmniglotData(
        preprocess(torch.from_numpy(np.concatenate(raws)), size, resize),
        torch.from_numpy(np.concatenate(numbers)).long(),
        torch.tensor([alphabets.index(n) for n in names], dtype=torch.long),
        alphabets,
    )
    store_entry(
        cache_file,
        {"images": data.images, "numbers": data.numbers, "alphabet": data.alphabet, "alphabets": list(alphabets)},
    )
    return data


def _members(name: str) -> set[int]:
    """The character numbers of a named split."""
    if (ordered := _ordered_split(name)) is not None:
        order, start, stop = ordered
        return set(order[start:stop].tolist())
    lo, hi = SPLITS[name]
    return set(range(lo, hi + 1))


_MEMORY: dict[tuple, OmniglotData] = {}
DEFAULT_ROOT = "../shared/data/omniglot"


def _resolve_root(root: str | os.PathLike | None) -> Path:
    """``root``, else ``$ALLMAP_OMNIGLOT``, else ``../shared/data/omniglot``; a relative path that does not
    exist from the working directory is also tried from the folder holding the ``allmap`` package."""
    path = Path(root if root is not None else os.environ.get("ALLMAP_OMNIGLOT", DEFAULT_ROOT)).expanduser()
    if not path.is_absolute() and not path.exists():
        alt = Path(__file__).resolve().parents[2] / path
        if alt.exists():
            return alt
    return path


def omniglot_data(
    root: str | os.PathLike | None = None,
    size: int = 28,
    cache_dir: str | os.PathLike | None = None,
    resize: str = "bilinear",
) -> OmniglotData:
    """:func:`load_omniglot` of ``root`` (default ``$ALLMAP_OMNIGLOT`` or ``../shared/data/omniglot``), kept in
    memory per process, so every family reading the same data shares one copy."""
    path = _resolve_root(root)
    key = (str(path.resolve()), size, str(cache_dir), resize)
    if key not in _MEMORY:
        _MEMORY[key] = load_omniglot(path, size=size, cache_dir=cache_dir, resize=resize)
    return _MEMORY[key]


class Omniglot(Episodes):
    """N-way K-shot episodes over an Omniglot split: the task family the presets use.

    Args:
        root: the data folder (see :func:`load_omniglot`); default ``$ALLMAP_OMNIGLOT`` or
            ``../shared/data/omniglot``.
        split: a phase, ``train``, ``val`` or ``test``, resolved through ``protocol``; or a split name of
            :data:`SPLITS` (``vinyals-trainval``, ``evaluation``, ...).
        protocol: one of :data:`PROTOCOLS`: ``standard`` (Vinyals split, train on 1,200 characters),
            ``standard-holdout``, ``shuffled`` (MAML's random split of the characters), ``shuffled-holdout``,
            ``reptile`` (Reptile's random split), ``lake`` (background / evaluation alphabets) or ``lake-holdout``.
        ways, shots, queries: N, K and Q of each episode.
        rotations: angles whose rotated copies are new classes; ``(0, 90, 180, 270)`` in the standard
            protocol (Santoro et al. 2016; Vinyals et al. 2016), ``(0,)`` in Lake et al.'s.
        within_alphabet: all N classes of an episode from one alphabet (Lake et al. 2015).
        size: image side after resizing (28).
        resize: resize filter, ``"bilinear"`` (antialiased) or ``"lanczos"`` (Pillow's; see :func:`preprocess`).
        cache_dir: where the preprocessed tensor is cached (see :func:`load_omniglot`).
        shift: random translation of up to ``shift`` pixels per image (augmentation; see
            :class:`~allmap.tasks.Episodes`); run configs apply it to training episodes only.
        rotate, scale: random rotation of up to ``rotate`` degrees and zoom of up to ``scale`` (augmentation;
            see :class:`~allmap.tasks.Episodes`); training episodes only.
        shuffle_support: support sets in a random order, not class by class (see :class:`~allmap.tasks.Episodes`).

    Loaded data are also kept in memory per process, so a training and a test family share them.
    ``overlaps_training`` is True for the validation phase of a protocol whose validation characters are
    part of its training side (``standard``, ``lake``, ``shuffled``, ``reptile``).

    Example:
        >>> family = Omniglot("../shared/data/omniglot", split="test", ways=5, shots=1, queries=15)
        >>> family.sample(2, torch.Generator().manual_seed(0)).support_x.shape
        torch.Size([2, 5, 1, 28, 28])
    """

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        split: str = "train",
        protocol: str = "standard",
        ways: int = 5,
        shots: int = 1,
        queries: int = 15,
        rotations: tuple[int, ...] | list[int] = (0, 90, 180, 270),
        within_alphabet: bool = False,
        size: int = 28,
        cache_dir: str | os.PathLike | None = None,
        resize: str = "bilinear",
        shift: int = 0,
        rotate: float = 0.0,
        scale: float = 0.0,
        shuffle_support: bool = False,
    ) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"Omniglot: unknown protocol {protocol!r}; expected one of {', '.join(PROTOCOLS)}.")
        name = PROTOCOLS[protocol].get(split, split)
        if name not in ALL_SPLITS:
            raise ValueError(
                f"Omniglot: unknown split {split!r}; expected a phase (train, val, test) or one of "
                f"{', '.join(ALL_SPLITS)}."
            )
        data = omniglot_data(root, size, cache_dir, resize).split(name)
        self.split, self.protocol = name, protocol
        # standard, lake, shuffled and reptile validate on characters of their training side, by design: that tracks
        # fitting, and a run may start with it (any other overlap with the training classes is refused)
        self.overlaps_training = split == "val" and _members(name) <= _members(PROTOCOLS[protocol]["train"])
        super().__init__(
            data.classes(),
            ways,
            shots,
            queries,
            rotations,
            within_group=within_alphabet,
            shift=shift,
            rotate=rotate,
            scale=scale,
            shuffle_support=shuffle_support,
        )

    def describe(self) -> str:
        """The protocol in words, written next to every reported number."""
        rot = "rotations " + "/".join(map(str, self.rotations)) if len(self.rotations) > 1 else "no rotations"
        within = ", within-alphabet" if self.within_group else ""
        return f"{self.protocol} protocol, split {self.split} ({self.data.classes} characters), {rot}{within}"

    def __repr__(self) -> str:
        return f"Omniglot(split={self.split!r}, " + super().__repr__()[len("Episodes(") :]
