"""Episode store, datasets and inspection: real HDF5 files in tmp_path (fast, no ROS)."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from ire_vla_ros.episodes import (
    EpisodeError,
    EpisodeWriter,
    read_episode,
    scan_episodes,
)
from ire_vla_ros.episodes import inspect as ep_inspect
from ire_vla_ros.episodes.dataset import (
    EpisodeStepDataset,
    action_statistics,
    collate,
    mixed_dataset,
    mixed_sampler,
)
from ire_vla_ros.vla.action_spec import METAWORLD_4D, ActionSpec

REPO = Path(__file__).resolve().parents[1]
JOINTS = [f"j{i}" for i in range(9)]
H = W = 16


def _step(t: int, rng: np.random.Generator, *, policy: bool = False, cams=("main",)) -> dict:
    d = dict(
        images={c: rng.integers(0, 256, (H, W, 3), dtype=np.uint8) for c in cams},
        joint_positions=rng.normal(size=9).astype(np.float32),
        action=rng.uniform(-1, 1, 4).astype(np.float32),
        reward=float(t),
        timestamp=0.1 * t,
    )
    if policy:
        d.update(log_prob=-1.0 - t, value=0.5 * t)
    return d


def _write(root, *, steps=5, success=True, source="teleop", task="reach", instruction="reach the goal",
           seed=0, **kw) -> Path:
    rng = np.random.default_rng(seed)
    w = EpisodeWriter(root, instruction=instruction, task=task, source=source, action_spec=METAWORLD_4D,
                      joint_names=JOINTS, **kw)
    for t in range(steps):
        w.append(**_step(t, rng))
    return w.finalize(success)


def _reasons(res) -> dict[str, str]:
    return {p.name: r for p, r in res.rejected}


# ---------------------------------------------------------------------------------------------
# store
# ---------------------------------------------------------------------------------------------
def test_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    steps = [_step(t, rng, policy=True, cams=("main", "wrist")) for t in range(7)]
    with EpisodeWriter(tmp_path / "eps", instruction="pick up the cube", task="pick-place", source="rl",
                       action_spec=METAWORLD_4D, joint_names=JOINTS, camera_names=("main", "wrist"),
                       iteration=3, metadata={"seed": 7}) as w:
        assert w.path.name.endswith(".h5.partial") and w.path.exists()
        for s in steps:
            w.append(**s)
        path = w.finalize(True, metadata={"return_note": "ok"})
    assert path.suffix == ".h5" and path.exists()
    assert not list((tmp_path / "eps").glob("*.partial"))
    assert "_rl_" in path.name

    ep = read_episode(path)
    assert (ep.instruction, ep.task, ep.source, ep.success, ep.iteration) == (
        "pick up the cube", "pick-place", "rl", True, 3)
    assert ep.action_spec == METAWORLD_4D and ep.joint_names == JOINTS
    assert ep.metadata == {"seed": 7, "return_note": "ok"}
    assert ep.n_steps == 7
    for cam in ("main", "wrist"):
        assert ep.images[cam].dtype == np.uint8 and ep.images[cam].shape == (7, H, W, 3)
        np.testing.assert_array_equal(ep.images[cam], np.stack([s["images"][cam] for s in steps]))
    np.testing.assert_array_equal(ep.actions, np.stack([s["action"] for s in steps]))
    np.testing.assert_array_equal(ep.joint_positions, np.stack([s["joint_positions"] for s in steps]))
    np.testing.assert_allclose(ep.rewards, np.arange(7))
    np.testing.assert_allclose(ep.timestamps, 0.1 * np.arange(7))
    np.testing.assert_allclose(ep.log_probs, [-1.0 - t for t in range(7)])
    np.testing.assert_allclose(ep.values, [0.5 * t for t in range(7)])
    assert ep.total_return == pytest.approx(21.0)
    assert ep.actions.dtype == np.float32 and ep.joint_positions.dtype == np.float32

    with h5py.File(path, "r") as f:
        assert f.attrs["complete"] and int(f.attrs["format_version"]) == 1 and int(f.attrs["n_steps"]) == 7
        d = f["observations/images/main"]
        assert d.chunks == (1, H, W, 3) and d.compression in ("lzf", "gzip") and d.maxshape[0] is None

    light = read_episode(path, load_images=False)
    assert light.images == {} and light.n_steps == 7

    res = scan_episodes(tmp_path)
    assert res.episodes == [path] and res.rejected == []


def test_names_unique_sortable_and_scan_filters(tmp_path):
    a = _write(tmp_path / "a" / "deep", source="teleop", task="reach", success=True)
    b = _write(tmp_path / "a", source="policy", task="push", success=False)
    c = _write(tmp_path, source="rl", task="reach", success=False, iteration=2)
    assert len({a.name, b.name, c.name}) == 3
    assert sorted([a.name, b.name, c.name]) == [a.name, b.name, c.name]  # time-ordered names
    assert set(scan_episodes(tmp_path).episodes) == {a, b, c}  # recursive
    assert scan_episodes(tmp_path, sources=["rl"]).episodes == [c]
    assert set(scan_episodes(tmp_path, tasks="reach").episodes) == {a, c}
    assert scan_episodes(tmp_path, successful_only=True).episodes == [a]
    assert scan_episodes(tmp_path / "missing").episodes == []
    with pytest.raises(ValueError):
        scan_episodes(tmp_path, sources=["human"])


def test_writer_argument_validation(tmp_path):
    kw = dict(task="t", action_spec=METAWORLD_4D, joint_names=JOINTS)
    with pytest.raises(ValueError, match="source"):
        EpisodeWriter(tmp_path, instruction="x", source="human", **kw)
    with pytest.raises(ValueError, match="instruction"):
        EpisodeWriter(tmp_path, instruction="  ", source="rl", **kw)
    assert not list(tmp_path.iterdir())
    w = EpisodeWriter(tmp_path, instruction="x", source="rl", name="fixed", **kw)
    with pytest.raises(FileExistsError):
        EpisodeWriter(tmp_path, instruction="x", source="rl", name="fixed", **kw)
    w.abort()
    assert not list(tmp_path.iterdir())


def test_zero_step_finalize_and_context_abort(tmp_path):
    w = EpisodeWriter(tmp_path, instruction="x", task="t", source="rl", action_spec=METAWORLD_4D, joint_names=JOINTS)
    with pytest.raises(EpisodeError, match="zero steps"):
        w.finalize(True)
    assert not list(tmp_path.iterdir())

    rng = np.random.default_rng(0)
    with pytest.raises(RuntimeError, match="boom"):
        with EpisodeWriter(tmp_path, instruction="x", task="t", source="rl", action_spec=METAWORLD_4D,
                           joint_names=JOINTS) as w:
            w.append(**_step(0, rng))
            raise RuntimeError("boom")
    assert not list(tmp_path.iterdir())  # exception -> abort -> partial removed


def test_append_validation_keeps_earlier_steps(tmp_path):
    rng = np.random.default_rng(0)
    w = EpisodeWriter(tmp_path, instruction="reach", task="reach", source="policy", action_spec=METAWORLD_4D,
                      joint_names=JOINTS)
    good = [_step(t, rng) for t in range(3)]
    for s in good:
        w.append(**s)

    def bad(**over):
        s = _step(9, rng)
        s.update(over)
        return s

    with pytest.raises(ValueError, match=r"action contains NaN/inf"):
        w.append(**bad(action=np.array([0.1, np.nan, 0.0, 1.0], np.float32)))
    with pytest.raises(ValueError, match=r"joint_positions contains NaN/inf"):
        w.append(**bad(joint_positions=np.full(9, np.inf)))
    with pytest.raises(ValueError, match="uint8"):
        w.append(**bad(images={"main": np.zeros((H, W, 3), np.float32)}))
    with pytest.raises(ValueError, match="first frame"):
        w.append(**bad(images={"main": np.zeros((H + 1, W, 3), np.uint8)}))
    with pytest.raises(ValueError, match="length 3, expected 4"):
        w.append(**bad(action=np.zeros(3)))
    with pytest.raises(ValueError, match="length 8, expected 9"):
        w.append(**bad(joint_positions=np.zeros(8)))
    with pytest.raises(ValueError, match="missing cameras"):
        w.append(**bad(images={"wrist": np.zeros((H, W, 3), np.uint8)}))
    with pytest.raises(ValueError, match="every step or for none"):
        w.append(**bad(log_prob=-1.0, value=0.0))
    assert w.n_steps == 3

    w.append(**good[0])  # still usable after rejected steps
    path = w.finalize(False)
    ep = read_episode(path)
    assert ep.n_steps == 4
    np.testing.assert_array_equal(ep.actions[:3], np.stack([s["action"] for s in good]))
    assert np.isfinite(ep.actions).all()


# ---------------------------------------------------------------------------------------------
# crashes and damaged files
# ---------------------------------------------------------------------------------------------
def test_crash_mid_episode_leaves_only_partial(tmp_path):
    good = _write(tmp_path, seed=1)
    script = textwrap.dedent(f"""
        import os, numpy as np
        from ire_vla_ros.episodes import EpisodeWriter
        from ire_vla_ros.vla.action_spec import METAWORLD_4D
        w = EpisodeWriter({str(tmp_path)!r}, instruction="reach", task="reach", source="rl",
                          action_spec=METAWORLD_4D, joint_names=[f"j{{i}}" for i in range(9)])
        for t in range(20):
            w.append(images={{"main": np.zeros(({H}, {W}, 3), np.uint8)}}, joint_positions=np.zeros(9),
                     action=np.zeros(4), reward=0.0, timestamp=float(t))
        os._exit(3)  # killed mid-episode: no finalize, no close, no atexit
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, timeout=120)
    assert proc.returncode == 3, proc.stderr.decode()

    # also: a writer dropped without finalize (garbage-collected) behaves like a crash
    rng = np.random.default_rng(0)
    w = EpisodeWriter(tmp_path / "sub", instruction="reach", task="reach", source="teleop",
                      action_spec=METAWORLD_4D, joint_names=JOINTS)
    w.append(**_step(0, rng))
    del w

    partials = sorted(tmp_path.rglob("*.h5.partial"))
    assert len(partials) == 2
    assert sorted(tmp_path.rglob("*.h5")) == [good]

    records = []

    class ListLogger:
        def warning(self, msg, *args):
            records.append(msg % args)

    res = scan_episodes(tmp_path, logger=ListLogger())
    assert res.episodes == [good]
    assert sorted(p for p, _ in res.rejected) == partials
    assert all("incomplete" in r for _, r in res.rejected)
    assert len(records) == 2 and all("incomplete" in r for r in records)
    assert sorted(res.incomplete) == partials

    for p in partials:
        with pytest.raises(EpisodeError, match="incomplete"):
            read_episode(p)

    text, n_bad = ep_inspect.validate(tmp_path)
    assert n_bad == 2
    for p in partials:
        assert p.name in text
    listing = ep_inspect.list_table(tmp_path)
    assert good.name[:-3] in listing and "partial" not in listing.split("\n")[1]
    assert "2 file(s) rejected" in listing


def test_truncated_file_rejected_others_still_load(tmp_path, caplog):
    ok1 = _write(tmp_path, seed=1, steps=6)
    bad = _write(tmp_path, seed=2, steps=6)
    ok2 = _write(tmp_path, seed=3, steps=6)
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) - 300])

    with pytest.raises(EpisodeError, match=r"unreadable/truncated HDF5 file.*truncated"):
        read_episode(bad)
    with caplog.at_level(logging.WARNING, logger="ire_vla_ros.episodes.store"):
        res = scan_episodes(tmp_path)
    assert res.episodes == [ok1, ok2]
    assert [p for p, _ in res.rejected] == [bad]
    assert "truncated" in res.rejected[0][1]
    assert bad.name in caplog.text
    assert read_episode(ok1).n_steps == 6 and read_episode(ok2).n_steps == 6

    # a file cut in half, and a non-HDF5 file, are rejected too
    bad.write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.h5").write_bytes(b"not an hdf5 file at all")
    res = scan_episodes(tmp_path, logger=logging.getLogger("quiet-test"))
    assert set(_reasons(res)) == {bad.name, "junk.h5"}
    text, n_bad = ep_inspect.validate(tmp_path)
    assert n_bad == 2 and "junk.h5" in text and bad.name in text
    assert "INVALID" in ep_inspect.show(bad)


def test_corrupted_image_chunk_detected_by_deep_validate(tmp_path):
    path = _write(tmp_path, steps=4)
    with h5py.File(path, "r") as f:
        info = f["observations/images/main"].id.get_chunk_info(2)
    raw = bytearray(path.read_bytes())
    for k in range(info.byte_offset + 5, info.byte_offset + 25):
        raw[k] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert scan_episodes(tmp_path).episodes == [path]  # the cheap scan does not decode images
    with pytest.raises(EpisodeError, match="images/main"):
        read_episode(path)
    _, n_bad = ep_inspect.validate(tmp_path)  # validate does
    assert n_bad == 1


def test_nan_action_in_file_rejected(tmp_path):
    path = _write(tmp_path, steps=5)
    with h5py.File(path, "r+") as f:
        f["action"][3, 1] = np.nan
    with pytest.raises(EpisodeError, match=r"NaN/inf in actions.*steps \[3\]"):
        read_episode(path)
    res = scan_episodes(tmp_path, logger=logging.getLogger("quiet-test"))
    assert res.episodes == [] and "NaN/inf in actions" in res.rejected[0][1]


@pytest.mark.parametrize("instruction", [None, "", "   "])
def test_instructionless_episode_rejected(tmp_path, instruction):
    path = _write(tmp_path)
    with h5py.File(path, "r+") as f:
        if instruction is None:
            del f.attrs["instruction"]
        else:
            f.attrs["instruction"] = instruction
    with pytest.raises(EpisodeError, match="instruction"):
        read_episode(path)
    assert "instruction" in scan_episodes(tmp_path, logger=logging.getLogger("q")).rejected[0][1]


def _damage(path: Path, how: str) -> None:
    with h5py.File(path, "r+") as f:
        if how == "missing":
            del f["reward"]
        elif how == "length":
            f["reward"].resize(3, axis=0)
        elif how == "incomplete":
            f.attrs["complete"] = False
        elif how == "zero":
            for name in ("action", "reward", "timestamp", "observations/joint_positions", "observations/images/main"):
                f[name].resize(0, axis=0)
            f.attrs["n_steps"] = 0


@pytest.mark.parametrize("how,reason", [
    ("missing", "missing dataset '/reward'"),
    ("length", "mismatched dataset lengths"),
    ("incomplete", "not complete"),
    ("zero", "zero steps"),
])
def test_bad_files_rejected_with_reason(tmp_path, how, reason):
    path = _write(tmp_path)
    _damage(path, how)
    with pytest.raises(EpisodeError, match=reason):
        read_episode(path)
    res = scan_episodes(tmp_path, logger=logging.getLogger("q"))
    assert res.episodes == [] and reason in res.rejected[0][1]


def test_show_and_list(tmp_path):
    path = _write(tmp_path, steps=4, success=True, iteration=2)
    s = ep_inspect.show(path)
    assert "reach the goal" in s and "steps: 4" in s and "return: 6.0000" in s and "success: True" in s
    assert "/observations/images/main: (4, 16, 16, 3) uint8" in s
    table = ep_inspect.list_table(tmp_path)
    line = table.splitlines()[1].split()
    assert line[0] == path.name[:-3] and line[1:6] == ["reach", "teleop", "yes", "4", "2"]
    assert ep_inspect.validate(tmp_path)[1] == 0


# ---------------------------------------------------------------------------------------------
# datasets
# ---------------------------------------------------------------------------------------------
def test_step_dataset_and_collate(tmp_path):
    p1 = _write(tmp_path, steps=3, seed=1, instruction="first")
    p2 = _write(tmp_path, steps=4, seed=2, instruction="second", source="rl")
    ds = EpisodeStepDataset([p1, p2], camera="main")
    assert len(ds) == 7 and ds.n_episodes == 2
    item = ds[4]
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (H, W, 3)
    assert item["state"].dtype == torch.float32 and item["state"].shape == (9,)
    assert item["action"].dtype == torch.float32 and item["action"].shape == (4,)
    assert (item["instruction"], item["episode"], item["step"], item["source"]) == ("second", 1, 1, "rl")
    np.testing.assert_array_equal(item["action"].numpy(), read_episode(p2).actions[1])
    batch = next(iter(DataLoader(ds, batch_size=5, collate_fn=collate)))
    assert batch["image"].shape == (5, H, W, 3) and batch["action"].shape == (5, 4)
    assert batch["instruction"] == ["first"] * 3 + ["second"] * 2
    assert batch["episode"].tolist() == [0, 0, 0, 1, 1]
    with pytest.raises(EpisodeError):
        EpisodeStepDataset([p1], camera="wrist")
    assert len(EpisodeStepDataset([])) == 0


def test_mixing_ratio(tmp_path):
    expert = EpisodeStepDataset([_write(tmp_path / "e", steps=30, seed=s) for s in range(3)])  # 90 steps
    online = EpisodeStepDataset([_write(tmp_path / "o", steps=10, seed=9, source="rl")])      # 10 steps
    for frac in (0.5, 0.2, 0.9):
        ds, sampler = mixed_dataset(expert, online, online_fraction=frac, num_samples=20000, seed=0)
        idx = np.fromiter(iter(sampler), dtype=np.int64)
        got = float(np.mean(idx >= len(expert)))
        assert abs(got - frac) < 0.02, (frac, got)  # ~6 sigma
        assert len(np.unique(idx[idx >= len(expert)])) == len(online)  # uniform within online part
    loader = DataLoader(ds, batch_size=64, sampler=sampler, collate_fn=collate)
    b = next(iter(loader))
    assert b["image"].shape[0] == 64 and set(b["source"]) <= {"teleop", "rl"}

    # no online data -> all expert; reproducible with a seed
    s0 = list(mixed_sampler(len(expert), 0, online_fraction=0.5, num_samples=500, seed=1))
    assert max(s0) < len(expert)
    assert s0 == list(mixed_sampler(len(expert), 0, online_fraction=0.5, num_samples=500, seed=1))
    ds0, smp0 = mixed_dataset(expert, None, online_fraction=0.7, num_samples=100, seed=0)
    assert len(ds0) == len(expert) and max(smp0) < len(expert)
    with pytest.raises(ValueError):
        mixed_sampler(10, 10, online_fraction=1.5)
    with pytest.raises(ValueError):
        mixed_sampler(0, 0)


def test_action_statistics(tmp_path):
    ds = EpisodeStepDataset([_write(tmp_path, steps=8, seed=s) for s in range(2)])
    mean, std = action_statistics(ds)
    assert mean.dtype == np.float32 and std.dtype == np.float32 and mean.shape == (4,)
    assert np.all(std > 0) and np.all(np.abs(mean) <= 1.0)  # random actions in [-1, 1]

    # hand-computed: two steps per column -> mean is the midpoint, (population) std the half-distance
    a = np.array([[1.0, -1.0, 0.0, 0.5], [3.0, 1.0, 0.0, 0.5]], np.float32)
    m1, s1 = action_statistics(a)
    np.testing.assert_allclose(m1, [2.0, 0.0, 0.0, 0.5])
    np.testing.assert_allclose(s1, [1.0, 1.0, 1e-3, 1e-3])  # constant columns floored

    const = np.tile(np.array([[0.3, -1.0, 0.0, 1.0]], np.float32), (5, 1))
    m2, s2 = action_statistics(const, np.empty((0, 4), np.float32))
    np.testing.assert_allclose(m2, const[0])
    np.testing.assert_allclose(s2, 1e-3)  # floored

    # several sources pooled step by step (not averaged per source): 2 steps of a + 2 of b
    b = np.array([[5.0, 3.0, 0.0, 0.5], [7.0, 5.0, 0.0, 0.5]], np.float32)
    m3, s3 = action_statistics(a, b)
    np.testing.assert_allclose(m3, [4.0, 2.0, 0.0, 0.5])
    np.testing.assert_allclose(s3, [np.sqrt(5.0), np.sqrt(5.0), 1e-3, 1e-3], rtol=1e-6)
    with pytest.raises(ValueError):
        action_statistics(np.empty((0, 4)))


def test_step_info_round_trip_and_validation(tmp_path):
    w = EpisodeWriter(tmp_path, instruction="x", task="t", source="policy", action_spec=METAWORLD_4D,
                      joint_names=["a", "b"])
    img = np.zeros((4, 4, 3), np.uint8)
    step = dict(images={"main": img}, joint_positions=[0.0, 1.0], action=np.zeros(4), reward=0, timestamp=0)
    w.append(**step, step_info={"joint_stamp_error_s": 0.002, "intervention": 0.0})
    with pytest.raises(ValueError, match="differ from the first step"):
        w.append(**step, step_info={"joint_stamp_error_s": 0.001})
    with pytest.raises(ValueError, match="not finite"):
        w.append(**step, step_info={"joint_stamp_error_s": float("nan"), "intervention": 0.0})
    w.append(**step, step_info={"joint_stamp_error_s": 0.004, "intervention": 1.0})
    ep = read_episode(w.finalize(True))
    assert ep.n_steps == 2 and sorted(ep.step_info) == ["intervention", "joint_stamp_error_s"]
    np.testing.assert_allclose(ep.step_info["joint_stamp_error_s"], [0.002, 0.004])
    assert ep.step_info["intervention"].tolist() == [0.0, 1.0]
    assert "step_info/joint_stamp_error_s min/mean/max: 0.002 / 0.003 / 0.004" in ep_inspect.show(ep.path)


def test_action_spec_roundtrip_7d(tmp_path):
    spec = ActionSpec(names=tuple("abcdefg"), low=(-1.0,) * 7, high=(1.0,) * 7, translation_scale_m=0.02,
                      extra={"frame": "base"})
    w = EpisodeWriter(tmp_path, instruction="x", task="t", source="teleop", action_spec=spec.to_dict(),
                      joint_names=["a", "b"])
    w.append(images={"main": np.zeros((4, 4, 3), np.uint8)}, joint_positions=[0.0, 1.0], action=np.zeros(7),
             reward=0, timestamp=0)
    ep = read_episode(w.finalize(True))
    assert ep.action_spec == spec


def test_rows_written_in_blocks_read_back_exactly(tmp_path):
    """The small per-step rows are buffered and written in blocks of _ROW_CHUNK steps: a length
    that is not a multiple of the block (two full blocks + a remainder), a flush in the middle,
    policy scalars and step_info all read back step for step."""
    from ire_vla_ros.episodes.store import _ROW_CHUNK

    n = 2 * _ROW_CHUNK + 37
    rng = np.random.default_rng(7)
    steps = [_step(t, rng, policy=True) for t in range(n)]
    w = EpisodeWriter(tmp_path, instruction="reach the goal", task="reach", source="rl",
                      action_spec=METAWORLD_4D, joint_names=JOINTS)
    for t, st in enumerate(steps):
        w.append(**st, step_info={"intervention": float(t % 3 == 0)})
        if t == _ROW_CHUNK + 5:
            w.flush()  # writes a partial block: the next block must continue right after it
    ep = read_episode(w.finalize(True))
    assert len(ep.actions) == n
    np.testing.assert_array_equal(ep.actions, np.stack([s["action"] for s in steps]))
    np.testing.assert_array_equal(ep.joint_positions, np.stack([s["joint_positions"] for s in steps]))
    np.testing.assert_array_equal(ep.rewards, np.array([s["reward"] for s in steps], np.float32))
    np.testing.assert_array_equal(ep.timestamps, np.array([s["timestamp"] for s in steps]))
    np.testing.assert_array_equal(ep.log_probs, np.array([s["log_prob"] for s in steps], np.float32))
    np.testing.assert_array_equal(ep.step_info["intervention"], np.array([t % 3 == 0 for t in range(n)], np.float32))
    np.testing.assert_array_equal(ep.images["main"][-1], steps[-1]["images"]["main"])
