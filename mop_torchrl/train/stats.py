"""What a training loop reports: finished episodes, and per-update metrics kept as tensors.

Both read values back to Python once per logging interval (or once per collected batch for
the episodes), not once per optimizer update: a ``.item()`` is a host sync on an accelerator.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence

import torch
from tensordict import TensorDictBase

from mop_torchrl.babyai.levels import level_name

__all__ = ["EpisodeStats", "MetricMeans"]

_EPISODE_KEYS = ("success", "return", "length", "path_ratio")
_BOT_KEYS = ("bot_failures", "bot_errors")
_NEXT_KEYS = ("success", "episode_reward", "step_count", "bot_solution_length", *_BOT_KEYS)


class EpisodeStats:
    """Recent finished episodes (success, return, length, path ratio, bot failures).

    With ``levels`` (multi-level runs, whose data carry ``"level"``) the summary also reports
    each level's episodes (``episode/<level>/<metric>``, a window per level) and its mean
    routing cost per step over the last batches (``routing/<level>/cost``, MoP policies).

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> nxt = TensorDict(done=torch.tensor([[False], [True], [True]]),
        ...                  success=torch.tensor([[False], [True], [False]]),
        ...                  episode_reward=torch.tensor([[0.0], [0.9], [0.0]]),
        ...                  step_count=torch.tensor([[3], [4], [64]]), batch_size=[3])
        >>> stats = EpisodeStats()
        >>> stats.add(TensorDict(next=nxt, batch_size=[3]))
        >>> {k: round(v, 3) for k, v in stats.summary().items()}
        {'episode/success': 0.5, 'episode/return': 0.45, 'episode/length': 34.0, 'episode/count': 2.0}
    """

    def __init__(self, window: int = 100, levels: Sequence[str] = (), total: int = 0) -> None:
        self.window = window
        self.levels = [level_name(level) for level in levels] if len(levels) > 1 else []
        self.columns: list[str] = []
        self.recent = torch.zeros(0, 0, dtype=torch.float64)  # [episodes, columns]
        self.per_level = [self.recent for _ in self.levels]
        self.level_cost: list[deque[float]] = [deque(maxlen=10) for _ in self.levels]
        self.total = total  # episodes finished since the run began (a resumed run continues it)

    def add(self, data: TensorDictBase) -> None:
        """Adds the episodes that end inside a collected batch (vectorised over episodes)."""
        nxt = data["next"]
        if self.levels and ("routing", "cost") in data.keys(True):
            self._add_level_costs(data["level"].reshape(-1), data["routing", "cost"].reshape(-1))
        done = nxt["done"].reshape(-1)
        flat = {key: nxt[key].reshape(-1).double() for key in _NEXT_KEYS if key in nxt}
        columns = {"success": flat["success"], "return": flat["episode_reward"]}
        columns["length"] = flat["step_count"]
        if "bot_solution_length" in flat:
            columns["path_ratio"] = flat["step_count"] / flat["bot_solution_length"].clamp(min=1)
        columns.update({key: flat[key] for key in _BOT_KEYS if key in flat})
        rows = torch.stack(list(columns.values()), -1)[done]
        if rows.shape[0] == 0:
            return
        if not self.columns:
            self.columns = list(columns)
            self.recent = rows[:0]
            self.per_level = [rows[:0] for _ in self.levels]
        self.recent = torch.cat([self.recent, rows])[-self.window :]
        if self.levels:
            level = nxt["level"].reshape(-1)[done]
            for i, kept in enumerate(self.per_level):
                self.per_level[i] = torch.cat([kept, rows[level == i]])[-self.window :]
        self.total += rows.shape[0]

    def _add_level_costs(self, level: torch.Tensor, cost: torch.Tensor) -> None:
        """Each level's mean cost per step in this batch (levels absent from it add nothing)."""
        count = torch.bincount(level, minlength=len(self.levels))
        total = torch.zeros(len(self.levels), dtype=torch.float64).index_add_(
            0, level, cost.double()
        )
        for costs, n, s in zip(self.level_cost, count.tolist(), total.tolist()):
            if n:
                costs.append(s / n)

    def summary(self) -> dict[str, float]:
        """Means over the window: ``episode/*``, ``episode/<level>/*``, ``routing/<level>/cost``."""
        out: dict[str, float] = {}
        groups = [
            ("episode", self.recent),
            *zip((f"episode/{n}" for n in self.levels), self.per_level),
        ]
        for prefix, rows in groups:
            if rows.shape[0] == 0:
                continue
            for name, mean in zip(self.columns, rows.mean(0).tolist()):
                if name in _EPISODE_KEYS or (prefix == "episode" and name in _BOT_KEYS):
                    out[f"{prefix}/{name}"] = mean
        if self.recent.shape[0]:
            out["episode/count"] = float(self.total)
        for name, costs in zip(self.levels, self.level_cost):
            if costs:
                out[f"routing/{name}/cost"] = sum(costs) / len(costs)
        return out


class MetricMeans:
    """Means of per-update metrics since the last :meth:`pop`, kept as tensors until then.

    ``add`` only adds tensors (no host sync); ``pop`` reads every mean back with one transfer.
    A vector metric (e.g. an expert weight per expert) becomes one number per element,
    ``<name>/<i>``; nested keys are joined with ``/``.

    Examples:
        >>> import torch
        >>> meter = MetricMeans()
        >>> meter.add({"loss": torch.tensor(1.0), "weights": torch.tensor([0.25, 0.75])})
        >>> meter.add({"loss": torch.tensor(3.0), "weights": torch.tensor([0.75, 0.25])}, "train/")
        >>> meter.add({"beta": 0.5})
        >>> meter.pop()
        {'loss': 1.0, 'weights/0': 0.25, 'weights/1': 0.75, 'train/loss': 3.0, 'train/weights/0': 0.75, 'train/weights/1': 0.25, 'beta': 0.5}
        >>> meter.pop()
        {}

    Per-level means (:meth:`add_per_level`) weigh every step alike over the interval:

        >>> meter.add_per_level(
        ...     {"steps": torch.tensor([3.0, 0.0]), "loss_sum": torch.tensor([3.0, 0.0])},
        ...     ["BabyAI-GoToLocal-v0", "BabyAI-GoTo-v0"], "train/")
        >>> meter.add_per_level(
        ...     {"steps": torch.tensor([1.0, 2.0]), "loss_sum": torch.tensor([5.0, 1.0])},
        ...     ["BabyAI-GoToLocal-v0", "BabyAI-GoTo-v0"], "train/")
        >>> meter.pop()
        {'train/GoToLocal/loss': 2.0, 'train/GoTo/loss': 0.5}
    """

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor | float] = {}
        self._counts: dict[str, int] = {}
        self._level_sums: dict[str, torch.Tensor] = {}  # key -> its sum [num_levels]
        self._level_names: list[str] = []

    def add(
        self, metrics: Mapping[str, torch.Tensor | float] | TensorDictBase, prefix: str = ""
    ) -> None:
        """Adds one update's metrics (tensors are detached; Python numbers are kept as such)."""
        items = (
            metrics.items(include_nested=True, leaves_only=True)
            if isinstance(metrics, TensorDictBase)
            else metrics.items()
        )
        for key, value in items:
            name = prefix + ("/".join(key) if isinstance(key, tuple) else key)
            value = value.detach() if isinstance(value, torch.Tensor) else float(value)
            self._sums[name] = self._sums[name] + value if name in self._sums else value
            self._counts[name] = self._counts.get(name, 0) + 1

    def pop(self) -> dict[str, float]:
        """The means since the last call, as Python numbers; starts over."""
        tensors = {k: v for k, v in self._sums.items() if isinstance(v, torch.Tensor)}
        means = [v.reshape(-1).double() / self._counts[k] for k, v in tensors.items()]
        flat = iter(torch.cat(means).tolist() if means else [])
        out: dict[str, float] = {}
        for name, total in self._sums.items():
            if not isinstance(total, torch.Tensor):
                out[name] = total / self._counts[name]
            elif total.ndim == 0:
                out[name] = next(flat)
            else:
                out.update({f"{name}/{i}": next(flat) for i in range(total.numel())})
        if self._level_sums:
            steps = self._level_sums.pop("steps").tolist()
            for key, sums in self._level_sums.items():
                metric = key.removesuffix("_sum")
                for level, total, n in zip(self._level_names, sums.tolist(), steps):
                    if n > 0:  # a level absent from every batch of the interval: no value
                        out[f"{level}/{metric}"] = total / n
        self._sums, self._counts, self._level_sums = {}, {}, {}
        return out

    def add_per_level(
        self,
        sums: Mapping[str, torch.Tensor] | TensorDictBase,
        levels: Sequence[str],
        prefix: str = "",
    ) -> None:
        """Adds one update's per-level sums ``[num_levels]``: ``steps`` and ``<metric>_sum``
        entries; :meth:`pop` reports ``<prefix><level>/<metric>``, each sum over the
        interval divided by the level's steps (levels in the order of ``levels``)."""
        self._level_names = [prefix + level_name(level) for level in levels]
        for key, value in sums.items():
            value = value.detach()
            self._level_sums[key] = (
                self._level_sums[key] + value if key in self._level_sums else value
            )
