"""Character-level text data: loading (or downloading Tiny Shakespeare),
the vocabulary, the 90/10 train/valid split and the batch streams.

Batches are ``(inputs, targets)`` of token ids ``[seq_len, batch]`` (sequence
first, like every fastformers module), targets shifted one character ahead.
"""
from __future__ import annotations

import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINY_SHAKESPEARE_FILE = "tinyshakespeare.txt"
TRAIN_FRACTION = 0.9


class DataError(RuntimeError):
    """The training text cannot be read, downloaded or used; the message says why and what to do."""


def cache_dir() -> Path:
    """``$FASTFORMERS_CACHE``, else ``~/.cache/fastformers``."""
    configured = os.environ.get("FASTFORMERS_CACHE", "").strip()
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "fastformers"


def download_tiny_shakespeare(url: Optional[str] = None, directory: Optional[Path] = None,
                              timeout: float = 30.0) -> Path:
    """Path of the cached Tiny Shakespeare text, downloading it from ``url``
    (default ``TINY_SHAKESPEARE_URL``) into ``directory`` (default :func:`cache_dir`) on first use.

    The download goes to a temporary file renamed into place, so an
    interrupted download never leaves a partial text behind.
    """
    url = url or TINY_SHAKESPEARE_URL
    directory = Path(directory) if directory is not None else cache_dir()
    path = directory / TINY_SHAKESPEARE_FILE
    if path.is_file():
        return path
    manual = (
        f"Download it yourself, e.g. `curl -L {url} -o {path}`, or train on any UTF-8 "
        f"text file with --data PATH."
    )
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(f"cannot create the data cache directory {directory} ({error}). "
                        f"Set FASTFORMERS_CACHE to a writable directory. {manual}") from error
    partial = directory / f".{TINY_SHAKESPEARE_FILE}.{os.getpid()}.part"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(partial, "wb") as out:
            while chunk := response.read(1 << 16):
                out.write(chunk)
        os.replace(partial, path)
    except (urllib.error.URLError, OSError, ValueError) as error:
        partial.unlink(missing_ok=True)
        raise DataError(f"could not download Tiny Shakespeare from {url} ({error}); are you offline? {manual}") from error
    return path


def check_text_file(path: os.PathLike | str) -> Path:
    """:class:`DataError` if ``path`` is missing, not a regular file or empty, without reading it
    (the command line checks ``--data`` so before it creates anything)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"--data {path}: no such file")
    if not path.is_file():
        raise DataError(f"--data {path}: not a regular file")
    if path.stat().st_size == 0:
        raise DataError(f"--data {path}: the file is empty")
    return path


def read_text(path: os.PathLike | str) -> str:
    """The whole UTF-8 file at ``path``; :class:`DataError` if missing, unreadable, not UTF-8 or empty."""
    path = check_text_file(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"--data {path}: not UTF-8 text ({error})") from error
    except OSError as error:
        raise DataError(f"--data {path}: cannot read it ({error})") from error
    if not text:
        raise DataError(f"--data {path}: the file is empty")
    return text


class CharVocab:
    """Sorted distinct characters of a text; id ``i`` is ``chars[i]``."""

    def __init__(self, chars: list[str]):
        self.chars = list(chars)
        self.index = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str) -> "CharVocab":
        return cls(sorted(set(text)))

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        """``text`` -> ids ``[len(text)]`` (int64); ValueError naming characters outside the vocabulary."""
        unknown = sorted(set(text) - self.index.keys())
        if unknown:
            raise ValueError(f"characters not in the model's vocabulary: {unknown!r}")
        return torch.tensor([self.index[c] for c in text], dtype=torch.long)

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)


@dataclass
class Corpus:
    """Vocabulary and the id streams of the first 90% (train) and last 10% (valid) of a text."""

    vocab: CharVocab
    train: torch.Tensor
    valid: torch.Tensor

    @classmethod
    def from_text(cls, text: str, source: str = "text") -> "Corpus":
        split = int(len(text) * TRAIN_FRACTION)
        if split < 2 or len(text) - split < 2:
            raise DataError(f"{source} has {len(text)} characters: too short for a 90/10 train/valid split")
        vocab = CharVocab.from_text(text)
        ids = vocab.encode(text)
        return cls(vocab, ids[:split], ids[split:])


def load_corpus(path: Optional[os.PathLike | str] = None) -> Corpus:
    """The corpus of the text at ``path``, or of Tiny Shakespeare (downloaded once) when None."""
    if path is None:
        path = download_tiny_shakespeare()
    return Corpus.from_text(read_text(path), source=f"--data {path}")


class SequentialBatches:
    """The stream cut into ``batch`` contiguous columns, read ``seq_len`` rows at a time.

    Column ``b`` of consecutive batches continues the same passage of text, so
    a model carrying memory across batches (Transformer-XL, Compressive) sees
    the text in order. After the last full batch the stream restarts from the
    top (a new epoch). The position is ``state_dict()``.
    """

    def __init__(self, ids: torch.Tensor, batch_size: int, seq_len: int):
        columns = ids.shape[0] // batch_size
        if columns < seq_len + 1:
            raise DataError(f"{ids.shape[0]} characters are too few for batch size {batch_size} "
                            f"and sequence length {seq_len}: need at least {(seq_len + 1) * batch_size}")
        self.data = ids[: columns * batch_size].view(batch_size, columns).t().contiguous()
        self.seq_len = seq_len
        self.position = 0
        self.epoch = 0

    def __len__(self) -> int:
        """Batches per epoch."""
        return (self.data.shape[0] - 1) // self.seq_len

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.position + self.seq_len + 1 > self.data.shape[0]:
            self.position = 0
            self.epoch += 1
        start = self.position
        self.position += self.seq_len
        return self.data[start: start + self.seq_len], self.data[start + 1: start + self.seq_len + 1]

    def __iter__(self):
        return self

    def state_dict(self) -> dict:
        return {"position": self.position, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.position, self.epoch = int(state["position"]), int(state["epoch"])


class ShuffledBatches:
    """Random windows of ``seq_len`` characters, ``batch`` at a time, no memory between them.

    As labml's shuffled loader: the stream is cut into windows, each epoch
    visits them in a random order, each shifted by a random offset smaller
    than ``seq_len``. The order and offsets of epoch ``e`` come from a
    generator seeded with ``(seed, e)``, so the position ``(epoch, index)`` is
    the whole state and resuming is exact.
    """

    def __init__(self, ids: torch.Tensor, batch_size: int, seq_len: int, seed: int = 0):
        self.windows = (ids.shape[0] - 1) // seq_len
        if self.windows < batch_size:
            raise DataError(f"{ids.shape[0]} characters are too few for batch size {batch_size} "
                            f"and sequence length {seq_len}: need at least {seq_len * batch_size + 1}")
        self.ids = ids
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.epoch = 0
        self.index = 0
        self._plan_epoch()

    def _plan_epoch(self) -> None:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        self.order = torch.randperm(self.windows, generator=generator)
        starts = self.order * self.seq_len
        room = (self.ids.shape[0] - (starts + self.seq_len + 1)).clamp(max=self.seq_len - 1)
        self.starts = starts + (torch.rand(self.windows, generator=generator) * (room + 1)).long()

    def __len__(self) -> int:
        return self.windows // self.batch_size

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.index + self.batch_size > self.windows:
            self.epoch += 1
            self.index = 0
            self._plan_epoch()
        starts = self.starts[self.index: self.index + self.batch_size]
        self.index += self.batch_size
        offsets = torch.arange(self.seq_len + 1)
        windows = self.ids[starts[None, :] + offsets[:, None]]
        return windows[:-1], windows[1:]

    def __iter__(self):
        return self

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._plan_epoch()


class RankSlice:
    """Rank ``rank``'s share of a batch stream for data-parallel training: ``batches`` yields
    ``[T, W·B]`` batches (the same on every rank), this yields columns ``rank·B .. rank·B + B - 1``.
    Every rank sees different text, and the stream's position (``state_dict``) is the same on
    all ranks, so one saved position resumes them all."""

    def __init__(self, batches, rank: int, batch_size: int):
        self.batches = batches
        self.columns = slice(rank * batch_size, (rank + 1) * batch_size)

    @property
    def epoch(self) -> int:
        return self.batches.epoch

    def __len__(self) -> int:
        return len(self.batches)

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = next(self.batches)
        return inputs[:, self.columns], targets[:, self.columns]

    def __iter__(self):
        return self

    def state_dict(self) -> dict:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batches.load_state_dict(state)
