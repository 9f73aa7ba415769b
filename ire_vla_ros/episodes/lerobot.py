"""Episode store <-> LeRobotDataset v3.0 (parquet + per-camera MP4 + meta/), without the lerobot package.

`ire-vla episodes export --format lerobot STORE --out DIR` and
`ire-vla episodes import --format lerobot DIR --out STORE`. The lerobot package pins an older torch
and cannot share this venv, so the layout is written from the format as LeRobot's repository
defines it (huggingface/lerobot):

* `src/lerobot/datasets/utils.py`: CODEBASE_VERSION-independent constants `INFO_PATH =
  "meta/info.json"`, `STATS_PATH = "meta/stats.json"`, `EPISODES_DIR = "meta/episodes"`,
  `DEFAULT_TASKS_PATH = "meta/tasks.parquet"`, `CHUNK_FILE_PATTERN =
  "chunk-{chunk_index:03d}/file-{file_index:03d}"`, `DEFAULT_DATA_PATH`, `DEFAULT_VIDEO_PATH =
  "videos/{video_key}/" + CHUNK_FILE_PATTERN + ".mp4"`, `DEFAULT_CHUNK_SIZE = 1000`,
  `DEFAULT_DATA_FILE_SIZE_IN_MB = 100`, `DEFAULT_VIDEO_FILE_SIZE_IN_MB = 500`, `DEFAULT_FEATURES`
  (timestamp float32, frame_index / episode_index / index / task_index int64) and
  `create_empty_dataset_info` (the keys of info.json: codebase_version, robot_type,
  total_episodes, total_frames, total_tasks, chunks_size, data_files_size_in_mb,
  video_files_size_in_mb, fps, splits, data_path, video_path, features);
  `write_tasks` (tasks.parquet: a frame indexed by the task string with a `task_index` column).
* `src/lerobot/datasets/lerobot_dataset.py` (CODEBASE_VERSION = "v3.0"): several episodes per
  data/video file; the per-episode rows of `meta/episodes/chunk-*/file-*.parquet` carry
  `episode_index`, `tasks`, `length`, `dataset_from_index`, `dataset_to_index`,
  `data/chunk_index`, `data/file_index`, `videos/<key>/chunk_index`, `videos/<key>/file_index`,
  `videos/<key>/from_timestamp`, `videos/<key>/to_timestamp`, `meta/episodes/chunk_index`,
  `meta/episodes/file_index` and `stats/<feature>/<min|max|mean|std|count>`; a frame of episode e
  sits at `from_timestamp + frame_index / fps` in its video file.
* `src/lerobot/datasets/v30/convert_dataset_v21_to_v30.py`: the v2.1 -> v3.0 conversion (one
  file per episode -> concatenated files, the same episode columns).

What is written: features `observation.images.<camera>` (video, h264 yuv420p by default, crf 18),
`observation.state` (joint positions, names = joint names), `action` (names = action spec
names), `next.reward`, `next.done`, plus LeRobot's default index features; one data file, one
video file per camera and one episodes file (enough for datasets up to the 100/500 MB file
sizes; larger exports are refused rather than silently mis-chunked). This package's own labels
ride along as extra episode columns LeRobot ignores: `ire_vla/source`, `ire_vla/success`,
`ire_vla/iteration`, `ire_vla/name`, and info.json's `ire_vla` block (action spec JSON).

Import reads that layout back (any chunk/file split, any of LeRobot's codecs ffmpeg decodes):
instruction = the episode's first task, success/source from the ire_vla columns when present
(else successful `teleop`), rewards from `next.reward` (else 0).

Round-trip tolerance: actions, states, rewards, tasks and frame counts are exact (float32);
frames go through lossy video (h264 crf 18, yuv420p): per-frame mean absolute error < 3 grey
levels on natural-looking images (`test/test_export.py` checks it).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ire_vla_ros.episodes.store import EpisodeWriter, read_episode, scan_episodes
from ire_vla_ros.vla.action_spec import ActionSpec

__all__ = ["CODEBASE_VERSION", "LeRobotFormatError", "export_lerobot", "import_lerobot"]

CODEBASE_VERSION = "v3.0"
DEFAULT_CHUNK_SIZE = 1000
DEFAULT_DATA_FILE_SIZE_IN_MB = 100
DEFAULT_VIDEO_FILE_SIZE_IN_MB = 500
INFO_PATH = "meta/info.json"
STATS_PATH = "meta/stats.json"
TASKS_PATH = "meta/tasks.parquet"
EPISODES_DIR = "meta/episodes"
CHUNK_FILE_PATTERN = "chunk-{chunk_index:03d}/file-{file_index:03d}"
DATA_PATH = "data/" + CHUNK_FILE_PATTERN + ".parquet"
VIDEO_PATH = "videos/{video_key}/" + CHUNK_FILE_PATTERN + ".mp4"
EPISODES_PATH = EPISODES_DIR + "/" + CHUNK_FILE_PATTERN + ".parquet"
IMAGE_PREFIX = "observation.images."
CODECS = {"h264": "libx264", "av1": "libsvtav1"}


class LeRobotFormatError(ValueError):
    """A dataset directory is not a LeRobotDataset v3.0 this importer can read; says why."""


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------
def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=4, ensure_ascii=False))


def _stats(x: np.ndarray) -> dict:
    """LeRobot's per-feature stats over the first axis (min, max, mean, std, count)."""
    x = np.asarray(x, np.float64)
    return {"min": x.min(0).tolist(), "max": x.max(0).tolist(), "mean": x.mean(0).tolist(),
            "std": x.std(0).tolist(), "count": [int(x.shape[0])]}


def _image_stats(frames: np.ndarray) -> dict:
    """Per-channel stats in [0, 1], shaped (3, 1, 1) like LeRobot's image stats; subsampled."""
    sub = frames[:: max(1, len(frames) // 100), ::4, ::4].astype(np.float64) / 255.0
    flat = sub.reshape(-1, 3)

    def c(v):
        return [[[float(x)]] for x in v]

    return {"min": c(flat.min(0)), "max": c(flat.max(0)), "mean": c(flat.mean(0)), "std": c(flat.std(0)),
            "count": [int(len(frames))]}


def _tasks_table(tasks: Sequence[str]):
    """meta/tasks.parquet as pandas' `DataFrame({"task_index": ...}, index=Index(tasks, name="task"))
    .to_parquet()` writes it (pandas metadata included, so pd.read_parquet restores the index)."""
    import pyarrow as pa

    table = pa.table({"task_index": pa.array(range(len(tasks)), pa.int64()), "task": pa.array(list(tasks), pa.string())})
    pandas_meta = {
        "index_columns": ["task"], "column_indexes": [{"name": None, "field_name": None, "pandas_type": "unicode",
                                                       "numpy_type": "object", "metadata": {"encoding": "UTF-8"}}],
        "columns": [
            {"name": "task_index", "field_name": "task_index", "pandas_type": "int64", "numpy_type": "int64", "metadata": None},
            {"name": "task", "field_name": "task", "pandas_type": "unicode", "numpy_type": "object", "metadata": None},
        ],
        "creator": {"library": "pyarrow", "version": pa.__version__}, "pandas_version": "2.2.3",
    }
    return table.replace_schema_metadata({b"pandas": json.dumps(pandas_meta).encode()})


def _write_video(path: Path, frames: np.ndarray, fps: float, codec: str, crf: int) -> None:
    import imageio_ffmpeg

    n, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"video frames must have even height and width for yuv420p, got {w}x{h}")
    path.parent.mkdir(parents=True, exist_ok=True)
    params = ["-crf", str(int(crf)), "-g", "2"]  # -g 2: LeRobot's default GOP (fast random access)
    gen = imageio_ffmpeg.write_frames(str(path), (w, h), fps=fps, codec=CODECS[codec], pix_fmt_in="rgb24",
                                      pix_fmt_out="yuv420p", macro_block_size=1, quality=None,
                                      output_params=params, ffmpeg_log_level="error")
    gen.send(None)
    for f in frames:
        gen.send(np.ascontiguousarray(f))
    gen.close()


def _read_video(path: Path) -> np.ndarray:
    import imageio_ffmpeg

    gen = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    meta = next(gen)
    w, h = meta["size"]
    frames = [np.frombuffer(b, np.uint8).reshape(h, w, 3) for b in gen]
    return np.stack(frames) if frames else np.zeros((0, h, w, 3), np.uint8)


# --------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------
def export_lerobot(store: str | Path, out: str | Path, *, fps: float | None = None, robot_type: str | None = None,
                   codec: str = "h264", crf: int = 18, sources=None, tasks=None,
                   successful_only: bool = False) -> Path:
    """Write every selected episode of `store` as one LeRobotDataset v3.0 at `out` (must not exist)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if codec not in CODECS:
        raise ValueError(f"codec must be one of {sorted(CODECS)}, got {codec!r}")
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; LeRobot export writes a new dataset directory")
    res = scan_episodes(store, sources=sources, tasks=tasks, successful_only=successful_only)
    if not res.episodes:
        raise ValueError(f"no valid episodes under {store} match the selection")
    first = res.infos[0]
    for info in res.infos[1:]:
        if (info.action_spec != first.action_spec or info.joint_names != first.joint_names
                or info.camera_names != first.camera_names or info.image_shapes != first.image_shapes):
            raise ValueError(f"{info.path}: action spec, joints, cameras or image sizes differ from {first.path}; "
                             "a LeRobot dataset has one schema (export them separately, e.g. --task)")
    fps = float(fps or first.metadata.get("control_rate_hz") or 10.0)
    cams = first.camera_names
    task_names: list[str] = []
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent if out.parent.exists() else None))
    try:
        cols: dict[str, list] = {k: [] for k in ("observation.state", "action", "next.reward", "next.done", "timestamp",
                                                  "frame_index", "episode_index", "index", "task_index")}
        frames = {c: [] for c in cams}
        ep_rows = []
        index = 0
        for e, p in enumerate(res.episodes):
            ep = read_episode(p)
            T = ep.n_steps
            if ep.instruction not in task_names:
                task_names.append(ep.instruction)
            ti = task_names.index(ep.instruction)
            cols["observation.state"] += list(ep.joint_positions.astype(np.float32))
            cols["action"] += list(ep.actions.astype(np.float32))
            cols["next.reward"] += ep.rewards.astype(np.float32).tolist()
            cols["next.done"] += [False] * (T - 1) + [True]
            cols["timestamp"] += (np.arange(T, dtype=np.float32) / np.float32(fps)).tolist()
            cols["frame_index"] += list(range(T))
            cols["episode_index"] += [e] * T
            cols["index"] += list(range(index, index + T))
            cols["task_index"] += [ti] * T
            video_from = sum(len(f) for f in frames[cams[0]]) / fps
            for c in cams:
                frames[c].append(ep.images[c])
            row = {
                "episode_index": e, "tasks": [ep.instruction], "length": T,
                "data/chunk_index": 0, "data/file_index": 0,
                "dataset_from_index": index, "dataset_to_index": index + T,
            }
            for c in cams:
                key = IMAGE_PREFIX + c
                row.update({f"videos/{key}/chunk_index": 0, f"videos/{key}/file_index": 0,
                            f"videos/{key}/from_timestamp": video_from, f"videos/{key}/to_timestamp": video_from + T / fps})
            row.update({"meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0})
            for feat, arr in (("observation.state", ep.joint_positions), ("action", ep.actions),
                              ("next.reward", ep.rewards[:, None])):
                for k, v in _stats(arr).items():
                    row[f"stats/{feat}/{k}"] = v
            row.update({"ire_vla/name": ep.name, "ire_vla/source": ep.source, "ire_vla/success": bool(ep.success),
                        "ire_vla/iteration": int(ep.iteration), "ire_vla/task": ep.task})
            ep_rows.append(row)
            index += T
        J, A = len(first.joint_names), first.action_spec.dim
        data = pa.table({
            "observation.state": pa.array([r.tolist() for r in cols["observation.state"]], pa.list_(pa.float32(), J)),
            "action": pa.array([r.tolist() for r in cols["action"]], pa.list_(pa.float32(), A)),
            "next.reward": pa.array(cols["next.reward"], pa.float32()),
            "next.done": pa.array(cols["next.done"], pa.bool_()),
            "timestamp": pa.array(cols["timestamp"], pa.float32()),
            **{k: pa.array(cols[k], pa.int64()) for k in ("frame_index", "episode_index", "index", "task_index")},
        })
        data_file = tmp / DATA_PATH.format(chunk_index=0, file_index=0)
        data_file.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(data, data_file)
        if data_file.stat().st_size > DEFAULT_DATA_FILE_SIZE_IN_MB * 2**20:
            raise ValueError(f"data file exceeds {DEFAULT_DATA_FILE_SIZE_IN_MB} MB: export a smaller selection")
        features = {
            "observation.state": {"dtype": "float32", "shape": [J], "names": list(first.joint_names)},
            "action": {"dtype": "float32", "shape": [A], "names": list(first.action_spec.names)},
            "next.reward": {"dtype": "float32", "shape": [1], "names": None},
            "next.done": {"dtype": "bool", "shape": [1], "names": None},
        }
        stats = {}
        for c in cams:
            key = IMAGE_PREFIX + c
            allf = np.concatenate(frames[c])
            h, w = int(allf.shape[1]), int(allf.shape[2])
            vpath = tmp / VIDEO_PATH.format(video_key=key, chunk_index=0, file_index=0)
            _write_video(vpath, allf, fps, codec, crf)
            if vpath.stat().st_size > DEFAULT_VIDEO_FILE_SIZE_IN_MB * 2**20:
                raise ValueError(f"video file exceeds {DEFAULT_VIDEO_FILE_SIZE_IN_MB} MB: export a smaller selection")
            features[key] = {"dtype": "video", "shape": [h, w, 3], "names": ["height", "width", "channels"],
                             "info": {"video.height": h, "video.width": w, "video.codec": codec,
                                      "video.pix_fmt": "yuv420p", "video.is_depth_map": False, "video.fps": fps,
                                      "video.channels": 3, "has_audio": False}}
            stats[key] = _image_stats(allf)
        features.update({
            "timestamp": {"dtype": "float32", "shape": [1], "names": None},
            "frame_index": {"dtype": "int64", "shape": [1], "names": None},
            "episode_index": {"dtype": "int64", "shape": [1], "names": None},
            "index": {"dtype": "int64", "shape": [1], "names": None},
            "task_index": {"dtype": "int64", "shape": [1], "names": None},
        })
        stats["observation.state"] = _stats(np.stack(cols["observation.state"]))
        stats["action"] = _stats(np.stack(cols["action"]))
        stats["next.reward"] = _stats(np.asarray(cols["next.reward"])[:, None])
        for k in ("timestamp", "frame_index", "episode_index", "index", "task_index"):
            stats[k] = _stats(np.asarray(cols[k], np.float64)[:, None])
        pq.write_table(pa.Table.from_pylist(ep_rows), _mk(tmp / EPISODES_PATH.format(chunk_index=0, file_index=0)))
        pq.write_table(_tasks_table(task_names), _mk(tmp / TASKS_PATH))
        _write_json(tmp / STATS_PATH, stats)
        _write_json(tmp / INFO_PATH, {
            "codebase_version": CODEBASE_VERSION, "robot_type": robot_type,
            "total_episodes": len(ep_rows), "total_frames": index, "total_tasks": len(task_names),
            "chunks_size": DEFAULT_CHUNK_SIZE, "data_files_size_in_mb": DEFAULT_DATA_FILE_SIZE_IN_MB,
            "video_files_size_in_mb": DEFAULT_VIDEO_FILE_SIZE_IN_MB, "fps": fps,
            "splits": {"train": f"0:{len(ep_rows)}"}, "data_path": DATA_PATH, "video_path": VIDEO_PATH,
            "features": features,
            "ire_vla": {"action_spec": first.action_spec.to_dict(), "camera_names": list(cams)},
        })
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _mk(p: Path) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


# --------------------------------------------------------------------------------------------
# import
# --------------------------------------------------------------------------------------------
@dataclass
class _Info:
    fps: float
    features: dict
    data_path: str
    video_path: str | None
    spec: ActionSpec
    joint_names: list[str]
    video_keys: list[str]


def _read_info(root: Path) -> _Info:
    ipath = root / INFO_PATH
    if not ipath.is_file():
        raise LeRobotFormatError(f"{root}: no {INFO_PATH} (not a LeRobot dataset)")
    try:
        info = json.loads(ipath.read_text())
    except json.JSONDecodeError as e:
        raise LeRobotFormatError(f"{ipath}: not valid JSON ({e})") from e
    version = str(info.get("codebase_version", ""))
    if not version.startswith("v3."):
        raise LeRobotFormatError(f"{ipath}: codebase_version {version!r}; only LeRobotDataset v3.x is supported "
                                 "(convert older datasets with lerobot's convert_dataset_v21_to_v30)")
    feats = info.get("features") or {}
    for k in ("observation.state", "action"):
        if k not in feats:
            raise LeRobotFormatError(f"{ipath}: feature {k!r} missing (features: {sorted(feats)})")
    video_keys = [k for k, f in feats.items() if f.get("dtype") == "video"]
    if not video_keys:
        raise LeRobotFormatError(f"{ipath}: no video features (image-only datasets are not supported)")
    for k in video_keys:
        if not k.startswith(IMAGE_PREFIX) or "/" in k[len(IMAGE_PREFIX):]:
            raise LeRobotFormatError(f"{ipath}: video feature {k!r} is not observation.images.<camera>")
    names = feats["action"].get("names")
    if isinstance(names, dict):  # some datasets nest names, e.g. {"motors": [...]}
        names = next(iter(names.values()), None)
    own = (info.get("ire_vla") or {}).get("action_spec")
    A = int(feats["action"]["shape"][0])
    if own:
        spec = ActionSpec.from_dict(own)
    else:
        names = list(names) if names else [f"a{i}" for i in range(A)]
        spec = ActionSpec(names=tuple(names), low=(-1.0,) * A, high=(1.0,) * A)
    jn = feats["observation.state"].get("names")
    if isinstance(jn, dict):
        jn = next(iter(jn.values()), None)
    J = int(feats["observation.state"]["shape"][0])
    return _Info(fps=float(info["fps"]), features=feats, data_path=info.get("data_path", DATA_PATH),
                 video_path=info.get("video_path", VIDEO_PATH), spec=spec,
                 joint_names=list(jn) if jn else [f"joint_{i}" for i in range(J)], video_keys=video_keys)


def _read_tables(files: list[Path], what: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not files:
        raise LeRobotFormatError(f"no {what} parquet files")
    try:
        return pa.concat_tables([pq.read_table(f) for f in files], promote_options="permissive")
    except Exception as e:
        raise LeRobotFormatError(f"unreadable {what} parquet ({type(e).__name__}: {e})") from e


def import_lerobot(root: str | Path, out: str | Path, *, source: str | None = None,
                   episodes: Sequence[int] | None = None) -> list[Path]:
    """Read a LeRobotDataset v3.x directory into the episode store `out`. Returns the new files.

    Each episode goes through EpisodeWriter (partial + finalize); an error aborts the episode
    being written and earlier episodes of this call are removed again (all or nothing).
    """
    import pyarrow.parquet as pq

    root = Path(root)
    info = _read_info(root)
    tasks_tbl = pq.read_table(root / TASKS_PATH) if (root / TASKS_PATH).is_file() else None
    if tasks_tbl is None:
        raise LeRobotFormatError(f"{root}: no {TASKS_PATH}")
    tcols = tasks_tbl.column_names
    task_col = "task" if "task" in tcols else ("__index_level_0__" if "__index_level_0__" in tcols else None)
    if task_col is None or "task_index" not in tcols:
        raise LeRobotFormatError(f"{root / TASKS_PATH}: expected columns task_index and task (index), got {tcols}")
    task_of = dict(zip(tasks_tbl.column("task_index").to_pylist(), tasks_tbl.column(task_col).to_pylist()))
    eps = _read_tables(sorted((root / EPISODES_DIR).glob("*/*.parquet")), f"{root / EPISODES_DIR}").to_pylist()
    data = _read_tables(sorted((root / "data").glob("*/*.parquet")), f"{root / 'data'}")
    for col in ("episode_index", "frame_index", "observation.state", "action"):
        if col not in data.column_names:
            raise LeRobotFormatError(f"{root / 'data'}: column {col!r} missing")
    d_ep = np.asarray(data.column("episode_index").to_numpy(zero_copy_only=False), np.int64)
    d_fi = np.asarray(data.column("frame_index").to_numpy(zero_copy_only=False), np.int64)
    d_state = np.asarray(data.column("observation.state").to_pylist(), np.float32)
    d_act = np.asarray(data.column("action").to_pylist(), np.float32)
    d_rew = (np.asarray(data.column("next.reward").to_pylist(), np.float32).reshape(-1)
             if "next.reward" in data.column_names else np.zeros(len(d_ep), np.float32))
    d_task = (np.asarray(data.column("task_index").to_numpy(zero_copy_only=False), np.int64)
              if "task_index" in data.column_names else None)
    video_cache: dict[Path, np.ndarray] = {}
    written: list[Path] = []
    wanted = None if episodes is None else set(int(e) for e in episodes)
    try:
        for row in sorted(eps, key=lambda r: r["episode_index"]):
            e = int(row["episode_index"])
            if wanted is not None and e not in wanted:
                continue
            sel = np.flatnonzero(d_ep == e)
            sel = sel[np.argsort(d_fi[sel], kind="stable")]
            T = int(row.get("length", len(sel)))
            if len(sel) != T or T == 0:
                raise LeRobotFormatError(f"{root}: episode {e} has {len(sel)} data rows, episodes meta says {T}")
            tasks_list = row.get("tasks") or ([task_of.get(int(d_task[sel[0]]))] if d_task is not None else [])
            instruction = str(tasks_list[0]) if tasks_list and tasks_list[0] else ""
            if not instruction.strip():
                raise LeRobotFormatError(f"{root}: episode {e} has no task")
            images = {}
            for key in info.video_keys:
                vp = root / info.video_path.format(video_key=key, chunk_index=int(row[f"videos/{key}/chunk_index"]),
                                                   file_index=int(row[f"videos/{key}/file_index"]))
                if vp not in video_cache:
                    if not vp.is_file():
                        raise LeRobotFormatError(f"{vp}: video file missing")
                    video_cache = {vp: _read_video(vp)}  # one file at a time (bounded memory)
                frames = video_cache[vp]
                start = int(round(float(row[f"videos/{key}/from_timestamp"]) * info.fps))
                if start + T > len(frames):
                    raise LeRobotFormatError(f"{vp}: episode {e} needs frames {start}..{start + T - 1}, "
                                             f"the file has {len(frames)}")
                images[key[len(IMAGE_PREFIX):]] = frames[start:start + T]
            cams = [k[len(IMAGE_PREFIX):] for k in info.video_keys]
            src = source or row.get("ire_vla/source") or "teleop"
            success = row.get("ire_vla/success")
            meta = {"importer": "ire_vla_ros.episodes.lerobot", "lerobot_dataset": str(root.resolve()),
                    "lerobot_episode_index": e, "fps": info.fps, "control_rate_hz": info.fps}
            if row.get("ire_vla/name"):
                meta["exported_name"] = row["ire_vla/name"]
            with EpisodeWriter(out, instruction=instruction, task=row.get("ire_vla/task") or instruction, source=src,
                               action_spec=info.spec, joint_names=info.joint_names, camera_names=cams,
                               iteration=int(row.get("ire_vla/iteration") or 0), metadata=meta) as w:
                for i, r in enumerate(sel):
                    w.append(images={c: images[c][i] for c in cams}, joint_positions=d_state[r], action=d_act[r],
                             reward=float(d_rew[r]), timestamp=float(d_fi[r]) / info.fps)
                written.append(w.finalize(True if success is None else bool(success)))
    except BaseException:
        for p in written:
            try:
                p.unlink()
            except OSError:
                pass
        raise
    return written
