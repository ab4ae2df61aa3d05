"""The data: the Python standard library's own source text, bytes as tokens (vocab 256).

Every machine with Python has it, so nothing is downloaded. The ``*.py`` files under
``sysconfig.get_paths()["stdlib"]`` (``site-packages`` left out) are split into train and validation
BY FILE, deterministically: a file is in validation when the SHA-256 of its path relative to the
stdlib folder, read as a number, is divisible by ``VAL_EVERY``. Within each split the files are
concatenated in sorted path order, separated by a NUL byte. The two byte arrays are written once to
the cache folder (``train.bin``, ``val.bin``, ``meta.json``) and read from there afterwards.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

VAL_EVERY = 20  # about 1 file in 20 goes to validation
FORMAT = 2  # bump when the layout of the cached files changes


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "residual_rewriter"


def stdlib_files(root: Path) -> list[Path]:
    skip = {"site-packages", "dist-packages", "__pycache__"}
    return sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts) and p.is_file())


def is_val(relpath: str) -> bool:
    return int(hashlib.sha256(relpath.encode()).hexdigest(), 16) % VAL_EVERY == 0


@dataclass
class Corpus:
    train: torch.Tensor  # uint8 [N]
    val: torch.Tensor  # uint8 [M]
    meta: dict


def load(cache_dir: Path | None = None, log=print) -> Corpus:
    root = Path(sysconfig.get_paths()["stdlib"])
    key = hashlib.sha256(f"{FORMAT}|{root}|{sys.version}".encode()).hexdigest()[:12]
    folder = Path(cache_dir or default_cache_dir()) / f"stdlib-text-py{sys.version_info[0]}{sys.version_info[1]}-{key}"
    meta_path = folder / "meta.json"
    if not meta_path.exists():
        log(f"reading the standard library's source under {root} (first run; cached in {folder})")
        parts: dict[str, list[bytes]] = {"train": [], "val": []}
        files = {"train": 0, "val": 0}
        val_files = []
        for path in stdlib_files(root):
            rel = path.relative_to(root).as_posix()
            split = "val" if is_val(rel) else "train"
            parts[split].append(path.read_bytes().replace(b"\0", b""))
            files[split] += 1
            if split == "val":
                val_files.append(rel)
        folder.mkdir(parents=True, exist_ok=True)
        for split in ("train", "val"):
            tmp = folder / f"{split}.bin.tmp"
            tmp.write_bytes(b"\0".join(parts[split]))
            tmp.replace(folder / f"{split}.bin")
        meta = {"stdlib": str(root), "python": sys.version.split()[0], "val_every": VAL_EVERY,
                "files": files, "val_files": val_files, "bytes": {s: (folder / f"{s}.bin").stat().st_size for s in ("train", "val")}}
        tmp = folder / "meta.json.tmp"
        tmp.write_text(json.dumps(meta, indent=1))
        tmp.replace(meta_path)
    meta = json.loads(meta_path.read_text())
    meta["cache"] = str(folder)
    arrays = {s: torch.from_numpy(np.fromfile(folder / f"{s}.bin", dtype=np.uint8)) for s in ("train", "val")}
    return Corpus(arrays["train"], arrays["val"], meta)


def batch(data: torch.Tensor, starts: torch.Tensor, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows of seq+1 bytes at ``starts`` -> (inputs, next-byte targets), int64 [B, seq]."""
    idx = starts[:, None] + torch.arange(seq + 1)
    w = data[idx].long()
    return w[:, :-1], w[:, 1:]


class TrainBatches:
    """Random windows of the training text, from a generator seeded by ``seed``: the same seed gives
    the same batches in the same order, whatever model consumes them."""

    def __init__(self, data: torch.Tensor, batch_size: int, seq: int, seed: int):
        self.data, self.batch_size, self.seq = data, batch_size, seq
        self.g = torch.Generator().manual_seed(10_000 + seed)

    def next(self):
        starts = torch.randint(0, self.data.numel() - self.seq - 1, (self.batch_size,), generator=self.g)
        return batch(self.data, starts, self.seq)

    def state(self):
        return self.g.get_state()

    def set_state(self, state):
        self.g.set_state(state)


def val_batches(data: torch.Tensor, num_batches: int, batch_size: int, seq: int) -> list:
    """Fixed, evenly spaced validation windows (the same for every run)."""
    n = num_batches * batch_size
    starts = torch.linspace(0, data.numel() - seq - 2, n).long()
    return [batch(data, starts[i * batch_size : (i + 1) * batch_size], seq) for i in range(num_batches)]
