"""Metaworld v3 simulation: image/joint-state tasks, scripted experts, demo collection (no ROS).

Importing this package sets MUJOCO_GL (egl, or osmesa if EGL is missing) unless already set.
"""
from ire_vla_ros.sim.metaworld_env import (
    CAMERAS,
    DEFAULT_CAMERA,
    HELDOUT_SEED_OFFSET,
    SAWYER_JOINT_NAMES,
    TASK_INSTRUCTIONS,
    MetaworldTaskEnv,
    Observation,
    heldout_seeds,
    train_seeds,
)

__all__ = [
    "CAMERAS", "DEFAULT_CAMERA", "HELDOUT_SEED_OFFSET", "SAWYER_JOINT_NAMES", "TASK_INSTRUCTIONS",
    "MetaworldTaskEnv", "Observation", "heldout_seeds", "train_seeds", "collect_expert_episodes",
]


def __getattr__(name: str):
    if name == "collect_expert_episodes":
        from ire_vla_ros.sim.collect import collect_expert_episodes

        return collect_expert_episodes
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
