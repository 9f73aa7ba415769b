"""Scripted-expert helpers: noisy expert actions and expert success statistics per task.

`python -m ire_vla_ros.sim.experts --tasks reach-v3 drawer-close-v3 --seeds 20 --noise 0 0.3 0.6`
prints the table used to choose the CPU demo tasks (success rate and mean steps to success of the
scripted Metaworld policy under Gaussian action noise). No ROS imports.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass

import numpy as np

from ire_vla_ros.sim.metaworld_env import TASK_INSTRUCTIONS, MetaworldTaskEnv

#: Tasks compared when choosing the demo tasks.
CANDIDATE_TASKS: tuple[str, ...] = (
    "button-press-topdown-v3", "button-press-v3", "coffee-button-v3", "drawer-close-v3",
    "drawer-open-v3", "reach-v3", "door-open-v3", "window-open-v3", "window-close-v3",
    "plate-slide-v3", "handle-press-v3", "faucet-open-v3", "faucet-close-v3", "lever-pull-v3",
    "handle-pull-v3", "door-close-v3", "push-v3", "pick-place-v3",
)


def noisy_expert_action(env: MetaworldTaskEnv, rng: np.random.Generator, noise_std: float) -> np.ndarray:
    """Expert action + N(0, noise_std^2) per component, clipped to [-1, 1] (what step() executes)."""
    a = env.expert_action()
    if noise_std > 0:
        a = a + rng.normal(0.0, noise_std, size=a.shape).astype(np.float32)
    return np.clip(a, -1.0, 1.0).astype(np.float32)


def noise_rng(seed: int, noise_std: float) -> np.random.Generator:
    """Deterministic action-noise RNG of an episode (independent of the placement RNG)."""
    return np.random.default_rng([int(seed), int(round(noise_std * 1000)), 0x5EED])


@dataclass
class RolloutResult:
    seed: int
    success: bool
    steps: int  # steps until success, or until truncation
    return_: float


def expert_rollout(env: MetaworldTaskEnv, seed: int, noise_std: float = 0.0) -> RolloutResult:
    env.reset(seed)
    rng = noise_rng(seed, noise_std)
    total = 0.0
    while True:
        _, r, terminated, truncated, info = env.step(noisy_expert_action(env, rng, noise_std))
        total += r
        if terminated or truncated:
            return RolloutResult(seed, bool(info["success"]), env.steps, total)


@dataclass
class ExpertStats:
    task: str
    noise_std: float
    n: int
    success_rate: float
    mean_steps_to_success: float | None
    max_steps_to_success: int | None


def expert_stats(task: str, seeds, noise_std: float, *, max_episode_steps: int = 150,
                 env: MetaworldTaskEnv | None = None) -> ExpertStats:
    own = env is None
    env = env or MetaworldTaskEnv(task, render=False, max_episode_steps=max_episode_steps)
    try:
        results = [expert_rollout(env, s, noise_std) for s in seeds]
    finally:
        if own:
            env.close()
    ok = [r.steps for r in results if r.success]
    return ExpertStats(
        task=task, noise_std=float(noise_std), n=len(results), success_rate=len(ok) / max(1, len(results)),
        mean_steps_to_success=float(np.mean(ok)) if ok else None, max_steps_to_success=max(ok) if ok else None,
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=list(CANDIDATE_TASKS), choices=sorted(TASK_INSTRUCTIONS))
    p.add_argument("--seeds", type=int, default=20, help="number of seeds (0..N-1)")
    p.add_argument("--seed0", type=int, default=0)
    p.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.3, 0.6])
    p.add_argument("--max-episode-steps", type=int, default=150)
    p.add_argument("--json", help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    seeds = list(range(args.seed0, args.seed0 + args.seeds))
    rows = []
    print(f"{'task':26s} " + " ".join(f"{'sr@' + str(n):>8s} {'steps':>6s}" for n in args.noise))
    for task in args.tasks:
        t0 = time.time()
        env = MetaworldTaskEnv(task, render=False, max_episode_steps=args.max_episode_steps)
        cells = []
        for noise in args.noise:
            st = expert_stats(task, seeds, noise, env=env)
            rows.append(asdict(st))
            steps = "-" if st.mean_steps_to_success is None else f"{st.mean_steps_to_success:.0f}"
            cells.append(f"{st.success_rate:8.2f} {steps:>6s}")
        env.close()
        print(f"{task:26s} " + " ".join(cells) + f"   ({time.time() - t0:.1f}s)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
