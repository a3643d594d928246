"""Routing plots (PNG, headless): spatial maps, episode timelines, summary bars, ablations.

Figures are built with :class:`matplotlib.figure.Figure` and saved with the Agg canvas, so
nothing here touches ``pyplot``'s global state or needs a display. Every function takes
DataFrames in the schema of :mod:`mop_torchrl.analysis.schema` and an output path, and returns
that path. Expert ``i`` of every block has the same colour (``tab10``) in all plots.

Examples:
    Every plot of a two-step episode (a recorded table has many; ``episodes`` may be ``None``
    when no frames were rendered):

    >>> import tempfile
    >>> import pandas as pd
    >>> from mop_torchrl.analysis import plot_all
    >>> layers = [[0, 16]]
    >>> routes = pd.DataFrame({
    ...     "level": "BabyAI-GoToRedBall-v0", "mission": "go to the red ball",
    ...     "mission_type": "go_to", "episode": 0, "step": [0, 1], "agent_x": [1, 2],
    ...     "agent_y": 1, "direction": 0, "carrying": 0, "action": [2, 6],
    ...     "expert_action": [2, 6], "w0_0": [0.875, 0.25], "w0_1": [0.125, 0.75],
    ...     "cost": [32.0, 192.0], "event": ["", "goal_reached"], "success": 1,
    ...     "episode_return": 0.97, "episode_length": 2,
    ... })
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     paths = plot_all(routes, None, layers, tmp, max_episodes=1)
    ...     all(p.stat().st_size > 1000 for p in paths)
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib import patheffects
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from mop_torchrl.analysis.schema import block_columns
from mop_torchrl.analysis.summary import ALL, cost_summary, entropy_summary, utilisation
from mop_torchrl.babyai.levels import ACTION_NAMES, level_name

__all__ = [
    "ABLATION_COLUMNS",
    "plot_ablation",
    "plot_all",
    "plot_cost",
    "plot_entropy",
    "plot_spatial",
    "plot_timeline",
    "plot_utilisation",
]

#: Columns :func:`plot_ablation` needs.
ABLATION_COLUMNS = ("setting", "threshold", "disable_largest", "success_rate", "drop")
_ACTION_SHORT = tuple(
    {"left": "L", "right": "R", "forward": "F", "pickup": "pick", "toggle": "tog"}.get(n, n)
    for n in ACTION_NAMES
)
_EVENT_COLORS = {
    "pickup": "tab:green",
    "drop": "tab:brown",
    "toggle_door": "tab:purple",
    "toggle": "tab:pink",
    "goal_reached": "black",
}


def _color(expert: int) -> tuple[float, float, float]:
    return tuple(mpl.colormaps["tab10"](expert % 10)[:3])


def _expert_label(size: int, expert: int) -> str:
    return f"e{expert}: identity" if size == 0 else f"e{expert}: d={size}"


def save_figure(fig: Figure, out_path: str | Path) -> Path:
    """Writes ``fig`` as a PNG (Agg canvas: no display needed), creating the folders."""
    path = Path(out_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110)
    return path


def _load_background(background: str | Path | np.ndarray | None) -> np.ndarray | None:
    if background is None or (isinstance(background, str | Path) and not str(background)):
        return None
    if isinstance(background, np.ndarray):
        return background
    import matplotlib.image as mpimg

    return mpimg.imread(str(background))


def plot_spatial(
    routes_df: pd.DataFrame,
    layers: Sequence[Sequence[int]],
    out_path: str | Path,
    *,
    grid_size: tuple[int, int] | None = None,
    background: str | Path | np.ndarray | None = None,
    title: str | None = None,
) -> Path:
    """Where each expert dominates: one grid map per block, plus the mean routing cost per cell.

    In a block's map, a visited cell's hue is its dominant expert (largest mean weight over the
    steps taken from that cell) and its opacity that expert's mean weight; small grids also print
    the weight. Unvisited cells are grey (or show the background). Mixing several episodes of a
    level averages over different layouts: pass one episode's rows to read a map against its
    layout.

    Args:
        routes_df: routes rows (any subset: one episode, one level, ...).
        layers: expert sizes per block.
        out_path: PNG path.

    Keyword Args:
        grid_size: ``(width, height)``; default: from the largest agent position.
        background: the episode's rendered first frame (path or RGB(A) array of the whole grid),
            drawn under the maps.
        title: figure title.
    """
    if grid_size is None:
        grid_size = (int(routes_df["agent_x"].max()) + 2, int(routes_df["agent_y"].max()) + 2)
    width, height = grid_size
    image = _load_background(background)
    cells = routes_df.groupby(["agent_y", "agent_x"])
    nb = len(layers)
    fig = Figure(figsize=(3.6 * (nb + 1) + 0.6, 4.6 if title else 4.2), layout="constrained")
    axes = fig.subplots(1, nb + 1, squeeze=False)[0]
    extent = (-0.5, width - 0.5, height - 0.5, -0.5)
    annotate = width <= 16 and height <= 16
    outline = [patheffects.withStroke(linewidth=1.5, foreground="black")]

    def frame(ax, name: str) -> None:
        ax.set_facecolor("#d9d9d9")
        if image is not None:
            ax.imshow(image, extent=extent, interpolation="nearest")
        ax.set_xlim(extent[0], extent[1])
        ax.set_ylim(extent[2], extent[3])
        ax.set_xticks(range(width))
        ax.set_yticks(range(height))
        ax.tick_params(labelsize=6, length=0)
        ax.set_xticks(np.arange(width + 1) - 0.5, minor=True)
        ax.set_yticks(np.arange(height + 1) - 0.5, minor=True)
        ax.grid(which="minor", color="white", linewidth=0.5)
        ax.set_title(name, fontsize=9)

    for block, sizes in enumerate(layers):
        ax = axes[block]
        frame(ax, f"block {block}: dominant expert")
        cols = block_columns(layers, block)
        mean = cells[cols].mean()
        rgba = np.zeros((height, width, 4))
        for (y, x), w in zip(mean.index, mean.to_numpy()):
            if not (0 <= x < width and 0 <= y < height):
                continue
            expert = int(w.argmax())
            strength = float(w[expert])
            rgb = np.array(_color(expert))
            if image is None:
                rgba[y, x] = (*(strength * rgb + (1 - strength)), 1.0)
            else:
                rgba[y, x] = (*rgb, 0.85 * strength)
            if annotate:
                ax.text(
                    x,
                    y,
                    f"{strength:.2f}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="black" if image is None and strength < 0.6 else "white",
                    path_effects=[] if image is None else outline,
                )
        ax.imshow(rgba, extent=extent, interpolation="nearest")
        handles = [Patch(color=_color(i), label=_expert_label(s, i)) for i, s in enumerate(sizes)]
        ax.legend(
            handles=handles,
            fontsize=7,
            loc="upper center",
            bbox_to_anchor=(0.5, -0.06),
            ncol=min(len(sizes), 3),
            frameon=False,
        )

    ax = axes[nb]
    frame(ax, "mean routing cost")
    cost = np.full((height, width), np.nan)
    for (y, x), value in cells["cost"].mean().items():
        if 0 <= x < width and 0 <= y < height:
            cost[y, x] = value
    im = ax.imshow(
        np.ma.masked_invalid(cost),
        extent=extent,
        cmap="viridis",
        interpolation="nearest",
        alpha=0.8 if image is not None else 1.0,
    )
    fig.colorbar(im, ax=ax, shrink=0.8, label="cost")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.supxlabel("block maps: hue = dominant expert, opacity = its mean weight", fontsize=8)
    return save_figure(fig, out_path)


def plot_timeline(
    routes_df: pd.DataFrame,
    layers: Sequence[Sequence[int]],
    out_path: str | Path,
    *,
    episode: int | None = None,
) -> Path:
    """One episode over time: stacked routing weights per block, the routing cost, the actions.

    Actions are the x tick labels (red where the bot would have acted differently) or, for long
    episodes, coloured markers under the cost; events (pickup, door toggled, goal reached, ...)
    are vertical lines across all panels.

    Args:
        routes_df: routes rows; only ``episode``'s are drawn.
        layers: expert sizes per block.
        out_path: PNG path.

    Keyword Args:
        episode: the episode id; default: the first one in the table.
    """
    if episode is None:
        episode = int(routes_df["episode"].iloc[0])
    ep = routes_df[routes_df["episode"] == episode].sort_values("step")
    if ep.empty:
        raise ValueError(f"episode {episode} is not in the routes table")
    steps = ep["step"].to_numpy()
    nb = len(layers)
    fig = Figure(
        figsize=(max(7.0, min(16.0, 0.22 * len(ep) + 3)), 1.9 * (nb + 1) + 0.8),
        layout="constrained",
    )
    axes = fig.subplots(nb + 1, 1, sharex=True, squeeze=False)[:, 0]
    for block, sizes in enumerate(layers):
        ax = axes[block]
        w = ep[block_columns(layers, block)].to_numpy(dtype=float).T
        ax.stackplot(
            steps,
            w,
            colors=[_color(i) for i in range(len(sizes))],
            labels=[_expert_label(s, i) for i, s in enumerate(sizes)],
            step="mid",
        )
        ax.set_ylim(0, 1)
        ax.set_ylabel(f"block {block}\nweight", fontsize=8)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    ax = axes[nb]
    ax.plot(steps, ep["cost"].to_numpy(), color="black", drawstyle="steps-mid", linewidth=1.2)
    ax.set_ylabel("routing cost", fontsize=8)
    ax.set_xlabel("step (action)" if len(ep) <= 60 else "step", fontsize=8)
    actions = ep["action"].to_numpy()
    expert = ep["expert_action"].to_numpy()
    wrong = (expert >= 0) & (expert != actions)
    names = [_ACTION_SHORT[a] if 0 <= a < len(_ACTION_SHORT) else str(a) for a in actions]
    if len(ep) <= 60:
        ax.set_xticks(steps)
        ax.set_xticklabels([f"{s} {n}" for s, n in zip(steps, names)], rotation=90, fontsize=7)
        for label, bad in zip(ax.get_xticklabels(), wrong):
            if bad:
                label.set_color("tab:red")
    else:
        lo = float(np.nanmin(ep["cost"])) if len(ep) else 0.0
        colors = [mpl.colormaps["tab10"](a % 10) for a in actions]
        ax.scatter(steps, np.full(len(steps), lo), c=colors, marker="|", s=60)
        handles = [
            Patch(color=mpl.colormaps["tab10"](a), label=n) for a, n in enumerate(ACTION_NAMES)
        ]
        ax.legend(
            handles=handles,
            fontsize=7,
            ncol=7,
            loc="upper center",
            bbox_to_anchor=(0.5, -0.28),
            frameon=False,
            title="actions",
            title_fontsize=7,
        )
    seen = set()
    for step, event in zip(steps, ep["event"]):
        for name in filter(None, str(event).split("+")):
            color = _EVENT_COLORS.get(name, "gray")
            for a in axes:
                a.axvline(step, color=color, linestyle="--", linewidth=1.2)
            if len(ep) <= 60 or name not in seen:  # long episodes: label each kind once
                axes[0].annotate(
                    name,
                    (step, 1.0),
                    xytext=(2, 2),
                    textcoords="offset points",
                    fontsize=7,
                    color=color,
                )
            seen.add(name)
    row = ep.iloc[0]
    outcome = "success" if int(row["success"]) else "failure"
    fig.suptitle(
        f'{level_name(str(row["level"]))}, episode {episode}: "{row["mission"]}"\n'
        f"{outcome}, return {float(row['episode_return']):.3f}, {len(ep)} steps"
        + ("; red action = differs from bot" if wrong.any() and len(ep) <= 60 else ""),
        fontsize=9,
    )
    return save_figure(fig, out_path)


def _groups(table: pd.DataFrame, by: str) -> pd.DataFrame:
    if by not in ("level", "mission_type"):
        raise ValueError(f"by must be 'level' or 'mission_type', got {by!r}")
    other = "mission_type" if by == "level" else "level"
    return table[(table[other] == ALL) & (table[by] != ALL)]


def plot_utilisation(
    routes_df: pd.DataFrame,
    layers: Sequence[Sequence[int]],
    out_path: str | Path,
    *,
    by: str = "level",
) -> Path:
    """Expert utilisation bars: mean weight (top row) and argmax share (bottom row) per block.

    Keyword Args:
        by: ``"level"`` or ``"mission_type"``: the groups along the x axis.
    """
    table = _groups(utilisation(routes_df, layers), by)
    groups = sorted(table[by].unique())
    nb = len(layers)
    fig = Figure(figsize=(max(4.0, 1.2 * len(groups) + 2) * nb, 5.6), layout="constrained")
    axes = fig.subplots(2, nb, squeeze=False)
    x = np.arange(len(groups))
    for block, sizes in enumerate(layers):
        sub = table[table["block"] == block]
        width = 0.8 / len(sizes)
        for row, metric in enumerate(("mean_weight", "argmax_share")):
            ax = axes[row, block]
            for i, size in enumerate(sizes):
                values = sub[sub["expert"] == i].set_index(by).reindex(groups)[metric]
                ax.bar(
                    x + (i - (len(sizes) - 1) / 2) * width,
                    values,
                    width,
                    color=_color(i),
                    label=_expert_label(size, i),
                )
            ax.set_ylim(0, 1)
            ax.set_xticks(x)
            ax.set_xticklabels([level_name(g) for g in groups], rotation=20, fontsize=8)
            ax.set_ylabel(metric.replace("_", " "), fontsize=8)
            if row == 0:
                ax.set_title(f"block {block}", fontsize=9)
                ax.legend(fontsize=7, frameon=False)
    fig.suptitle(f"expert utilisation by {by.replace('_', ' ')}", fontsize=10)
    return save_figure(fig, out_path)


def plot_entropy(
    routes_df: pd.DataFrame,
    layers: Sequence[Sequence[int]],
    out_path: str | Path,
    *,
    by: str = "level",
) -> Path:
    """Routing entropy bars per block: mean per-step entropy and entropy of the mean, in nats.

    The dashed line is the block's maximum ``log k``.

    Keyword Args:
        by: ``"level"`` or ``"mission_type"``: the groups along the x axis.
    """
    table = _groups(entropy_summary(routes_df, layers), by)
    groups = sorted(table[by].unique())
    nb = len(layers)
    fig = Figure(figsize=(max(4.0, 1.0 * len(groups) + 2) * nb, 3.6), layout="constrained")
    axes = fig.subplots(1, nb, squeeze=False)[0]
    x = np.arange(len(groups))
    for block, sizes in enumerate(layers):
        ax = axes[block]
        sub = table[table["block"] == block].set_index(by).reindex(groups)
        ax.bar(x - 0.2, sub["mean_entropy"], 0.4, color="tab:blue", label="mean per-step")
        ax.bar(x + 0.2, sub["entropy_of_mean"], 0.4, color="tab:orange", label="of mean routing")
        ax.axhline(np.log(len(sizes)), color="gray", linestyle="--", label=f"log {len(sizes)}")
        ax.set_ylim(0, np.log(len(sizes)) * 1.35)
        ax.set_xticks(x)
        ax.set_xticklabels([level_name(g) for g in groups], rotation=20, fontsize=8)
        ax.set_ylabel("entropy (nats)", fontsize=8)
        ax.set_title(f"block {block}", fontsize=9)
        ax.legend(fontsize=7, frameon=False, loc="upper center", ncol=3)
    fig.suptitle(f"routing entropy by {by.replace('_', ' ')}", fontsize=10)
    return save_figure(fig, out_path)


def plot_cost(routes_df: pd.DataFrame, out_path: str | Path) -> Path:
    """Mean routing cost per level and per mission type (error bars: standard error over steps);
    each bar is labelled with its episodes' success rate."""
    table = cost_summary(routes_df)
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, by in zip(axes, ("level", "mission_type")):
        sub = _groups(table, by).sort_values(by)
        x = np.arange(len(sub))
        sem = sub["std_cost"] / np.sqrt(sub["n_steps"].clip(lower=1))
        bars = ax.bar(x, sub["mean_cost"], yerr=sem, color="tab:gray", capsize=3)
        for bar, rate, n in zip(bars, sub["success_rate"], sub["n_episodes"]):
            ax.annotate(
                f"success {rate:.2f}\n{n} episodes",
                (bar.get_x() + bar.get_width() / 2, 0),
                xytext=(0, 4),
                textcoords="offset points",
                ha="center",
                va="bottom",
                color="white",
                fontsize=7,
            )
        ax.set_xticks(x)
        ax.set_xticklabels([level_name(g) for g in sub[by]], rotation=20, fontsize=8)
        ax.set_ylabel("mean routing cost", fontsize=8)
        ax.set_title(f"by {by.replace('_', ' ')}", fontsize=9)
        ax.margins(y=0.1)
    return save_figure(fig, out_path)


def plot_ablation(ablation_df: pd.DataFrame, out_path: str | Path) -> Path:
    """Success-rate drop per ablation setting (horizontal bars, labelled with the success rate).

    Args:
        ablation_df: columns ``setting, threshold, disable_largest, success_rate, drop``
            (``drop`` = baseline success rate minus this setting's), one row per setting.
        out_path: PNG path.
    """
    missing = [col for col in ABLATION_COLUMNS if col not in ablation_df.columns]
    if missing:
        raise ValueError(f"ablation table is missing column(s) {missing}")
    df = ablation_df.reset_index(drop=True)
    fig = Figure(figsize=(7, 0.45 * len(df) + 1.6), layout="constrained")
    ax = fig.subplots()
    y = np.arange(len(df))
    colors = ["tab:red" if bool(d) else "tab:blue" for d in df["disable_largest"]]
    bars = ax.barh(y, df["drop"], color=colors)
    for bar, rate in zip(bars, df["success_rate"]):
        ax.annotate(
            f"success {float(rate):.2f}",
            (max(bar.get_width(), 0), bar.get_y() + bar.get_height() / 2),
            xytext=(3, 0),
            textcoords="offset points",
            va="center",
            fontsize=7,
        )
    labels = [f"{s} (thr={float(t):g})" for s, t in zip(df["setting"], df["threshold"])]
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel("success-rate drop vs baseline", fontsize=8)
    ax.margins(x=0.25)
    ax.legend(
        handles=[
            Patch(color="tab:blue", label="threshold only"),
            Patch(color="tab:red", label="largest expert disabled"),
        ],
        fontsize=7,
        frameon=False,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.12 - 0.6 / (len(df) + 2)),
        ncol=2,
    )
    ax.set_title("routing ablations", fontsize=10)
    return save_figure(fig, out_path)


def plot_all(
    routes_df: pd.DataFrame,
    episodes_df: pd.DataFrame | None,
    layers: Sequence[Sequence[int]],
    out_dir: str | Path,
    *,
    ablation_df: pd.DataFrame | None = None,
    max_episodes: int = 3,
    frames_root: str | Path | None = None,
) -> list[Path]:
    """Every plot of a recording, written under ``out_dir``; returns the PNG paths.

    Writes ``utilisation_{by}.png`` and ``entropy_{by}.png`` for ``by`` in level and mission
    type, ``cost.png``, ``spatial_{level}.png`` per level (all its episodes pooled),
    ``spatial_ep{e}.png`` (over the episode's first frame when ``frame_path`` exists) and
    ``timeline_ep{e}.png`` for the first ``max_episodes`` episodes, and ``ablation.png`` when
    ``ablation_df`` is given.

    Keyword Args:
        ablation_df: an ablation table (:func:`plot_ablation`).
        max_episodes: how many episodes get their own spatial map and timeline.
        frames_root: folder that relative ``frame_path`` values are relative to (default: cwd).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for by in ("level", "mission_type"):
        paths.append(plot_utilisation(routes_df, layers, out / f"utilisation_{by}.png", by=by))
        paths.append(plot_entropy(routes_df, layers, out / f"entropy_{by}.png", by=by))
    paths.append(plot_cost(routes_df, out / "cost.png"))
    info = episodes_df.set_index("episode") if episodes_df is not None else None

    def grid_of(rows: pd.DataFrame) -> tuple[int, int] | None:
        if info is None:
            return None
        known = info.reindex(rows["episode"].unique()).dropna(subset=["grid_width"])
        if known.empty:
            return None
        return int(known["grid_width"].max()), int(known["grid_height"].max())

    for level, rows in routes_df.groupby("level", sort=True):
        name = "".join(c if c.isalnum() or c in "-_" else "_" for c in level_name(str(level)))
        paths.append(
            plot_spatial(
                rows,
                layers,
                out / f"spatial_{name}.png",
                grid_size=grid_of(rows),
                title=f"{level}: {rows['episode'].nunique()} episodes pooled",
            )
        )
    for episode in routes_df["episode"].drop_duplicates().iloc[:max_episodes]:
        rows = routes_df[routes_df["episode"] == episode]
        background = None
        if info is not None and episode in info.index:
            frame = str(info.loc[episode, "frame_path"] or "")
            if frame:
                path = Path(frame) if frames_root is None else Path(frames_root) / frame
                background = path if path.is_file() else None
        paths.append(
            plot_spatial(
                rows,
                layers,
                out / f"spatial_ep{episode}.png",
                grid_size=grid_of(rows),
                background=background,
                title=f'episode {episode}: "{rows["mission"].iloc[0]}"',
            )
        )
        paths.append(
            plot_timeline(rows, layers, out / f"timeline_ep{episode}.png", episode=int(episode))
        )
    if ablation_df is not None:
        paths.append(plot_ablation(ablation_df, out / "ablation.png"))
    return paths
