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
# IRE_VLA_TEST_DOMAINS=LO-HI confines this run's domain ids to LO..HI (inclusive), so test runs
# started side by side on one machine never share a domain.
_RANGE = os.environ.get("IRE_VLA_TEST_DOMAINS", "")


# Fast DDS computes ports from the domain id and ends the process (exit 1, the reason only on the
# captured stderr) for ids over 232: a bad range must fail here, with its reason.
MAX_DOMAIN_ID = 232


def _domain_range(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(v) for v in text.split("-"))
    except ValueError:
        raise pytest.UsageError(f"IRE_VLA_TEST_DOMAINS={text!r}: expected LO-HI, e.g. 120-140") from None
    if not 0 <= lo <= hi <= MAX_DOMAIN_ID:
        raise pytest.UsageError(f"IRE_VLA_TEST_DOMAINS={text!r}: needs 0 <= LO <= HI <= {MAX_DOMAIN_ID} "
                                f"(Fast DDS ends the process for larger domain ids)")
    return lo, hi


def next_domain_id() -> int:
    """A fresh domain id in 1..101 (or in IRE_VLA_TEST_DOMAINS)."""
    if _RANGE:
        lo, hi = _domain_range(_RANGE)
        return lo + (next(_counter) % (hi - lo + 1))
    return 1 + (_BASE_DOMAIN + next(_counter)) % 101


@pytest.fixture
def ros_domain_id() -> int:
    """A fresh domain id for one test (its nodes and any subprocess it starts)."""
    domain = next_domain_id()
    os.environ["ROS_DOMAIN_ID"] = str(domain)
    return domain


@pytest.fixture
def ros(ros_domain_id):
    """The shared ROS harness (test/ros_harness.py): own context and domain, a single-threaded
    executor spinning in a thread, a probe node; closed after the test."""
    from ros_harness import Harness

    harness = Harness(ros_domain_id)
    try:
        yield harness
    finally:
        harness.close()


def pytest_configure(config):
    if _RANGE:
        _domain_range(_RANGE)  # a bad range stops the run before any test, with its reason
