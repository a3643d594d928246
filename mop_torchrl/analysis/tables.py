"""Store and read the routing-analysis tables: Parquet (column types kept) and CSV beside it.

Each file is replaced atomically (:func:`~mop_torchrl.io.atomic_write`), so a recording killed
while writing leaves the previous tables, never a torn one. CSV re-infers types when read and
plain ``pd.read_csv`` turns the empty ``event``/``frame_path`` strings into NaN (which the
validators reject): read the tables back with :func:`read_routes` / :func:`read_episodes`.

Examples:
    >>> import tempfile
    >>> from pathlib import Path
    >>> import pandas as pd
    >>> from mop_torchrl.analysis.tables import read_episodes, write_tables
    >>> episodes = pd.DataFrame({"episode": [0], "level": ["BabyAI-GoToRedBall-v0"],
    ...                          "frame_path": [""]})
    >>> with tempfile.TemporaryDirectory() as out:
    ...     names = [p.name for p in write_tables(out, episodes=episodes)]
    ...     back = read_episodes(Path(out) / "episodes.csv")
    >>> names, back.equals(episodes)
    (['episodes.csv', 'episodes.parquet'], True)
"""

from __future__ import annotations

import functools
from pathlib import Path

import pandas as pd

from mop_torchrl.io import atomic_write

__all__ = ["read_episodes", "read_routes", "write_tables"]


def write_tables(out_dir: str | Path, **tables: pd.DataFrame) -> list[Path]:
    """Write each table as ``{name}.csv`` and ``{name}.parquet`` in ``out_dir`` (created).

    Returns:
        the paths written, CSV then Parquet for each table in argument order.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, table in tables.items():
        csv, parquet = out / f"{name}.csv", out / f"{name}.parquet"
        paths.append(atomic_write(csv, functools.partial(table.to_csv, index=False)))
        paths.append(atomic_write(parquet, functools.partial(table.to_parquet, index=False)))
    return paths


def _read_table(path: str | Path, **csv_kwargs) -> pd.DataFrame:
    if Path(path).suffix == ".parquet":
        return pd.read_parquet(path)
    return pd.read_csv(path, keep_default_na=False, **csv_kwargs)


def read_routes(path: str | Path) -> pd.DataFrame:
    """Read a routes table written by :func:`write_tables` (``.parquet`` or ``.csv``, by suffix).

    CSV is read with the empty ``event`` strings kept (plain ``pd.read_csv`` makes them NaN).
    """
    return _read_table(path, na_values={"cost": ["", "nan", "NaN"]})


def read_episodes(path: str | Path) -> pd.DataFrame:
    """Read an episodes table written by :func:`write_tables` (``.parquet`` or ``.csv``)."""
    return _read_table(path)
