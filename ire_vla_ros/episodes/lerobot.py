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
names), `next.reward`, `next.done`, plus LeRobot's default index features. Episodes are packed
into data files (up to `data_files_size_in_mb`, 100) and per-camera video files (up to
`video_files_size_in_mb`, 500; checked between episodes, as LeRobot does), streamed: only one
episode's frames are in memory, on export and on import. This package's own labels
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


class _ImageStats:
    """Per-channel min/max/mean/std in [0, 1], shaped (3, 1, 1) like LeRobot's image stats, accumulated
    episode by episode on a subsample (every 4th pixel, at most ~100 frames per episode)."""

    def __init__(self):
        self.n, self.s, self.ss, self.frames = 0, np.zeros(3), np.zeros(3), 0
        self.lo, self.hi = np.full(3, np.inf), np.full(3, -np.inf)

    def add(self, frames: np.ndarray) -> None:
        sub = frames[:: max(1, len(frames) // 100), ::4, ::4].reshape(-1, 3).astype(np.float64) / 255.0
        self.n += len(sub)
        self.s += sub.sum(0)
        self.ss += (sub * sub).sum(0)
        self.lo, self.hi = np.minimum(self.lo, sub.min(0)), np.maximum(self.hi, sub.max(0))
        self.frames += len(frames)

    def result(self) -> dict:
        mean = self.s / self.n
        std = np.sqrt(np.maximum(self.ss / self.n - mean * mean, 0.0))

        def c(v):
            return [[[float(x)]] for x in v]

        return {"min": c(self.lo), "max": c(self.hi), "mean": c(mean), "std": c(std), "count": [int(self.frames)]}


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


class _VideoWriter:
    """Frames streamed into one MP4 through ffmpeg (imageio-ffmpeg), never all in memory."""

    def __init__(self, path: Path, size_wh: tuple[int, int], fps: float, codec: str, crf: int):
        import imageio_ffmpeg

        w, h = size_wh
        if h % 2 or w % 2:
            raise ValueError(f"video frames must have even height and width for yuv420p, got {w}x{h}")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.frames = path, 0
        params = ["-crf", str(int(crf)), "-g", "2"]  # -g 2: LeRobot's default GOP (fast random access)
        self._gen = imageio_ffmpeg.write_frames(str(path), (w, h), fps=fps, codec=CODECS[codec], pix_fmt_in="rgb24",
                                                pix_fmt_out="yuv420p", macro_block_size=1, quality=None,
                                                output_params=params, ffmpeg_log_level="error")
        self._gen.send(None)

    def write(self, frames: np.ndarray) -> None:
        for f in frames:
            self._gen.send(np.ascontiguousarray(f))
        self.frames += len(frames)

    def size_mb(self) -> float:
        return self.path.stat().st_size / 2**20 if self.path.exists() else 0.0

    def close(self) -> None:
        self._gen.close()


class _VideoCursor:
    """Sequential reader over one MP4 at a time: `take(path, start, n)` returns frames
    start..start+n-1, reading forward (episodes of a v3.0 file are read in file order)."""

    def __init__(self):
        self.path, self._gen, self.pos = None, None, 0

    def _open(self, path: Path) -> None:
        import imageio_ffmpeg

        self.close()
        self._gen = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
        meta = next(self._gen)
        self.size = meta["size"]
        self.path, self.pos = path, 0

    def take(self, path: Path, start: int, n: int) -> np.ndarray:
        if path != self.path or start < self.pos:
            self._open(path)
        w, h = self.size
        out = np.empty((n, h, w, 3), np.uint8)
        got = 0
        for raw in self._gen:
            i = self.pos
            self.pos += 1
            if i >= start:
                out[got] = np.frombuffer(raw, np.uint8).reshape(h, w, 3)
                got += 1
                if got == n:
                    return out
        raise LeRobotFormatError(f"{path}: needs frames {start}..{start + n - 1}, the file has {self.pos}")

    def close(self) -> None:
        if self._gen is not None:
            self._gen.close()
        self._gen, self.path = None, None


# --------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------
def export_lerobot(store: str | Path, out: str | Path, *, fps: float | None = None, robot_type: str | None = None,
                   codec: str = "h264", crf: int = 18, sources=None, tasks=None, successful_only: bool = False,
                   data_file_size_mb: float = DEFAULT_DATA_FILE_SIZE_IN_MB,
                   video_file_size_mb: float = DEFAULT_VIDEO_FILE_SIZE_IN_MB) -> Path:
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
    J, A = len(first.joint_names), first.action_spec.dim
    row_bytes = 4 * (J + A) + 4 + 4 + 1 + 4 * 8  # state, action, reward, timestamp, done, 4 int64 indices
    task_names: list[str] = []
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent if out.parent.exists() else None))
    writers: dict[str, _VideoWriter] = {}
    try:
        def new_cols() -> dict[str, list]:
            return {k: [] for k in ("observation.state", "action", "next.reward", "next.done", "timestamp",
                                    "frame_index", "episode_index", "index", "task_index")}

        def flush_data(cols: dict, file_no: int) -> None:
            if not cols["index"]:
                return
            table = pa.table({
                "observation.state": pa.array(cols["observation.state"], pa.list_(pa.float32(), J)),
                "action": pa.array(cols["action"], pa.list_(pa.float32(), A)),
                "next.reward": pa.array(cols["next.reward"], pa.float32()),
                "next.done": pa.array(cols["next.done"], pa.bool_()),
                "timestamp": pa.array(cols["timestamp"], pa.float32()),
                **{k: pa.array(cols[k], pa.int64()) for k in ("frame_index", "episode_index", "index", "task_index")},
            })
            chunk, file = divmod(file_no, DEFAULT_CHUNK_SIZE)
            pq.write_table(table, _mk(tmp / DATA_PATH.format(chunk_index=chunk, file_index=file)))

        cols, data_file_no, data_rows = new_cols(), 0, 0
        video_file_no = {c: 0 for c in cams}
        totals = {k: [] for k in ("observation.state", "action", "next.reward")}
        img_stats = {c: _ImageStats() for c in cams}
        ep_rows = []
        index = 0
        for e, p in enumerate(res.episodes):
            ep = read_episode(p)
            T = ep.n_steps
            if ep.instruction not in task_names:
                task_names.append(ep.instruction)
            ti = task_names.index(ep.instruction)
            if data_rows and (data_rows + T) * row_bytes > data_file_size_mb * 2**20:  # next data file
                flush_data(cols, data_file_no)
                cols, data_file_no, data_rows = new_cols(), data_file_no + 1, 0
            cols["observation.state"] += ep.joint_positions.astype(np.float32).tolist()
            cols["action"] += ep.actions.astype(np.float32).tolist()
            cols["next.reward"] += ep.rewards.astype(np.float32).tolist()
            cols["next.done"] += [False] * (T - 1) + [True]
            cols["timestamp"] += (np.arange(T, dtype=np.float32) / np.float32(fps)).tolist()
            cols["frame_index"] += list(range(T))
            cols["episode_index"] += [e] * T
            cols["index"] += list(range(index, index + T))
            cols["task_index"] += [ti] * T
            data_rows += T
            for k, arr in (("observation.state", ep.joint_positions), ("action", ep.actions),
                           ("next.reward", ep.rewards[:, None])):
                totals[k].append(np.asarray(arr, np.float64))
            chunk, file = divmod(data_file_no, DEFAULT_CHUNK_SIZE)
            row = {
                "episode_index": e, "tasks": [ep.instruction], "length": T,
                "data/chunk_index": chunk, "data/file_index": file,
                "dataset_from_index": index, "dataset_to_index": index + T,
            }
            for c in cams:
                key = IMAGE_PREFIX + c
                w = writers.get(c)
                if w is not None and w.size_mb() >= video_file_size_mb:  # next video file
                    w.close()
                    video_file_no[c] += 1
                    w = None
                vchunk, vfile = divmod(video_file_no[c], DEFAULT_CHUNK_SIZE)
                if w is None:
                    h, wd = ep.images[c].shape[1:3]
                    w = writers[c] = _VideoWriter(tmp / VIDEO_PATH.format(video_key=key, chunk_index=vchunk,
                                                                         file_index=vfile), (wd, h), fps, codec, crf)
                video_from = w.frames / fps
                w.write(ep.images[c])
                img_stats[c].add(ep.images[c])
                row.update({f"videos/{key}/chunk_index": vchunk, f"videos/{key}/file_index": vfile,
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
        flush_data(cols, data_file_no)
        for w in writers.values():
            w.close()
        features = {
            "observation.state": {"dtype": "float32", "shape": [J], "names": list(first.joint_names)},
            "action": {"dtype": "float32", "shape": [A], "names": list(first.action_spec.names)},
            "next.reward": {"dtype": "float32", "shape": [1], "names": None},
            "next.done": {"dtype": "bool", "shape": [1], "names": None},
        }
        stats = {}
        for c in cams:
            key = IMAGE_PREFIX + c
            h, wd = first.image_shapes[c][:2]
            features[key] = {"dtype": "video", "shape": [h, wd, 3], "names": ["height", "width", "channels"],
                             "info": {"video.height": h, "video.width": wd, "video.codec": codec,
                                      "video.pix_fmt": "yuv420p", "video.is_depth_map": False, "video.fps": fps,
                                      "video.channels": 3, "has_audio": False}}
            stats[key] = img_stats[c].result()
        features.update({
            "timestamp": {"dtype": "float32", "shape": [1], "names": None},
            "frame_index": {"dtype": "int64", "shape": [1], "names": None},
            "episode_index": {"dtype": "int64", "shape": [1], "names": None},
            "index": {"dtype": "int64", "shape": [1], "names": None},
            "task_index": {"dtype": "int64", "shape": [1], "names": None},
        })
        for k, parts in totals.items():
            stats[k] = _stats(np.concatenate(parts))
        lengths = np.asarray([r["length"] for r in ep_rows])
        stats["frame_index"] = _stats(np.concatenate([np.arange(n) for n in lengths])[:, None])
        stats["index"] = _stats(np.arange(index)[:, None])
        stats["episode_index"] = _stats(np.repeat(np.arange(len(lengths)), lengths)[:, None])
        stats["timestamp"] = _stats(np.concatenate([np.arange(n) / fps for n in lengths])[:, None])
        stats["task_index"] = _stats(np.repeat([task_names.index(r["tasks"][0]) for r in ep_rows], lengths)[:, None])
        pq.write_table(pa.Table.from_pylist(ep_rows), _mk(tmp / EPISODES_PATH.format(chunk_index=0, file_index=0)))
        pq.write_table(_tasks_table(task_names), _mk(tmp / TASKS_PATH))
        _write_json(tmp / STATS_PATH, stats)
        _write_json(tmp / INFO_PATH, {
            "codebase_version": CODEBASE_VERSION, "robot_type": robot_type,
            "total_episodes": len(ep_rows), "total_frames": index, "total_tasks": len(task_names),
            "chunks_size": DEFAULT_CHUNK_SIZE, "data_files_size_in_mb": data_file_size_mb,
            "video_files_size_in_mb": video_file_size_mb, "fps": fps,
            "splits": {"train": f"0:{len(ep_rows)}"}, "data_path": DATA_PATH, "video_path": VIDEO_PATH,
            "features": features,
            "ire_vla": {"action_spec": first.action_spec.to_dict(), "camera_names": list(cams)},
        })
        os.replace(tmp, out)
    except BaseException:
        for w in writers.values():
            try:
                w.close()
            except Exception:
                pass
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
    cursors = {key: _VideoCursor() for key in info.video_keys}  # one episode's frames in memory at a time
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
                if not vp.is_file():
                    raise LeRobotFormatError(f"{vp}: video file missing")
                start = int(round(float(row[f"videos/{key}/from_timestamp"]) * info.fps))
                images[key[len(IMAGE_PREFIX):]] = cursors[key].take(vp, start, T)
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
    finally:
        for c in cursors.values():
            c.close()
    return written
