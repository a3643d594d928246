"""BabyAI bot demonstrations in an on-disk TorchRL replay buffer.

:func:`generate_demos` lets the BabyAI bot play in worker processes and appends complete
episodes, one frame per row, to a :class:`~torchrl.data.LazyMemmapStorage` under a demo
directory. :func:`open_demos` reopens the committed frames as a
:class:`~torchrl.data.TensorDictReplayBuffer` and :func:`sample_sequences` draws
``[batch_slices, slice_len]`` sequences for recurrent behaviour cloning with a
:class:`~torchrl.data.SliceSampler` (``traj_key="episode"``).

One job per module:

- :mod:`~mop_torchrl.babyai.demos.store`: the on-disk format (keys, ``demos.json``), its
  integrity checks, :func:`open_demos` and :func:`sample_sequences`.
- :mod:`~mop_torchrl.babyai.demos.writer`: :class:`DemoWriter`, the lock, storage growth and
  the commit protocol that keeps a killed run's directory usable.
- :mod:`~mop_torchrl.babyai.demos.produce`: :func:`generate_demos` and its three producer
  back-ends (gymnasium worker processes, a TorchRL collector, a ``ParallelEnv``).
"""

from mop_torchrl.babyai.demos.produce import generate_demos
from mop_torchrl.babyai.demos.store import (
    FORMAT_VERSION,
    DemoError,
    demo_keys,
    open_demos,
    sample_sequences,
)
from mop_torchrl.babyai.demos.writer import DemoWriter

__all__ = [
    "FORMAT_VERSION",
    "DemoError",
    "DemoWriter",
    "demo_keys",
    "generate_demos",
    "open_demos",
    "sample_sequences",
]
