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
"""

from __future__ import annotations

import random
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mop_torchrl.io import atomic_write, remove_orphan_temps

__all__ = [
    "CheckpointError",
    "load_checkpoint",
    "remove_orphan_temps",
    "save_checkpoint",
    "seed_everything",
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
    (:func:`~mop_torchrl.io.atomic_write`: a kill leaves the previous checkpoint)."""
    return atomic_write(path, lambda f: torch.save({"format": FORMAT, **payload}, f))


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
        with torch.serialization.safe_globals(_LEGACY_SAFE_GLOBALS):
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for truncated/garbage/unsafe files
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupt, unreadable or not data-only: {reason}"
        ) from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a mop_torchrl checkpoint ({FORMAT})")
    missing = [key for key in REQUIRED if key not in payload]
    if missing:
        raise CheckpointError(f"checkpoint {str(path)!r} lacks {missing}")
    return payload
