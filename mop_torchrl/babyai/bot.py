"""A bounded BabyAI bot: expert labels that never hang.

``minigrid.utils.baby_ai_bot.BabyAIBot`` plans with a stack of subgoals. ``replan`` pops and
pushes subgoals in a ``while self.stack:`` loop until one of them proposes an action; on some
states (seen on Unlock) subgoals keep replacing each other and the loop never ends, while the
stack may grow without bound. Every pass of that loop reads ``self.stack[-1]``, and every
subgoal is pushed with ``self.stack.append``. :class:`BoundedBabyAIBot` replaces the bot's stack
by a list subclass that counts those reads and checks the stack size and, optionally, a
deadline; over budget it raises :class:`BotBudgetExceeded` from inside the loop. This needs no
signal and no thread, so it works the same in the main process, in threads and in
:class:`~torchrl.envs.ParallelEnv` workers, and the iteration budget is deterministic (a time
budget is available but makes labels depend on machine load).

:class:`BabyAIExpert` drives the bot through an episode: a fresh bot at every reset,
``replan(previous_action)`` after every step with the action actually taken. Any exception of
the bot gives ``-1`` for that step and the next step starts from a fresh bot, so labels
recover; but only an exhausted budget counts as a bot *failure*. Any other exception
(``DisappearedBoxError`` when a box was opened, an assertion of the bot, or a bug) is counted
by type in :class:`BotErrors` and the first of each type is logged with its traceback, so a
bug never hides among plan failures.
"""

from __future__ import annotations

import copy
import logging
import time
from collections import Counter, deque
from typing import Any

import torch
from minigrid.envs.babyai.core.verifier import AfterInstr, AndInstr, BeforeInstr
from minigrid.utils.baby_ai_bot import BabyAIBot
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase

from mop_torchrl.babyai.levels import NUM_ACTIONS
from mop_torchrl.babyai.view import view_offsets

__all__ = [
    "DEFAULT_BOT_BUDGET",
    "DEFAULT_MAX_STACK",
    "BabyAIExpert",
    "BotActor",
    "BotBudgetExceeded",
    "BotErrors",
    "BoundedBabyAIBot",
    "bot_solution_length",
]

#: Default number of subgoal-loop iterations allowed per ``replan`` call. Measured: a normal
#: replan takes at most 8 (GoToLocal, PutNextLocal, Unlock, KeyCorridor, SynthSeq, BossLevel,
#: with the bot's or random actions); a looping bot (Unlock, seed 63) spends 3-5 ms per
#: iteration, so it is stopped after about 0.3-0.5 s.
DEFAULT_BOT_BUDGET: int = 100

#: Default bound on the size of the bot's subgoal stack (measured normal maximum: 12).
DEFAULT_MAX_STACK: int = 100


class BotBudgetExceeded(RuntimeError):
    """Raised inside the bot's planning loop when its budget for one ``replan`` is spent."""


_log = logging.getLogger(__name__)
_logged_types: set[str] = set()  # per process: the first error of each type is logged


class BotErrors:
    """Exceptions of the bot other than an exhausted budget, counted by type.

    The first exception of each type in a process is logged (``logging`` warning, with the
    traceback).

    Examples:
        >>> errors = BotErrors()
        >>> errors.record(KeyError("x")); errors.record(KeyError("y"))
        >>> dict(errors.counts), errors.total
        ({'KeyError': 2}, 2)
    """

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def record(self, err: BaseException) -> None:
        name = type(err).__name__
        self.counts[name] += 1
        if name not in _logged_types:
            _logged_types.add(name)
            _log.warning(
                "BabyAI bot raised %s (label -1, counted in bot_errors; first of its type): %s",
                name,
                err,
                exc_info=err,
            )


class _BudgetedStack(list):
    """The bot's subgoal stack; charges the owner's budget on every ``stack[i]`` read."""

    __slots__ = ("_owner",)

    def __init__(self, items: Any, owner: BoundedBabyAIBot) -> None:
        super().__init__(items)
        self._owner = owner

    def __getitem__(self, index):
        self._owner._charge()
        return super().__getitem__(index)

    def append(self, item: Any) -> None:
        super().append(item)
        if len(self) > self._owner.max_stack:
            raise BotBudgetExceeded(f"bot subgoal stack grew beyond {self._owner.max_stack}")


class BoundedBabyAIBot(BabyAIBot):
    """:class:`~minigrid.utils.baby_ai_bot.BabyAIBot` with a budget per :meth:`replan`.

    Behaves exactly like the minigrid bot (same actions) while within budget, except when it
    is created in the middle of an episode: then the parts of a sequenced mission that the
    env's verifier already marks as done (``a_done``/``b_done`` of ``BeforeInstr``,
    ``AfterInstr``, ``AndInstr``) are not planned again.

    Args:
        env: a BabyAI environment (wrapped or not) whose current episode the bot solves.
        max_iterations (int, optional): subgoal-loop iterations allowed per :meth:`replan`.
            ``None`` disables the bound. Defaults to :data:`DEFAULT_BOT_BUDGET`.
        max_seconds (float, optional): wall-clock seconds allowed per :meth:`replan`, checked
            at every loop iteration. Defaults to ``None`` (no time bound).
        max_stack (int, optional): bound on the subgoal stack size. Defaults to
            :data:`DEFAULT_MAX_STACK`.

    Raises:
        BotBudgetExceeded: from :meth:`replan` when a budget is exhausted.

    Examples:
        >>> import gymnasium as gym
        >>> import minigrid  # registers the BabyAI levels
        >>> from mop_torchrl.babyai.bot import BoundedBabyAIBot
        >>> env = gym.make("BabyAI-GoToRedBall-v0")
        >>> _ = env.reset(seed=0)
        >>> bot = BoundedBabyAIBot(env, max_iterations=1000)
        >>> action = bot.replan()
        >>> _ = env.step(action)
        >>> action = bot.replan(action)
    """

    def __init__(
        self,
        env: Any,
        max_iterations: int | None = DEFAULT_BOT_BUDGET,
        max_seconds: float | None = None,
        max_stack: int = DEFAULT_MAX_STACK,
    ) -> None:
        self.max_iterations = max_iterations
        self.max_seconds = max_seconds
        self.max_stack = max_stack
        self._iterations = 0
        self._deadline: float | None = None
        super().__init__(env)
        self.stack = _BudgetedStack(self.stack, self)

    def _charge(self) -> None:
        self._iterations += 1
        if self.max_iterations is not None and self._iterations > self.max_iterations:
            raise BotBudgetExceeded(f"bot replan exceeded {self.max_iterations} subgoal iterations")
        if self._deadline is not None and time.perf_counter() > self._deadline:
            raise BotBudgetExceeded(f"bot replan exceeded {self.max_seconds} s")

    def replan(self, action_taken: int | None = None) -> int:
        """Suggest an action for the env's current state; ``action_taken`` is the last action."""
        self._iterations = 0
        if self.max_seconds is not None:
            self._deadline = time.perf_counter() + self.max_seconds
        return int(super().replan(action_taken))

    def _process_obs(self) -> None:
        # minigrid's loop over the 7x7 view, as one indexed assignment: mark the world cells
        # the agent sees as seen
        env = self.mission.unwrapped
        _, seen = env.gen_obs_grid()
        offsets = view_offsets(int(env.agent_dir), env.agent_view_size)[seen.T.ravel()]
        xs, ys = offsets[:, 0] + env.agent_pos[0], offsets[:, 1] + env.agent_pos[1]
        width, height = self.vis_mask.shape
        inside = (xs >= 0) & (xs < width) & (ys >= 0) & (ys < height)
        self.vis_mask[xs[inside], ys[inside]] = True

    def _breadth_first_search(self, initial_states, accept_fn, ignore_blockers):
        # minigrid's search visit for visit (same order, counters and results), with a deque
        # instead of re-slicing the queue at every pop and plain lists for the grid lookups
        self.bfs_counter += 1
        grid = self.mission.unwrapped.grid
        cells, width, height = grid.grid, grid.width, grid.height
        seen = self.vis_mask.tolist()
        queue = deque((state, None) for state in initial_states)
        previous_pos: dict[tuple[int, int], Any] = {}
        while queue:
            (i, j, di, dj), prev_pos = queue.popleft()
            if (i, j) in previous_pos:
                continue
            self.bfs_step_counter += 1
            if not (0 <= i < width and 0 <= j < height):
                raise AssertionError(f"search left the grid at {(i, j)}")  # as Grid.get does
            cell = cells[j * width + i]
            previous_pos[(i, j)] = prev_pos
            if accept_fn((i, j), cell):
                path, pos = [], (i, j)
                while pos:
                    path.append(pos)
                    pos = previous_pos[pos]
                return path, (i, j), previous_pos
            if not seen[i][j]:
                continue
            if cell:
                if cell.type == "wall":
                    continue
                if cell.type == "door":
                    if not cell.is_open:
                        continue
                elif not ignore_blockers:
                    continue
            for dx, dy in ((di, dj), (dj, di), (-dj, -di), (-di, -dj)):  # straight on first
                queue.append(((i + dx, j + dy, dx, dy), (i, j)))
        return None, None, previous_pos

    def _process_instr(self, instr: Any) -> None:
        # Skip the operands of sequencing instructions already completed in this episode
        # (all flags are False right after a reset, so a bot created at reset plans as usual).
        if isinstance(instr, (BeforeInstr, AndInstr)):
            a_done = getattr(instr, "a_done", False) == "success"
            b_done = getattr(instr, "b_done", False) == "success"
            if a_done and not b_done:
                return self._process_instr(instr.instr_b)
            if isinstance(instr, AndInstr) and b_done and not a_done:
                return self._process_instr(instr.instr_a)
        elif isinstance(instr, AfterInstr) and getattr(instr, "b_done", False) == "success":
            return self._process_instr(instr.instr_a)
        return super()._process_instr(instr)


class BabyAIExpert:
    """Episode driver for :class:`BoundedBabyAIBot` that turns every bot error into ``-1``.

    Call :meth:`reset` after each env reset and :meth:`replan` after each env step with the
    action actually taken. Both return the bot's action for the env's *current* state, or
    ``-1`` when the bot could not give one. An exhausted budget is a failure, counted in
    :attr:`failures` (this episode) and :attr:`total_failures`; any other exception is counted
    by type in :attr:`errors` (a :class:`BotErrors`, which logs the first of each type). The
    message is kept in :attr:`last_error` and the next call plans with a fresh bot.

    Args:
        env: the BabyAI environment the labels are for (wrapped or not).
        max_iterations (int, optional): iteration budget per replan. Defaults to
            :data:`DEFAULT_BOT_BUDGET`.
        max_seconds (float, optional): time budget per replan, in seconds. Defaults to ``None``.
        errors (BotErrors, optional): where to count exceptions (shared with
            :func:`bot_solution_length` by the env wrapper). Defaults to a new one.

    Examples:
        >>> import gymnasium as gym
        >>> import minigrid
        >>> from mop_torchrl.babyai.bot import BabyAIExpert
        >>> env = gym.make("BabyAI-GoToLocal-v0")
        >>> _ = env.reset(seed=0)
        >>> expert = BabyAIExpert(env)
        >>> label = expert.reset()
        >>> _ = env.step(2)  # the student moves forward whatever the bot said
        >>> label = expert.replan(2)
        >>> expert.failures
        0
    """

    def __init__(
        self,
        env: Any,
        max_iterations: int | None = DEFAULT_BOT_BUDGET,
        max_seconds: float | None = None,
        errors: BotErrors | None = None,
    ) -> None:
        self.env = env
        self.max_iterations = max_iterations
        self.max_seconds = max_seconds
        self.failures = 0
        self.total_failures = 0
        self.errors = errors if errors is not None else BotErrors()
        self.last_error: str | None = None
        self._bot: BoundedBabyAIBot | None = None

    def _fail(self, err: Exception) -> int:
        self._bot = None
        if isinstance(err, BotBudgetExceeded):
            self.failures += 1
            self.total_failures += 1
        else:
            self.errors.record(err)
        self.last_error = f"{type(err).__name__}: {err}"
        return -1

    def _fresh(self) -> int:
        self._bot = BoundedBabyAIBot(self.env, self.max_iterations, self.max_seconds)
        return self._bot.replan(None)

    def reset(self) -> int:
        """Start a new episode (call right after the env's reset); the bot's first action."""
        self.failures = 0
        try:
            return self._fresh()
        except Exception as err:
            return self._fail(err)

    def replan(self, previous_action: int) -> int:
        """The bot's action after the env stepped with ``previous_action``, or ``-1``."""
        try:
            if self._bot is None:
                return self._fresh()
            return self._bot.replan(int(previous_action))
        except Exception as err:
            return self._fail(err)


def bot_solution_length(
    env: Any,
    max_iterations: int | None = DEFAULT_BOT_BUDGET,
    max_seconds: float | None = None,
    max_steps: int | None = None,
    errors: BotErrors | None = None,
) -> int:
    """Number of steps the bot needs to solve the episode from the env's current state.

    The env is deep-copied (its random generator included) and the bot rolled out on the
    copy, so the env itself is untouched. Returns ``-1`` when the bot hits its budget, raises
    (counted in ``errors`` by type, the first of each type logged), or the episode ends
    without success.

    Args:
        env: a BabyAI env, normally right after ``reset``.
        max_iterations (int, optional): iteration budget per replan.
        max_seconds (float, optional): time budget per replan.
        max_steps (int, optional): give up after this many steps. Defaults to the env's own
            time limit.
        errors (BotErrors, optional): where to count the bot's exceptions. Defaults to a
            throw-away one (the first of each type is still logged).

    Examples:
        >>> import gymnasium as gym
        >>> import minigrid
        >>> from mop_torchrl.babyai.bot import bot_solution_length
        >>> env = gym.make("BabyAI-GoToRedBall-v0")
        >>> _ = env.reset(seed=0)
        >>> bot_solution_length(env) > 0
        True
    """
    sim = copy.deepcopy(env.unwrapped)
    limit = max_steps if max_steps is not None else sim.max_steps - sim.step_count
    try:
        bot = BoundedBabyAIBot(sim, max_iterations, max_seconds)
        action = bot.replan(None)
        for step in range(1, limit + 1):
            _, reward, terminated, truncated, _ = sim.step(action)
            if terminated:
                return step if reward > 0 else -1
            if truncated:
                return -1
            action = bot.replan(action)
    except BotBudgetExceeded:
        return -1
    except Exception as err:
        (errors if errors is not None else BotErrors()).record(err)
        return -1
    return -1


class BotActor(TensorDictModuleBase):
    """Acts with the bot's label ``"expert_action"``; a seeded random action where it is ``-1``.

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from mop_torchrl.babyai.bot import BotActor
        >>> td = BotActor(seed=0)(TensorDict(expert_action=torch.tensor([2, -1])))
        >>> td["action"][0].item(), 0 <= td["action"][1].item() < 7
        (2, True)
    """

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.in_keys = ["expert_action"]
        self.out_keys = ["action"]
        self.seed = seed
        self._generator: torch.Generator | None = None

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        if self._generator is None:  # created lazily, in the worker process
            self._generator = torch.Generator().manual_seed(self.seed)
        label = tensordict.get("expert_action")
        noise = torch.randint(0, NUM_ACTIONS, label.shape, generator=self._generator)
        tensordict.set("action", torch.where(label >= 0, label, noise))
        return tensordict
