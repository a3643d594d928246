"""The training logger comes from TorchRL's own factory (``get_logger``), for every choice."""

from __future__ import annotations

import importlib.util

import pytest
from torchrl.record.loggers import CSVLogger, TensorboardLogger

from mop_torchrl.train import logs as logs_module
from mop_torchrl.train.config import TrainConfig


def test_csv_logger_writes_scalars(tmp_path):
    logger = logs_module.make_logger("csv", tmp_path)
    assert isinstance(logger, CSVLogger)
    logger.log_scalar("train/loss", 0.5, step=3)
    logger.log_scalar("train/loss", 0.25, step=4)
    text = (tmp_path / "logs" / "scalars" / "train" / "loss.csv").read_text()
    assert text.split() == ["3,0.5", "4,0.25"]


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="needs tensorboard")
def test_tensorboard_logger_writes_events(tmp_path):
    logger = logs_module.make_logger("tensorboard", tmp_path)
    assert isinstance(logger, TensorboardLogger)
    logger.log_scalar("train/loss", 0.5, step=1)
    logger.experiment.flush()
    assert list((tmp_path / "logs").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("kind", ["wandb", "mlflow"])
def test_missing_logger_package_is_one_line_error(kind, tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == kind else real_find_spec(name)
    )
    with pytest.raises(ImportError, match=rf"^--logger {kind} needs the '{kind}' package") as err:
        logs_module.make_logger(kind, tmp_path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kind", ["csv", "tensorboard", "wandb", "mlflow"])
def test_every_choice_goes_through_torchrl_get_logger(kind, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())  # "installed"
    monkeypatch.setattr(
        "torchrl.record.loggers.get_logger", lambda *args, **kwargs: calls.append((args, kwargs))
    )
    logs_module.make_logger(kind, tmp_path)
    ((args, kwargs),) = calls
    assert args == (kind, str(tmp_path), "logs")
    assert kwargs["wandb_kwargs"]["offline"] is True  # W&B never needs the network


def test_config_accepts_every_factory_choice_and_names_a_wrong_one():
    for kind in logs_module.LOGGER_PACKAGES:
        assert TrainConfig(logger=kind).logger == kind
    with pytest.raises(ValueError, match="logger"):
        TrainConfig(logger="neptune")
