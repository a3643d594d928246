"""How stale are the hidden states stored in the DAgger dataset? (the burn-in decision)

Takes a finished imitation run (its checkpoint and the replay buffer saved beside it) and
scores the current policy on the last ``T - B`` steps of every stored row, starting the
recurrent core three ways at step ``B``:

- ``stored``: from the state stored at collection time for step ``B`` (what ``burn_in=0`` does);
- ``burn-in``: from the state stored for step 0, refreshed by the current policy over ``B``
  steps without loss (what ``burn_in=B`` does, R2D2);
- ``zero``: from a zero state (no memory of the steps before ``B``).

Rows are split by age (the oldest and the newest half of the buffer). If ``stored`` scores as
well as ``burn-in`` even on the oldest rows, the stored states are fresh enough and burn-in only
costs compute.

Usage::

    python benchmarks/stale_states.py runs/imitation-mop-GoToLocal-s0 --burn_in 8
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torchrl.modules import set_recurrent_mode

from mop_torchrl.babyai.policy import policy_parts
from mop_torchrl.train.checkpoint import load_checkpoint
from mop_torchrl.train.dagger import DaggerDataset
from mop_torchrl.train.policy import load_actor


@torch.no_grad()
def score(actor, rows, start: int, mode: str) -> dict[str, float]:
    """Cross-entropy and accuracy on steps ``start:`` of ``rows`` started as ``mode`` says."""
    data = rows.select(*actor.in_keys).clone()
    if mode == "burn-in":
        data["is_init"][:, 0] = True  # restart from the stored state at step 0
    else:
        data = data[:, start:].clone()
        data["is_init"][:, 0] = True
        if mode == "zero":  # without stored states the core starts from zeros at is_init
            data = data.exclude("recurrent_state")
    with set_recurrent_mode(True):
        logits = policy_parts(actor).logits(data)["logits"][:, -(rows.shape[1] - start) :]
    labels = rows["expert_action"][:, start:]
    valid = labels >= 0
    return {
        "cross_entropy": F.cross_entropy(logits[valid], labels[valid]).item(),
        "accuracy": (logits.argmax(-1) == labels)[valid].float().mean().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="an imitation run directory")
    parser.add_argument("--burn_in", type=int, default=8)
    parser.add_argument("--out", default="bench_results/stale_states.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    run = Path(args.run)
    actor, config = load_actor(run / "checkpoint.pt")
    payload = load_checkpoint(run / "checkpoint.pt")
    dataset = DaggerDataset(actor.in_keys, config.buffer_frames, config.unroll_len)
    dataset.loads(run / payload["buffers"]["dagger"])
    stored = dataset.buffer.storage[: len(dataset)]
    rows = stored.reshape(-1, config.unroll_len)
    order = rows["segment"][:, 0].argsort()
    rows = rows[order]
    half = rows.shape[0] // 2
    result = {"run": str(run), "update": payload["update"], "rows": rows.shape[0]}
    for age, part in (("oldest half", rows[:half]), ("newest half", rows[half:])):
        result[age] = {
            mode: score(actor, part, args.burn_in, mode) for mode in ("stored", "burn-in", "zero")
        }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
