"""Shared bits of the benchmarks: environment for DDS/rendering, JSON output, machine facts."""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])

# IRE_VLA_BENCH_RESULTS: somewhere else (the tests' smoke runs must not write into bench/results)
RESULTS = Path(os.environ.get("IRE_VLA_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")


def machine() -> dict:
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
            "loadavg_at_start": os.getloadavg()[0], "when": time.strftime("%Y-%m-%dT%H:%M:%S")}


def write_result(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=float))
    os.replace(tmp, path)
    print(json.dumps(payload, indent=2, default=float))
    print(f"written: {path}")
    return path


def save_figure(fig, path: Path) -> None:
    """tight_layout, write the PNG (folder made), close the figure, say where."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"written: {path}")


def run_episode(env, seed: int, act) -> dict:
    """One episode of a MetaworldTaskEnv from `seed`, `act(observation) -> action` each decision,
    until it terminates (success) or truncates (time limit); returns the last step's info."""
    obs = env.reset(seed)
    while True:
        obs, _, terminated, truncated, info = env.step(act(obs))
        if terminated or truncated:
            return info
