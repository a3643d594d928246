"""Atomic, safely loadable checkpoints and the training loop's deterministic seeding.

A checkpoint is written to a temporary file in the same directory, flushed to disk and renamed
over the previous one, so a run killed at any moment leaves the last good checkpoint intact
(:func:`~mop_torchrl.io.atomic_write`; a temporary file orphaned by such a kill is removed
by :func:`remove_orphan_temps`).
Checkpoints are read with ``torch.load(..., weights_only=True)``: loading an untrusted file can
not run code. They hold no RNG state: the training loop re-seeds the global generators from
``(seed, update, stream)`` before every collection and every optimizer step
(:func:`seed_everything`), so randomness never depends on the process's history and a run
resumed in a fresh process draws exactly what an uninterrupted run draws.

Replay-buffer dumps a checkpoint names are verified against it: :func:`dump_digests` records
the size and sha256 of every file of a dump in the checkpoint that names it, and
:func:`verify_dump` refuses a dump whose files differ (truncated, edited, extra or missing)
before anything reads them.
"""

from __future__ import annotations

import hashlib
import io
import random
import re
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mop_torchrl.io import atomic_write, remove_orphan_temps

__all__ = [
    "CheckpointError",
    "dump_digests",
    "load_checkpoint",
    "remove_orphan_temps",
    "save_checkpoint",
    "seed_everything",
    "verify_dump",
]

FORMAT = "mop_torchrl.checkpoint/1"
REQUIRED = ("format", "config", "model", "optimizer", "update")

# Checkpoints written before RNG states were dropped hold numpy's MT19937 state (an ndarray);
# these are the (data-only) constructors needed to read them under ``weights_only=True``.
_LEGACY_SAFE_GLOBALS = [
    np._core.multiarray._reconstruct,
    np.ndarray,
    np.dtype,
    type(np.dtype(np.uint32)),
]


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt, or does not fit the run asking for it."""


def seed_everything(seed: int, update: int, stream: str) -> None:
    """Seeds torch's, numpy's and python's global generators from ``(seed, update, stream)``.

    ``stream`` names what the randomness is for (``"collect"``, ``"train"`` ...), so two
    purposes at the same update draw independent numbers.

    Examples:
        >>> seed_everything(0, 5, "train"); a = torch.rand(2)
        >>> seed_everything(0, 5, "train"); bool((torch.rand(2) == a).all())
        True
        >>> seed_everything(0, 5, "collect"); bool((torch.rand(2) == a).all())
        False
    """
    entropy = [seed % 2**32, seed // 2**32, update, zlib.crc32(stream.encode())]
    state = np.random.SeedSequence([abs(v) for v in entropy]).generate_state(2, np.uint32)
    value = int(state[0]) | (int(state[1]) << 32)
    torch.manual_seed(value)
    np.random.seed(int(state[0]))
    random.seed(value)


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Writes ``payload`` (plus the format tag) atomically to ``path``
    (:func:`~mop_torchrl.io.atomic_write`: a kill leaves the previous checkpoint).

    It is serialised in memory first, so a failed write (a full disk) raises the ``OSError``
    itself (``ENOSPC``), not torch's ``RuntimeError("... file write failed")``.
    """
    data = io.BytesIO()
    torch.save({"format": FORMAT, **payload}, data)
    return atomic_write(path, lambda f: f.write(data.getbuffer()))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Reads a checkpoint written by :func:`save_checkpoint`, with clear errors.

    ``path`` is the file or its run directory. Only tensors and plain Python data are
    unpickled (``weights_only=True``).
    """
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {str(path)!r}")
    try:
        with torch.serialization.safe_globals(_LEGACY_SAFE_GLOBALS), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's pickle-protocol note on foreign files
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for truncated/garbage/unsafe files
        reason = _load_failure(err)
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupt, unreadable or not data-only: {reason}"
        ) from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a mop_torchrl checkpoint ({FORMAT})")
    missing = [key for key in REQUIRED if key not in payload]
    if missing:
        raise CheckpointError(f"checkpoint {str(path)!r} lacks {missing}")
    return payload


def _load_failure(err: Exception) -> str:
    """The first line of ``torch.load``'s error, without its advice to retry with
    ``weights_only=False`` (which would run the file's code: never the thing to do here)."""
    text = str(err).strip()
    if "Weights only load failed" in text:
        match = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
        detail = match.group(1).split(". ")[0].rstrip(".") if match else "unsupported content"
        return f"it holds more than tensors and plain data ({detail})"
    return text.splitlines()[0] if text else type(err).__name__


# ------------------------------------------------------------------- replay-buffer dumps
def dump_digests(path: str | Path) -> dict[str, list[int | str]]:
    """``{relative path: [size, sha256]}`` of every file under the dump directory ``path``.

    Stored in the checkpoint that names the dump (:func:`verify_dump` checks it on resume).

    Examples:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     _ = (Path(tmp) / "a.json").write_text("{}")
        ...     dump_digests(tmp)["a.json"][0]
        2
    """
    root = Path(path)
    return {
        file.relative_to(root).as_posix(): [file.stat().st_size, _sha256(file)]
        for file in sorted(root.rglob("*"))
        if file.is_file() and not file.is_symlink()
    }


def verify_dump(path: str | Path, expected: dict[str, Any], checkpoint: str | Path) -> None:
    """Raises :class:`CheckpointError` (naming the file) unless the dump directory ``path``
    holds exactly the files ``expected`` (:func:`dump_digests` when ``checkpoint`` was
    written), with the same sizes and sha256. Reads only: nothing on disk is changed."""
    root, where = Path(path), f"checkpoint {str(checkpoint)!r}"
    if not root.is_dir() or root.is_symlink():
        raise CheckpointError(f"{where} names the buffer dump {str(root)!r}, which is missing")
    found = sorted(p for p in root.rglob("*") if not p.is_dir() or p.is_symlink())
    for file in found:
        name = file.relative_to(root).as_posix()
        if name not in expected:
            raise CheckpointError(
                f"{str(file)!r} is not part of the buffer dump {where} recorded: refusing to "
                "load a dump with files added"
            )
        if file.is_symlink() or not file.is_file():
            raise CheckpointError(f"{str(file)!r} in the buffer dump is not a regular file")
    for name, (size, digest) in expected.items():
        file = root / name
        if not file.is_file():
            raise CheckpointError(f"{str(file)!r} of the buffer dump {where} recorded is missing")
        actual = file.stat().st_size
        if actual != size:
            raise CheckpointError(
                f"{str(file)!r} has {actual} bytes, but {where} recorded {size}: the buffer "
                "dump is truncated or altered"
            )
        if _sha256(file) != digest:
            raise CheckpointError(
                f"{str(file)!r} does not match its sha256 in {where}: the buffer dump is "
                "corrupt or altered"
            )


def _sha256(file: Path) -> str:
    with open(file, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
