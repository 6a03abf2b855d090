"""Data for recipes: an image folder, a CSV/JSONL table of texts with a local tokenizer, and a built-in
dataset (images or texts, generated from the seed, nothing downloaded) so every recipe runs offline.

Each component returns a :class:`DataBundle`: train and validation datasets of dicts
(``{"pixel_values", "labels"}`` or ``{"input_ids", "attention_mask", "labels"}``) and the class count.
Datasets decode or generate one sample at a time, so building one costs almost nothing.
"""

from __future__ import annotations

import csv
import json
import math
import pathlib
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from ..errors import NormSwapError
from .components import register_component

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class DataError(NormSwapError):
    """Raised when a recipe's data cannot be read: missing path, no classes, wrong column names."""


@dataclass
class DataBundle:
    """Train and validation datasets, the number of classes, and the task (``image`` or ``text``)."""

    train: Dataset
    val: Dataset
    num_classes: int
    task: str


def model_inputs(batch: dict[str, torch.Tensor]) -> torch.Tensor | dict[str, torch.Tensor]:
    """What a model takes from a batch: the token ids and mask of a text batch, the pixels of an image one."""
    if "input_ids" in batch:
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    return batch["pixel_values"]


class Unlabeled:
    """The inputs of ``dataset``'s samples in shuffled batches, as a model takes them (the pixels of an image
    batch, the token ids and mask of a text batch), labels left out: what ``normswap.calibrate`` reads.
    Iterating again gives the same order (``seed``).

    Example:
        >>> batches = Unlabeled(builtin("image", seed=0, train_size=10, val_size=2).train, batch_size=4)
        >>> [tuple(b.shape) for b in batches]
        [(4, 3, 32, 32), (4, 3, 32, 32), (2, 3, 32, 32)]
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int = 0) -> None:
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed

    def __iter__(self):
        order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed)).tolist()
        for i in range(0, len(order), self.batch_size):
            items = [self.dataset[j] for j in order[i:i + self.batch_size]]
            yield model_inputs({k: torch.stack([item[k] for item in items]) for k in items[0] if k != "labels"})


# ---------------------------------------------------------------------------------------------- built-in


class BuiltinImages(Dataset):
    """Ten classes of procedurally drawn patterns (disc, square, ring, cross, stripes, checkers...) with
    random colour, position, size and noise; sample ``i`` is drawn from ``(seed, i)``, so it is the same
    on every machine and rank."""

    PATTERNS = 10

    def __init__(self, size: int, image_size: int, seed: int, offset: int = 0, num_classes: int = 10) -> None:
        if not 2 <= num_classes <= self.PATTERNS:
            raise DataError(f"data.num_classes: the built-in images have 2 to {self.PATTERNS} classes, got {num_classes}")
        self.size, self.image_size, self.seed, self.offset, self.num_classes = size, image_size, seed, offset, num_classes
        r = torch.linspace(-1, 1, image_size)
        self.yy, self.xx = torch.meshgrid(r, r, indexing="ij")

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.offset + i)
        label = int(torch.randint(self.num_classes, (1,), generator=g))
        u = torch.rand(8, generator=g)
        cx, cy, s = (u[0] - 0.5) * 0.8, (u[1] - 0.5) * 0.8, 0.35 + 0.35 * u[2]
        x, y = (self.xx - cx) / s, (self.yy - cy) / s
        freq = 3 + 3 * u[3]
        masks = [
            x * x + y * y < 1,                                        # disc
            (x.abs() < 0.8) & (y.abs() < 0.8),                        # square
            ((x * x + y * y) < 1) & ((x * x + y * y) > 0.45),         # ring
            ((x.abs() < 0.25) | (y.abs() < 0.25)) & (x.abs() < 1) & (y.abs() < 1),  # cross
            torch.sin(freq * math.pi * self.yy) > 0,                  # horizontal stripes
            torch.sin(freq * math.pi * self.xx) > 0,                  # vertical stripes
            (torch.sin(freq * math.pi * self.xx) * torch.sin(freq * math.pi * self.yy)) > 0,  # checkers
            (y > -0.8) & (y < 0.8) & (x.abs() < (0.8 - y) / 1.6),     # triangle
            torch.sin(freq * math.pi * (self.xx + self.yy) / 1.4) > 0,  # diagonal stripes
            (x.abs() + y.abs()) < 1,                                  # diamond
        ]
        fg = torch.rand(3, generator=g)
        bg = (fg + 0.35 + 0.3 * torch.rand(3, generator=g)) % 1.0  # every channel contrasts by 0.35 or more
        m = masks[label].float()
        img = fg[:, None, None] * m + bg[:, None, None] * (1 - m)
        img = img + 0.1 * torch.randn(img.shape, generator=g)
        mean, std = torch.tensor(MEAN)[:, None, None], torch.tensor(STD)[:, None, None]
        return {"pixel_values": (img - mean) / std, "labels": torch.tensor(label)}


WORDS = {
    "sport": "match goal team player coach score league season win referee stadium ball".split(),
    "weather": "rain sun cloud storm wind snow forecast cold warm humid thunder fog".split(),
    "food": "bread cheese soup recipe bake spice sauce dinner fruit kitchen salad taste".split(),
    "tech": "code chip laptop server network software robot data screen battery gpu app".split(),
}
FILLER = "the a of and to in is it that was for on with as at by this from".split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]


def builtin_vocab() -> list[str]:
    """The word list of the built-in texts, special tokens first (``[PAD]`` is id 0)."""
    return SPECIAL + FILLER + [w for words in WORDS.values() for w in words]


class BuiltinTexts(Dataset):
    """Four topics; each text mixes filler words with three to five words of its topic and one of another,
    tokenized word by word with :func:`builtin_vocab` and framed by ``[CLS]`` / ``[SEP]``."""

    def __init__(self, size: int, max_length: int, seed: int, offset: int = 0) -> None:
        self.size, self.max_length, self.seed, self.offset = size, max_length, seed, offset
        self.ids = {w: i for i, w in enumerate(builtin_vocab())}
        self.topics = list(WORDS)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.offset + i)
        label = int(torch.randint(len(self.topics), (1,), generator=g))
        other = (label + 1 + int(torch.randint(len(self.topics) - 1, (1,), generator=g))) % len(self.topics)

        def pick(words: list[str], n: int) -> list[str]:
            return [words[int(j)] for j in torch.randint(len(words), (n,), generator=g)]

        words = pick(FILLER, 6 + int(torch.randint(6, (1,), generator=g)))
        words += pick(WORDS[self.topics[label]], 3 + int(torch.randint(3, (1,), generator=g)))
        words += pick(WORDS[self.topics[other]], 1)
        words = [words[int(j)] for j in torch.randperm(len(words), generator=g)]
        ids = [self.ids["[CLS]"]] + [self.ids[w] for w in words][: self.max_length - 2] + [self.ids["[SEP]"]]
        return _pad(ids, self.max_length, label)


def _pad(ids: list[int], max_length: int, label: int) -> dict[str, torch.Tensor]:
    n = len(ids)
    input_ids = torch.zeros(max_length, dtype=torch.long)
    input_ids[:n] = torch.tensor(ids)
    mask = torch.zeros(max_length, dtype=torch.long)
    mask[:n] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": torch.tensor(label)}


@register_component("data", "builtin")
def builtin(task: str, seed: int, model_config: Any = None, train_size: int = 2048, val_size: int = 512,
            image_size: int = 32, max_length: int = 24, num_classes: int = 10) -> DataBundle:
    """The built-in demo data for the recipe's task: :class:`BuiltinImages` or :class:`BuiltinTexts`.

    Example:
        >>> bundle = builtin("image", seed=0, train_size=8, val_size=4)
        >>> bundle.train[0]["pixel_values"].shape, bundle.num_classes
        (torch.Size([3, 32, 32]), 10)
    """
    if task == "image":
        return DataBundle(BuiltinImages(train_size, image_size, seed, 0, num_classes),
                          BuiltinImages(val_size, image_size, seed, train_size, num_classes), num_classes, "image")
    vocab = len(builtin_vocab())
    model_vocab = getattr(model_config, "vocab_size", vocab)
    if model_vocab < vocab:
        raise DataError(f"the built-in texts use {vocab} token ids; the model's vocab_size is {model_vocab}")
    return DataBundle(BuiltinTexts(train_size, max_length, seed), BuiltinTexts(val_size, max_length, seed, train_size),
                      len(WORDS), "text")


# ------------------------------------------------------------------------------------------- image folder


class ImageFiles(Dataset):
    """Image files with labels: resized (shorter side) and centre-cropped to ``image_size``, normalized."""

    def __init__(self, items: list[tuple[pathlib.Path, int]], image_size: int) -> None:
        self.items, self.image_size = items, image_size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        from PIL import Image

        path, label = self.items[i]
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                w, h = im.size
                scale = self.image_size / min(w, h)
                im = im.resize((max(self.image_size, round(w * scale)), max(self.image_size, round(h * scale))))
                w, h = im.size
                left, top = (w - self.image_size) // 2, (h - self.image_size) // 2
                im = im.crop((left, top, left + self.image_size, top + self.image_size))
                data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
        except OSError as exc:
            raise DataError(f"{path}: not a readable image ({exc})") from None
        img = data.view(self.image_size, self.image_size, 3).permute(2, 0, 1).float() / 255
        mean, std = torch.tensor(MEAN)[:, None, None], torch.tensor(STD)[:, None, None]
        return {"pixel_values": (img - mean) / std, "labels": torch.tensor(label)}


def _class_folders(root: pathlib.Path) -> tuple[list[str], list[tuple[pathlib.Path, int]]]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    items = [(f, c) for c, name in enumerate(classes) for f in sorted((root / name).rglob("*"))
             if f.suffix.lower() in IMAGE_SUFFIXES]
    return classes, items


@register_component("data", "image_folder")
def image_folder(path: str, task: str, seed: int, model_config: Any = None, image_size: int = 224,
                 val_fraction: float = 0.1) -> DataBundle:
    """Images in one folder per class (``path/<class>/*.jpg``), or ``path/train`` and ``path/val`` each so.

    Example:
        >>> bundle = image_folder("data/flowers", task="image", seed=0, image_size=64)  # doctest: +SKIP
    """
    root = pathlib.Path(path)
    if not root.is_dir():
        raise DataError(f"data.path: {root} is not a folder (expected one subfolder of images per class)")
    if (root / "train").is_dir() and (root / "val").is_dir():
        classes, train = _class_folders(root / "train")
        val_classes, val = _class_folders(root / "val")
        if val_classes != classes:
            raise DataError(f"data.path: {root}/train and {root}/val have different class folders")
    else:
        classes, items = _class_folders(root)
        order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
        n_val = max(1, int(len(items) * val_fraction)) if len(items) > 1 else 0
        val, train = [items[i] for i in order[:n_val]], [items[i] for i in order[n_val:]]
    if len(classes) < 2 or not train:
        raise DataError(f"data.path: {root} holds {len(classes)} class folder(s) and {len(train)} training images "
                        f"({', '.join(IMAGE_SUFFIXES)}); it needs at least two classes")
    return DataBundle(ImageFiles(train, image_size), ImageFiles(val, image_size), len(classes), "image")


# -------------------------------------------------------------------------------------------- text table


def read_table(path: pathlib.Path) -> list[dict[str, Any]]:
    """The rows of a ``.csv`` (with a header) or ``.jsonl`` file."""
    if path.suffix.lower() == ".jsonl":
        rows = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{n}: not JSON ({exc})") from None
        return rows
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class EncodedTexts(Dataset):
    """Texts tokenized once, padded to ``max_length``."""

    def __init__(self, encoded: list[list[int]], labels: list[int], max_length: int) -> None:
        self.encoded, self.labels, self.max_length = encoded, labels, max_length

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return _pad(self.encoded[i][: self.max_length], self.max_length, self.labels[i])


@register_component("data", "text_table")
def text_table(path: str, tokenizer: str, task: str, seed: int, model_config: Any = None,
               text_column: str = "text", label_column: str = "label", max_length: int = 128,
               val_path: str | None = None, val_fraction: float = 0.1) -> DataBundle:
    """Texts and labels from a CSV (header row) or JSONL file, tokenized with a local tokenizer folder.

    Example:
        >>> bundle = text_table("reviews.csv", tokenizer="./bert-base/", task="text", seed=0)  # doctest: +SKIP
    """
    file = pathlib.Path(path)
    if not file.is_file():
        raise DataError(f"data.path: {file} does not exist (expected a .csv or .jsonl file)")
    rows = read_table(file)
    if not rows:
        raise DataError(f"data.path: {file} holds no rows")
    columns = list(rows[0])
    missing = [c for c in (text_column, label_column) if c not in columns]
    if missing:
        raise DataError(f"data.path: {file} has no column {', '.join(map(repr, missing))}; its columns are "
                        f"{columns} (set data.text_column / data.label_column)")
    tok_dir = pathlib.Path(tokenizer)
    if not tok_dir.is_dir():
        raise DataError(f"data.tokenizer: {tok_dir} is not a folder holding a tokenizer (tokenizer.json or vocab.txt)")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True, trust_remote_code=False)
    val_rows = read_table(pathlib.Path(val_path)) if val_path else None
    if val_rows is None:
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
        n_val = max(1, int(len(rows) * val_fraction)) if len(rows) > 1 else 0
        val_rows, rows = [rows[i] for i in order[:n_val]], [rows[i] for i in order[n_val:]]
    names = sorted({str(r[label_column]) for r in rows + val_rows})
    as_int = all(n.lstrip("-").isdigit() for n in names)
    index = {n: (int(n) if as_int else i) for i, n in enumerate(names)}
    num_classes = (max(index.values()) + 1) if as_int else len(names)

    def encode(part: list[dict[str, Any]]) -> EncodedTexts:
        ids = tok([str(r[text_column]) for r in part], truncation=True, max_length=max_length)["input_ids"]
        return EncodedTexts(ids, [index[str(r[label_column])] for r in part], max_length)

    return DataBundle(encode(rows), encode(val_rows), num_classes, "text")
