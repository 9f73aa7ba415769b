"""Shared test set-up: offscreen rendering and DDS confined to this machine.

Every ROS 2 participant in the tests runs with ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST and a
domain id of its own (`ros_domain_id` fixture), so parallel runs and other sessions never see
each other and no DDS packet leaves loopback.
"""
from __future__ import annotations

import os
import random

import pytest

os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

_BASE_DOMAIN = int(os.environ.get("ROS_DOMAIN_ID", random.randint(1, 60)))
_counter = iter(range(10_000))


@pytest.fixture
def ros_domain_id() -> int:
    """A fresh domain id in 1..101 for one test (its nodes and any subprocess it starts)."""
    domain = 1 + (_BASE_DOMAIN + next(_counter)) % 101
    os.environ["ROS_DOMAIN_ID"] = str(domain)
    return domain
