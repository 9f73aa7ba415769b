"""Tiny real checkpoints for tests and benchmarks (random-init tiny BLIP-2, real save/load path)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .action_spec import METAWORLD_4D, ActionSpec
from .backbone import BackboneConfig
from .checkpoint import save_checkpoint
from .policy import PolicyConfig, VLAPolicy

SAWYER_JOINTS = ["right_j0", "right_j1", "right_j2", "right_j3", "right_j4", "right_j5", "right_j6",
                 "r_close", "l_close"]


def make_tiny_policy(action_spec: ActionSpec = METAWORLD_4D, joint_names=None, seed: int = 0,
                     image_size: int = 64, **cfg_overrides) -> VLAPolicy:
    joint_names = list(joint_names or SAWYER_JOINTS)
    cfg = PolicyConfig(backbone=BackboneConfig(preset="tiny", image_size=image_size, seed=seed),
                       action_spec=action_spec, joint_names=joint_names, **cfg_overrides)
    policy = VLAPolicy(cfg)
    a, s = action_spec.dim, len(joint_names)
    policy.set_normalization(np.zeros(a), np.full(a, 0.5), np.zeros(s), np.ones(s))
    return policy.eval()


def make_tiny_checkpoint(root: Path, action_spec: ActionSpec = METAWORLD_4D, joint_names=None,
                         seed: int = 0, **kw) -> Path:
    """Saves a random-init tiny policy under `root` (and points root/latest at it)."""
    policy = make_tiny_policy(action_spec, joint_names, seed=seed, **kw)
    return save_checkpoint(policy, root, stage="test", iteration=0, metadata={"origin": "make_tiny_checkpoint"})
