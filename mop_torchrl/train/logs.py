"""The run's logger (TorchRL's own factory) and the CSV logs cut back on resume."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from torchrl.record.loggers import Logger

from mop_torchrl.io import atomic_write_text

__all__ = ["LOGGER_PACKAGES", "make_logger", "truncate_csv_logs"]

LOGGER_PACKAGES = {"csv": None, "tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
"""The ``--logger`` choices and the package each needs."""


def make_logger(kind: str, run_dir: Path) -> Logger:
    """The run's logger from TorchRL's own factory (``torchrl.record.loggers.get_logger``).

    Everything lands in ``run_dir``: CSV/TensorBoard under ``logs/``, MLflow as a file store
    (``mlflow ui --backend-store-uri <run_dir>``), W&B offline under ``wandb/`` (upload it
    later with ``wandb sync``). A missing package is a one-line ``ImportError``.
    """
    package = LOGGER_PACKAGES[kind]
    if package is not None and importlib.util.find_spec(package) is None:
        raise ImportError(f"--logger {kind} needs the {package!r} package: pip install {package}")
    from torchrl.record.loggers import get_logger

    wandb_kwargs = {"offline": True, "project": "mop_torchrl"}  # its save_dir is run_dir
    return get_logger(kind, str(run_dir), "logs", wandb_kwargs=wandb_kwargs)


def truncate_csv_logs(log_dir: Path, step: int) -> None:
    """Keeps only the rows with ``step <= step`` in every CSV scalar file under ``log_dir``.

    A resumed run re-logs the updates after its checkpoint; without this they would appear
    twice (and a run resumed without a checkpoint would log on top of the old run).

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> log_dir = Path(tempfile.mkdtemp())
        >>> (log_dir / "scalars").mkdir()
        >>> _ = (log_dir / "scalars" / "loss.csv").write_text("1,0.5\\n2,0.4\\n3,0.")
        >>> truncate_csv_logs(log_dir, 1)
        >>> (log_dir / "scalars" / "loss.csv").read_text()
        '1,0.5\\n'
    """
    for path in sorted((log_dir / "scalars").rglob("*.csv")):
        kept = []
        for line in path.read_text().splitlines():
            head = line.split(",", 1)[0]
            if line.count(",") == 1 and head.lstrip("-").isdigit() and int(head) <= step:
                kept.append(line + "\n")
        atomic_write_text(path, "".join(kept))
