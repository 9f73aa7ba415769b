"""Sim RL keeps its successful episodes through a writer child process: a full disk costs the
episodes it cannot write (counted), never the training process or the episodes already written."""
from __future__ import annotations

import numpy as np
import pytest

from ire_vla_ros.episodes.store import read_episode, scan_episodes
from ire_vla_ros.training.config import PPOConfig
from ire_vla_ros.training.rollout import EpisodeRecord, RolloutCollector

from test_disk_full import _fill, small_disk  # noqa: F401  (the tmpfs fixture)


class _Env:
    """What _EpisodeBookkeeping reads from an env at an episode's end (a real env renders for
    seconds; this one has the real action spec and joint names of the Metaworld wrapper)."""

    def __init__(self):
        from ire_vla_ros.vla.action_spec import METAWORLD_4D

        self.instruction, self.task = "press the button from the top", "button-press-topdown-v3"
        self.action_spec, self.joint_names = METAWORLD_4D, [f"hand_{a}" for a in "xyz"] + ["gripper"]


def _record(steps: int, rng) -> EpisodeRecord:
    rec = EpisodeRecord()
    for _ in range(steps):
        rec.images.append(rng.integers(0, 256, size=(120, 160, 3), dtype=np.uint8))  # incompressible
        rec.states.append(rng.normal(size=4).astype(np.float32))
        rec.actions.append(rng.uniform(-1, 1, size=4).astype(np.float32))
        rec.rewards.append(0.0)
    return rec


def _bookkeeping(root) -> RolloutCollector:
    keeper = RolloutCollector([], PPOConfig(), episode_root=root, iteration=1)  # the bookkeeping, no envs
    keeper.records = [None]  # one env slot, filled by each test
    keeper.min_free_mb = 0.5
    return keeper


def test_successful_episodes_are_written_by_a_child_and_read_back(tmp_path):
    keeper, env, rng = _bookkeeping(tmp_path), _Env(), np.random.default_rng(0)
    try:
        for success in (True, False, True):
            keeper.records[0] = _record(3, rng)
            keeper._finish_episode(0, env, success)
        assert keeper._writers is not None and keeper._writers.pid is not None  # a child wrote them
    finally:
        keeper.close()
    assert len(keeper.saved) == 2 and keeper.write_failures == 0 and keeper.successes == 2
    for path in keeper.saved:
        ep = read_episode(path)
        assert ep.n_steps == 3 and ep.source == "rl" and ep.success and ep.iteration == 1


def test_a_full_disk_is_counted_and_training_goes_on(small_disk):  # noqa: F811
    disk = small_disk(6)
    keeper, env, rng = _bookkeeping(disk), _Env(), np.random.default_rng(1)
    try:
        keeper.records[0] = _record(3, rng)
        keeper._finish_episode(0, env, True)
        assert len(keeper.saved) == 1
        _fill(disk, 300_000)  # under min_free_mb (0.5 MB): refused up front
        keeper.records[0] = _record(3, rng)
        keeper._finish_episode(0, env, True)
        (disk / "filler.bin").unlink()
        _fill(disk, 800_000)  # above the margin, but the episode (~0.9 MB) does not fit: ENOSPC mid-write
        keeper.records[0] = _record(16, rng)
        keeper._finish_episode(0, env, True)
    finally:
        keeper.close()
    assert keeper.write_failures == 2 and keeper.successes == 3 and keeper.episodes_done == 3
    assert len(keeper.saved) == 1 and read_episode(keeper.saved[0]).n_steps == 3  # the first one intact
    scan = scan_episodes(disk)
    assert len(scan.episodes) == 1 and not scan.rejected and not scan.incomplete  # no partial left behind
