"""TensorBoard scalars for training and evaluation; a no-op unless `--tensorboard DIR` was given.

The CLI calls `enable(DIR)` once per process; training code calls `tb.log(prefix, values)` and
never checks whether logging is on:

    from ire_vla_ros.training import tb
    tb.log("sft", {"loss": loss, "lr_head": lr})          # step: per-prefix counter (0, 1, 2, ...)
    tb.log("eval", {"success_rate": 0.4}, step=stage)       # or an explicit step

Each process writes its own run directory `DIR/<run name>` (default: UTC time + pid), so every
`ire-vla train offline` that trainer_node starts shows up as its own run under `tensorboard
--logdir DIR`. Only rank 0 writes under torchrun. Non-finite and non-numeric values are skipped
(a NaN loss is reported by the trainer itself, not drawn as a gap). Uses
`torch.utils.tensorboard.SummaryWriter` (needs the `tensorboard` package).

Tags are `<prefix>/<name>`: sft/loss, sft/lr_head, sft/lr_lora; ppo/pg_loss, ppo/v_loss,
ppo/entropy, ppo/approx_kl, ppo/clipfrac, ppo/value_mean, ppo/return_mean, ppo/reward_mean,
ppo/lr_actor, ppo/lr_critic; eval/<task>/success_rate, eval/<task>/mean_steps, eval/mean_success_rate;
SAC (training/sac.py) should use sac/q_loss, sac/actor_loss, sac/alpha, sac/q_mean, sac/entropy,
sac/lr_actor, sac/lr_critic.
"""
from __future__ import annotations

import datetime as _dt
import math
import os
from pathlib import Path
from typing import Mapping

__all__ = ["ScalarLogger", "enable", "active", "log", "close", "enabled"]


class _NullLogger:
    enabled = False
    log_dir = None

    def log(self, prefix: str, values: Mapping[str, object], step: int | None = None) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class ScalarLogger:
    """Scalars into one TensorBoard run directory."""

    enabled = True

    def __init__(self, log_dir: str | os.PathLike):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._writer = SummaryWriter(log_dir=str(self.log_dir), flush_secs=10)
        self._steps: dict[str, int] = {}

    def log(self, prefix: str, values: Mapping[str, object], step: int | None = None) -> None:
        if step is None:
            step = self._steps.get(prefix, 0)
            self._steps[prefix] = step + 1
        for name, value in values.items():
            try:
                v = float(value)
            except (TypeError, ValueError):
                continue
            if math.isfinite(v):
                self._writer.add_scalar(f"{prefix}/{name}", v, global_step=int(step))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


_active: ScalarLogger | _NullLogger = _NullLogger()


def _is_main_rank() -> bool:
    try:
        import torch.distributed as dist

        return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    except Exception:  # pragma: no cover
        return True


def enable(log_dir: str | os.PathLike, run_name: str | None = None) -> ScalarLogger | _NullLogger:
    """Start logging to `log_dir/<run_name>` for the rest of the process (rank 0 only)."""
    global _active
    close()
    if int(os.environ.get("RANK", "0")) != 0 or not _is_main_rank():  # torchrun sets RANK before init
        return _active
    run_name = run_name or f"{_dt.datetime.now(_dt.timezone.utc):%Y%m%dT%H%M%S}Z_{os.getpid()}"
    _active = ScalarLogger(Path(log_dir) / run_name)
    return _active


def active() -> ScalarLogger | _NullLogger:
    return _active


def enabled() -> bool:
    return _active.enabled


def log(prefix: str, values: Mapping[str, object], step: int | None = None) -> None:
    """Write `prefix/name` scalars to the active run (no-op when TensorBoard is off)."""
    _active.log(prefix, values, step)


def close() -> None:
    global _active
    _active.close()
    _active = _NullLogger()


def log_eval(results: Mapping[str, object], step: int | None = None, prefix: str = "eval") -> None:
    """`rollout.evaluate`'s {task: {"success_rate", "mean_steps", ...}} as eval/<task>/* scalars plus
    eval/mean_success_rate (keys starting with "_" are bookkeeping and skipped)."""
    if not _active.enabled:
        return
    rates = []
    flat: dict[str, object] = {}
    for task, r in results.items():
        if task.startswith("_") or not isinstance(r, Mapping):
            continue
        for k in ("success_rate", "mean_steps"):
            if k in r:
                flat[f"{task}/{k}"] = r[k]
        if "success_rate" in r:
            rates.append(float(r["success_rate"]))
    if rates:
        flat["mean_success_rate"] = sum(rates) / len(rates)
    _active.log(prefix, flat, step)
