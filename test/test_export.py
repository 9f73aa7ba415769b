"""`ire-vla episodes export --format mcap|lerobot` and `import --format lerobot`: real files, read back."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from ire_vla_ros.cli import main as cli_main
from ire_vla_ros.episodes.bag_import import BagImportConfig, action_from_twist, import_bag, read_bag_messages
from ire_vla_ros.episodes.lerobot import LeRobotFormatError, export_lerobot, import_lerobot
from ire_vla_ros.episodes.mcap_export import export_mcap
from ire_vla_ros.episodes.store import EpisodeWriter, read_episode, scan_episodes
from ire_vla_ros.vla.action_spec import EE_DELTA_7D

H, W = 48, 64
JOINTS = ["shoulder", "elbow", "wrist"]


def _image(i: int, ep: int) -> np.ndarray:
    """Smooth, moving content (what a camera sees), so video compression stays near-lossless."""
    y, x = np.mgrid[0:H, 0:W].astype(np.float32)
    img = np.stack([128 + 80 * np.sin((x + 3 * i) / 9.0 + ep), 128 + 80 * np.cos((y - 2 * i) / 7.0),
                    np.full_like(x, 60 + 20 * ep)], axis=-1)
    return img.clip(0, 255).astype(np.uint8)


def _store(root: Path, n_eps: int = 2, steps: int = 9, spacing_s: float = 50.0) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for e in range(n_eps):
        policy = e == 1
        with EpisodeWriter(root, instruction=f"task number {e % 2}", task=f"t{e % 2}",
                           source="policy" if policy else "teleop", action_spec=EE_DELTA_7D, joint_names=JOINTS,
                           iteration=e, metadata={"control_rate_hz": 10.0}) as w:
            for i in range(steps + e):
                a = rng.uniform(-1, 1, EE_DELTA_7D.dim).astype(np.float32)
                w.append(images={"main": _image(i, e)}, joint_positions=rng.normal(size=3).astype(np.float32),
                         action=a, reward=float(i == steps + e - 1), timestamp=1000.0 + spacing_s * e + 0.1 * i,
                         **({"log_prob": -1.5 + i, "value": 0.25 * i} if policy else {}))
            paths.append(w.finalize(success=e == 0))
    return paths


def test_mcap_per_episode_reads_back_with_rosbags(tmp_path):
    paths = _store(tmp_path / "store")
    files = export_mcap(tmp_path / "store", tmp_path / "mcap")
    assert sorted(f.name for f in files) == sorted(p.name.replace(".h5", ".mcap") for p in paths)
    assert not list((tmp_path / "mcap").glob(".*"))  # no temp dirs left
    for p in paths:
        ep = read_episode(p)
        msgs = list(read_bag_messages(tmp_path / "mcap" / p.name.replace(".h5", ".mcap")))
        by = {}
        for topic, msgtype, t, msg in msgs:
            by.setdefault(topic, []).append((msgtype, t, msg))
        assert {k: v[0][0] for k, v in by.items()} == {
            "/camera/main/image_raw": "sensor_msgs/msg/Image", "/joint_states": "sensor_msgs/msg/JointState",
            "/servo_node/delta_twist_cmds": "geometry_msgs/msg/TwistStamped", "/gripper/command": "std_msgs/msg/Float64",
            "/ire_vla/action": "sensor_msgs/msg/JointState", "/ire_vla/reward": "std_msgs/msg/Float32",
            "/ire_vla/instruction": "std_msgs/msg/String", "/ire_vla/episode": "std_msgs/msg/String",
            "/ire_vla/success": "std_msgs/msg/Bool"}
        assert len(by["/camera/main/image_raw"]) == ep.n_steps
        for i, (_, t, m) in enumerate(by["/camera/main/image_raw"]):
            assert m.encoding == "rgb8" and (m.height, m.width) == (H, W)
            np.testing.assert_array_equal(np.asarray(m.data).reshape(H, W, 3), ep.images["main"][i])
            assert t == round(ep.timestamps[i] * 1e9) == m.header.stamp.sec * 10**9 + m.header.stamp.nanosec
        for i, (_, _, m) in enumerate(by["/servo_node/delta_twist_cmds"]):
            tw = m.twist
            grip = by["/gripper/command"][i][2].data
            back = action_from_twist([tw.linear.x, tw.linear.y, tw.linear.z],
                                     [tw.angular.x, tw.angular.y, tw.angular.z], 10.0, EE_DELTA_7D, grip)
            np.testing.assert_allclose(back, ep.actions[i], atol=1e-5)
        js = [m for _, _, m in by["/joint_states"]]
        np.testing.assert_allclose(np.stack([m.position for m in js]), ep.joint_positions, atol=1e-6)
        assert list(js[0].name) == JOINTS
        act = [m for _, _, m in by["/ire_vla/action"]]
        assert list(act[0].name) == list(EE_DELTA_7D.names) + (["log_prob", "value"] if ep.log_probs is not None else [])
        np.testing.assert_allclose(np.stack([m.position[:7] for m in act]), ep.actions, atol=1e-6)
        np.testing.assert_allclose([m.data for _, _, m in by["/ire_vla/reward"]], ep.rewards)
        assert by["/ire_vla/success"][0][2].data == ep.success
        assert by["/ire_vla/instruction"][0][2].data == ep.instruction


def test_mcap_selection_file_splits_back_with_import_bag(tmp_path):
    paths = _store(tmp_path / "store", n_eps=3, spacing_s=0.0)  # overlapping times: the export lays them apart
    rc = cli_main(["episodes", "export", str(tmp_path / "store"), "--format", "mcap", "--out", str(tmp_path / "x"),
                   "--single", "all.mcap"])
    assert rc == 0
    cfg = BagImportConfig(camera_topic="/camera/main/image_raw", success_topic="/ire_vla/success",
                          instruction_topic="/ire_vla/instruction", segment="marker", marker_topic="/ire_vla/episode",
                          control_rate_hz=10.0)
    res = import_bag(tmp_path / "x" / "all.mcap", tmp_path / "back", cfg)
    back = sorted((read_episode(p) for p in res.episodes), key=lambda e: e.timestamps[0])
    orig = [read_episode(p) for p in paths]
    assert all(b.timestamps[0] - a.timestamps[-1] >= 1.0 for a, b in zip(back, back[1:]))
    assert [e.n_steps for e in back] == [e.n_steps for e in orig]
    for b, o in zip(back, orig):
        np.testing.assert_allclose(b.actions, o.actions, atol=1e-5)
        np.testing.assert_allclose(b.joint_positions, o.joint_positions, atol=1e-6)
        np.testing.assert_array_equal(b.images["main"], o.images["main"])
        assert (b.instruction, b.success, b.source) == (o.instruction, o.success, "teleop")


def test_lerobot_round_trip(tmp_path):
    paths = _store(tmp_path / "store", n_eps=3)
    root = export_lerobot(tmp_path / "store", tmp_path / "lr")
    for rel in ("meta/info.json", "meta/stats.json", "meta/tasks.parquet", "meta/episodes/chunk-000/file-000.parquet",
                "data/chunk-000/file-000.parquet", "videos/observation.images.main/chunk-000/file-000.mp4"):
        assert (root / rel).is_file(), rel
    info = json.loads((root / "meta/info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["total_episodes"] == 3 and info["total_tasks"] == 2
    assert info["total_frames"] == sum(read_episode(p).n_steps for p in paths)
    assert info["features"]["observation.images.main"]["dtype"] == "video"
    assert info["features"]["action"]["names"] == list(EE_DELTA_7D.names)
    tasks = pq.read_table(root / "meta/tasks.parquet")
    assert tasks.column("task").to_pylist() == ["task number 0", "task number 1"]
    assert json.loads(tasks.schema.metadata[b"pandas"])["index_columns"] == ["task"]
    eps = pq.read_table(root / "meta/episodes/chunk-000/file-000.parquet").to_pylist()
    assert [e["dataset_to_index"] - e["dataset_from_index"] for e in eps] == [e["length"] for e in eps]
    stats = json.loads((root / "meta/stats.json").read_text())
    assert len(stats["action"]["mean"]) == 7 and np.asarray(stats["observation.images.main"]["mean"]).shape == (3, 1, 1)

    rc = cli_main(["episodes", "import", str(root), "--format", "lerobot", "--out", str(tmp_path / "back")])
    assert rc == 0
    back = {read_episode(p).metadata["exported_name"]: read_episode(p) for p in scan_episodes(tmp_path / "back").episodes}
    assert len(back) == 3
    for p in paths:
        o = read_episode(p)
        b = back[o.name]
        assert b.n_steps == o.n_steps
        assert (b.instruction, b.task, b.source, b.success, b.iteration) == (o.instruction, o.task, o.source, o.success, o.iteration)
        np.testing.assert_array_equal(b.actions, o.actions)
        np.testing.assert_array_equal(b.joint_positions, o.joint_positions)
        np.testing.assert_array_equal(b.rewards, o.rewards)
        assert b.action_spec == o.action_spec and b.joint_names == o.joint_names
        err = np.abs(b.images["main"].astype(np.int16) - o.images["main"].astype(np.int16))
        # codec tolerance (h264 crf 18, yuv420p): mean abs error per frame < 3 grey levels
        assert err.reshape(o.n_steps, -1).mean(1).max() < 3.0, err.mean()
    # one episode from the middle of the shared video file: frames found by its from_timestamp
    (only,) = import_lerobot(root, tmp_path / "only", episodes=[2])
    b, o = read_episode(only), read_episode(paths[2])
    assert b.metadata["exported_name"] == o.name
    err = np.abs(b.images["main"].astype(np.int16) - o.images["main"].astype(np.int16))
    assert err.reshape(o.n_steps, -1).mean(1).max() < 3.0


def test_lerobot_multi_file_layout_round_trip(tmp_path):
    """Size limits reached after every episode: one data file and one video file per episode
    (file-000, file-001, ...), read back by the chunk/file indices and video offsets."""
    paths = _store(tmp_path / "store", n_eps=3)
    root = export_lerobot(tmp_path / "store", tmp_path / "lr", data_file_size_mb=0, video_file_size_mb=0)
    assert len(list((root / "data/chunk-000").glob("file-*.parquet"))) == 3
    assert len(list((root / "videos/observation.images.main/chunk-000").glob("file-*.mp4"))) == 3
    eps = pq.read_table(root / "meta/episodes/chunk-000/file-000.parquet").to_pylist()
    assert [e["data/file_index"] for e in eps] == [0, 1, 2]
    assert [e["videos/observation.images.main/from_timestamp"] for e in eps] == [0.0, 0.0, 0.0]
    back = {read_episode(p).metadata["exported_name"]: read_episode(p) for p in import_lerobot(root, tmp_path / "b")}
    for p in paths:
        o = read_episode(p)
        b = back[o.name]
        np.testing.assert_array_equal(b.actions, o.actions)
        err = np.abs(b.images["main"].astype(np.int16) - o.images["main"].astype(np.int16))
        assert err.reshape(o.n_steps, -1).mean(1).max() < 3.0


def test_lerobot_refuses_bad_input(tmp_path, capsys):
    _store(tmp_path / "store", n_eps=1)
    root = export_lerobot(tmp_path / "store", tmp_path / "lr")
    with pytest.raises(FileExistsError):
        export_lerobot(tmp_path / "store", tmp_path / "lr")
    info = json.loads((root / "meta/info.json").read_text())
    info["codebase_version"] = "v2.1"
    (root / "meta/info.json").write_text(json.dumps(info))
    with pytest.raises(LeRobotFormatError, match="v2.1"):
        import_lerobot(root, tmp_path / "back")
    info["codebase_version"] = "v3.0"
    (root / "meta/info.json").write_text(json.dumps(info))
    (root / "videos/observation.images.main/chunk-000/file-000.mp4").unlink()
    rc = cli_main(["episodes", "import", str(root), "--format", "lerobot", "--out", str(tmp_path / "back")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "video file missing" in err
    assert not (tmp_path / "back").exists() or not any((tmp_path / "back").rglob("*.h5*"))
