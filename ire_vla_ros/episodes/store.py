"""HDF5 episode store: one file per episode, written incrementally and finalized atomically.

Layout of `<name>.h5` (see docs/ARCHITECTURE.md):

    /observations/images/<camera>   (T, H, W, 3) uint8, one frame per chunk, lzf (default) or gzip-1
(every dataset carries a fletcher32 checksum, so corrupted chunks fail to read instead of
returning garbage)
    /observations/joint_positions   (T, J) float32
    /action                         (T, A) float32   (environment units)
    /reward                         (T,)   float32
    /timestamp                      (T,)   float64
    /policy/log_prob, /policy/value (T,)   float32   (optional, both or neither)
    /step_info/<key>                (T,)   float32   (optional per-step scalars, the same keys every
                                                      step: e.g. joint_stamp_error_s, intervention)

Root attrs: instruction, task, success, source (teleop|policy|rl), iteration, action_spec (JSON),
joint_names (JSON), camera_names (JSON), format_version, complete, n_steps, metadata (JSON dict),
created_utc, finalized_utc.

Crash safety: the writer only ever writes `<name>.h5.partial`. `finalize()` writes the final
attrs, closes the file, fsyncs it, renames it to `<name>.h5` with `os.replace` and fsyncs the
directory, so a `.h5` file is either complete or was damaged after the fact (which `read_episode`
detects). A killed writer leaves a `.partial` file: never listed as an episode, reported by
`scan_episodes` as incomplete.

This module must not import rclpy (it is used by the trainer and the CLI outside ROS).
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import h5py
import numpy as np

from ire_vla_ros.vla.action_spec import ActionSpec

__all__ = [
    "FORMAT_VERSION",
    "SOURCES",
    "EXTENSION",
    "PARTIAL_EXTENSION",
    "EpisodeError",
    "EpisodeWriter",
    "Episode",
    "EpisodeInfo",
    "ScanResult",
    "read_episode",
    "read_episode_info",
    "scan_episodes",
    "make_episode_name",
]

_log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SOURCES = ("teleop", "policy", "rl")
EXTENSION = ".h5"
PARTIAL_EXTENSION = ".h5.partial"
COMPRESSIONS = ("lzf", "gzip", None)

IMAGES_GROUP = "observations/images"
JOINTS = "observations/joint_positions"
ACTION = "action"
REWARD = "reward"
TIMESTAMP = "timestamp"
LOG_PROB = "policy/log_prob"
VALUE = "policy/value"
STEP_INFO_GROUP = "step_info"

_ROW_CHUNK = 128  # time-axis chunk of the small per-step datasets


class EpisodeError(Exception):
    """An episode file is unusable; the message says which file and why."""


# --------------------------------------------------------------------------------------------
# naming / small helpers
# --------------------------------------------------------------------------------------------
def _utc_now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def make_episode_name(source: str, *, when: _dt.datetime | None = None) -> str:
    """Unique, lexicographically time-sortable name: `20250101T120000_123456Z_teleop_a1b2c3`."""
    when = (when or _utc_now()).astimezone(_dt.timezone.utc)
    return f"{when:%Y%m%dT%H%M%S_%f}Z_{source}_{secrets.token_hex(3)}"


def _validate_source(source: str) -> str:
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    return source


def _as_action_spec(spec: ActionSpec | Mapping[str, Any] | str) -> ActionSpec:
    if isinstance(spec, ActionSpec):
        return spec
    if isinstance(spec, str):
        return ActionSpec.from_json(spec)
    if isinstance(spec, Mapping):
        return ActionSpec.from_dict(dict(spec))
    raise TypeError(f"action_spec must be an ActionSpec (or its dict/JSON), got {type(spec).__name__}")


def _json_dumps(obj: Any, what: str) -> str:
    try:
        return json.dumps(obj)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must be JSON-serializable: {e}") from e


def _fsync_path(path: Path, *, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:  # some filesystems/platforms do not allow opening directories
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


def _scalar(x: Any, what: str, dtype=np.float64) -> float:
    a = np.asarray(x, dtype=dtype)
    if a.size != 1:
        raise ValueError(f"{what} must be a scalar, got shape {a.shape}")
    v = a.reshape(()).item()
    if not math.isfinite(v):
        raise ValueError(f"{what} is not finite ({v})")
    return v


def _vector(x: Any, what: str, expected_len: int | None) -> np.ndarray:
    try:
        a = np.asarray(x, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} is not numeric: {e}") from e
    if a.ndim != 1:
        raise ValueError(f"{what} must be a 1-D vector, got shape {a.shape}")
    if expected_len is not None and a.shape[0] != expected_len:
        raise ValueError(f"{what} has length {a.shape[0]}, expected {expected_len}")
    bad = ~np.isfinite(a)
    if bad.any():
        raise ValueError(f"{what} contains NaN/inf at index {np.flatnonzero(bad).tolist()}: {a.tolist()}")
    return a


# --------------------------------------------------------------------------------------------
# step validation (shared by EpisodeWriter and the child-process writer's parent side)
# --------------------------------------------------------------------------------------------
@dataclass
class ValidStep:
    images: dict[str, np.ndarray]
    joint_positions: np.ndarray
    action: np.ndarray
    reward: float
    timestamp: float
    log_prob: float | None
    value: float | None
    step_info: dict[str, float]

    @property
    def nbytes(self) -> int:
        """Upper bound of what the step adds to the file before compression."""
        return sum(int(i.nbytes) for i in self.images.values()) + 8 * (
            self.joint_positions.size + self.action.size + 4 + len(self.step_info))


class StepValidator:
    """Checks one step against the episode's layout and its first step (shapes, optional parts)."""

    def __init__(self, camera_names: Sequence[str], joint_names: Sequence[str], action_dim: int):
        self.camera_names = list(camera_names)
        self.n_joints = len(joint_names)
        self.action_dim = int(action_dim)
        self.image_shapes: dict[str, tuple[int, ...]] = {}
        self.has_policy: bool | None = None
        self.step_info_keys: tuple[str, ...] | None = None

    def check(self, *, images, joint_positions, action, reward, timestamp, log_prob=None, value=None,
              step_info=None) -> ValidStep:
        """ValueError naming the problem, or the step as validated arrays (nothing is remembered:
        call `accept` once the step is written)."""
        if not isinstance(images, Mapping):
            raise ValueError(f"images must be a dict camera -> array, got {type(images).__name__}")
        missing = [c for c in self.camera_names if c not in images]
        extra = [c for c in images if c not in self.camera_names]
        if missing or extra:
            raise ValueError(f"images: missing cameras {missing}, unexpected cameras {extra} (expected {self.camera_names})")
        imgs: dict[str, np.ndarray] = {}
        for cam in self.camera_names:
            img = np.asarray(images[cam])
            if img.dtype != np.uint8:
                raise ValueError(f"image '{cam}' must be uint8, got {img.dtype}")
            if img.ndim != 3 or img.shape[2] != 3 or img.shape[0] == 0 or img.shape[1] == 0:
                raise ValueError(f"image '{cam}' must have shape (H, W, 3), got {img.shape}")
            first = self.image_shapes.get(cam)
            if first is not None and img.shape != first:
                raise ValueError(f"image '{cam}' has shape {img.shape}, but the episode's first frame was {first}")
            imgs[cam] = img
        joints = _vector(joint_positions, "joint_positions", self.n_joints)
        act = _vector(action, "action", self.action_dim)
        rew = _scalar(reward, "reward")
        ts = _scalar(timestamp, "timestamp")
        has_policy = log_prob is not None or value is not None
        if has_policy and (log_prob is None or value is None):
            raise ValueError("log_prob and value must be given together")
        lp = _scalar(log_prob, "log_prob") if has_policy else None
        val = _scalar(value, "value") if has_policy else None
        if self.has_policy is not None and has_policy != self.has_policy:
            raise ValueError(
                "log_prob/value must be given for every step or for none "
                f"(earlier steps {'had' if self.has_policy else 'did not have'} them)"
            )
        info = {}
        for key, v in dict(step_info or {}).items():
            if not isinstance(key, str) or not key or "/" in key:
                raise ValueError(f"step_info key {key!r} must be a non-empty string without '/'")
            info[key] = _scalar(v, f"step_info[{key!r}]")
        keys = tuple(sorted(info))
        if self.step_info_keys is not None and keys != self.step_info_keys:
            raise ValueError(f"step_info keys {list(keys)} differ from the first step's {list(self.step_info_keys)}")
        return ValidStep(imgs, joints, act, rew, ts, lp, val, info)

    def accept(self, step: ValidStep) -> None:
        """Remember what the first written step fixed for the rest of the episode."""
        if self.has_policy is None:
            self.image_shapes = {c: step.images[c].shape for c in self.camera_names}
            self.has_policy = step.log_prob is not None
            self.step_info_keys = tuple(sorted(step.step_info))


# --------------------------------------------------------------------------------------------
# writer
# --------------------------------------------------------------------------------------------
class EpisodeWriter:
    """Writes one episode incrementally to `<root>/<name>.h5.partial`; `finalize()` publishes it.

    Thread-safe (one lock around every file operation). Use as a context manager: an exception
    inside the block aborts (deletes) the episode; leaving the block without `finalize()` also
    discards it (with a warning).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        instruction: str,
        task: str,
        source: str,
        action_spec: ActionSpec | Mapping[str, Any] | str,
        joint_names: Sequence[str],
        camera_names: Sequence[str] = ("main",),
        iteration: int = 0,
        name: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        compression: str | None = "lzf",
    ):
        if not isinstance(instruction, str) or not instruction.strip():
            raise ValueError("instruction must be a non-empty string")
        if not isinstance(task, str) or not task:
            raise ValueError("task must be a non-empty string")
        _validate_source(source)
        self.action_spec = _as_action_spec(action_spec)
        self.joint_names = [str(n) for n in joint_names]
        if not self.joint_names:
            raise ValueError("joint_names must not be empty")
        self.camera_names = [str(c) for c in camera_names]
        if not self.camera_names:
            raise ValueError("camera_names must not be empty")
        if len(set(self.camera_names)) != len(self.camera_names) or any("/" in c or not c for c in self.camera_names):
            raise ValueError(f"camera_names must be unique, non-empty and contain no '/': {self.camera_names}")
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
        self.instruction, self.task, self.source = instruction, task, source
        self.iteration = int(iteration)
        self.metadata: dict[str, Any] = dict(metadata or {})
        metadata_json = _json_dumps(self.metadata, "metadata")
        self.compression = compression

        if name is None:
            name = make_episode_name(source)
        if not name or "/" in name or os.sep in name or name.endswith((EXTENSION, PARTIAL_EXTENSION)):
            raise ValueError(f"invalid episode name {name!r} (no path separators, no extension)")
        self.name = name
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.final_path = self.root / f"{name}{EXTENSION}"
        self.partial_path = self.root / f"{name}{PARTIAL_EXTENSION}"
        if self.final_path.exists():
            raise FileExistsError(f"episode {self.final_path} already exists")
        if self.partial_path.exists():
            raise FileExistsError(f"{self.partial_path} exists (another writer, or a crashed one)")

        self._lock = threading.RLock()
        self._n = 0
        self._rows_written = 0  # steps whose small per-step rows are in the file (see _write_rows)
        self._pending: dict[str, list] = {}
        self._check = StepValidator(self.camera_names, self.joint_names, self.action_spec.dim)
        self._state = "open"  # open | finalized | aborted
        # "x": fail if a partial with this name appeared meanwhile (race with another writer).
        # libver v110: checksummed object headers and chunk indexes (readable by HDF5 >= 1.10)
        try:
            self._file = h5py.File(self.partial_path, "x", libver=("v110", "v110"))
        except FileExistsError:
            raise FileExistsError(f"{self.partial_path} exists (another writer, or a crashed one)") from None
        except OSError:
            # ENOSPC while writing the superblock, EIO, ...: the empty file left behind is ours
            try:
                self.partial_path.unlink()
            except OSError:
                pass
            raise
        try:
            a = self._file.attrs
            a["format_version"] = FORMAT_VERSION
            a["instruction"] = instruction
            a["task"] = task
            a["source"] = source
            a["iteration"] = self.iteration
            a["action_spec"] = self.action_spec.to_json()
            a["joint_names"] = json.dumps(self.joint_names)
            a["camera_names"] = json.dumps(self.camera_names)
            a["metadata"] = metadata_json
            a["complete"] = False
            a["success"] = False
            a["n_steps"] = 0
            a["created_utc"] = _utc_now().isoformat()
            self._create_datasets()
        except BaseException:
            self._discard()
            raise

    # ---- properties -------------------------------------------------------------------------
    @property
    def n_steps(self) -> int:
        return self._n

    @property
    def path(self) -> Path:
        """Current file: the partial file while open, the final file after finalize()."""
        return self.final_path if self._state == "finalized" else self.partial_path

    @property
    def is_open(self) -> bool:
        return self._state == "open"

    # ---- writing ----------------------------------------------------------------------------
    def _create_datasets(self) -> None:
        f = self._file
        J, A = len(self.joint_names), self.action_spec.dim

        def small(name, cols, dtype):
            shape = (0,) if cols is None else (0, cols)
            maxshape = (None,) if cols is None else (None, cols)
            chunks = (_ROW_CHUNK,) if cols is None else (_ROW_CHUNK, cols)
            f.create_dataset(name, shape=shape, maxshape=maxshape, chunks=chunks, dtype=dtype, fletcher32=True)

        small(JOINTS, J, np.float32)
        small(ACTION, A, np.float32)
        small(REWARD, None, np.float32)
        small(TIMESTAMP, None, np.float64)
        f.require_group(IMAGES_GROUP)
        self._ds = {nm: f[nm] for nm in (JOINTS, ACTION, REWARD, TIMESTAMP)}

    def append(
        self,
        *,
        images: Mapping[str, np.ndarray],
        joint_positions,
        action,
        reward,
        timestamp,
        log_prob=None,
        value=None,
        step_info: Mapping[str, float] | None = None,
    ) -> int:
        """Validate and append one step; returns the new number of steps.

        Raises ValueError (and writes nothing for this step) on: missing/extra cameras, image not
        uint8 (H, W, 3) or shape differing from the camera's first frame, joint/action length not
        matching joint_names/action_spec, NaN/inf in action, joint positions, reward, timestamp,
        log_prob, value or step_info, log_prob/value given for some steps but not others, and
        step_info keys differing from the first step's.
        """
        step = self._check.check(images=images, joint_positions=joint_positions, action=action, reward=reward,
                                 timestamp=timestamp, log_prob=log_prob, value=value, step_info=step_info)
        return self.append_valid(step)

    def append_valid(self, step: ValidStep) -> int:
        """Append a step already checked by a StepValidator of this episode's layout."""
        with self._lock:
            if self._state != "open":
                raise RuntimeError(f"episode writer is {self._state}; cannot append")
            f, i = self._file, self._n
            first_step = i == 0
            has_policy = step.log_prob is not None
            names = [f"{IMAGES_GROUP}/{c}" for c in self.camera_names] + [JOINTS, ACTION, REWARD, TIMESTAMP]
            values: list[Any] = [step.images[c] for c in self.camera_names] + [
                step.joint_positions, step.action, step.reward, step.timestamp]
            if has_policy:
                names += [LOG_PROB, VALUE]
                values += [step.log_prob, step.value]
            for key in sorted(step.step_info):
                names.append(f"{STEP_INFO_GROUP}/{key}")
                values.append(step.step_info[key])
            created: list[str] = []
            try:
                if first_step:  # per-step datasets whose shape/presence the first step decides
                    for cam, img in step.images.items():
                        kw = {} if self.compression is None else {"compression": self.compression}
                        if self.compression == "gzip":
                            kw["compression_opts"] = 1
                        nm = f"{IMAGES_GROUP}/{cam}"
                        f.create_dataset(
                            nm, shape=(0,) + img.shape, maxshape=(None,) + img.shape,
                            chunks=(1,) + img.shape, dtype=np.uint8, fletcher32=True, **kw,
                        )
                        created.append(nm)
                    scalars = ([LOG_PROB, VALUE] if has_policy else []) + [
                        f"{STEP_INFO_GROUP}/{k}" for k in sorted(step.step_info)]
                    for nm in scalars:
                        f.create_dataset(
                            nm, shape=(0,), maxshape=(None,), chunks=(_ROW_CHUNK,), dtype=np.float32,
                            fletcher32=True,
                        )
                        created.append(nm)
                    self._ds.update({nm: f[nm] for nm in created})
                n_cams = len(self.camera_names)
                for nm, img in zip(names[:n_cams], values[:n_cams]):
                    d = self._ds[nm]
                    d.resize(i + 1, axis=0)
                    d[i] = img
            except BaseException:
                # keep the file consistent: roll back to the previous length
                for nm in names:
                    try:
                        if nm in created:
                            self._ds.pop(nm, None)
                            del f[nm]
                        elif nm in self._ds and nm.startswith(IMAGES_GROUP + "/"):
                            self._ds[nm].resize(i, axis=0)
                    except Exception:  # pragma: no cover - file already broken
                        pass
                raise
            # The small per-step rows (joints, action, reward, ...) are written in blocks of
            # _ROW_CHUNK: resizing and writing six tiny datasets every step cost as much as 20 % of
            # the time of a 640x480 frame. flush/finalize write what is pending.
            for nm, v in zip(names[n_cams:], values[n_cams:]):
                self._pending.setdefault(nm, []).append(v)
            self._check.accept(step)
            self._n = i + 1
            if self._n - self._rows_written >= _ROW_CHUNK:
                self._write_rows()
            return self._n

    def _write_rows(self) -> None:
        """Write the pending small per-step rows as one block per dataset."""
        n_new = self._n - self._rows_written
        if n_new <= 0:
            return
        start = self._rows_written
        for nm, rows in self._pending.items():
            d = self._ds[nm]
            d.resize(start + n_new, axis=0)
            d[start:start + n_new] = np.asarray(rows, dtype=d.dtype).reshape((n_new,) + d.shape[1:])
        self._pending = {}
        self._rows_written = self._n

    def flush(self) -> None:
        """Write pending rows and HDF5's cached chunks and metadata to the file (so its size on disk is current)."""
        with self._lock:
            if self._state == "open":
                self._write_rows()
                self._file.flush()

    def finalize(self, success: bool, *, metadata: Mapping[str, Any] | None = None) -> Path:
        """Mark complete, close, fsync, rename `.partial` -> `.h5`, fsync the directory.

        `metadata` (optional) is merged into the episode's metadata dict. An episode with zero
        steps cannot be finalized: it is aborted and EpisodeError is raised.
        """
        with self._lock:
            if self._state != "open":
                raise RuntimeError(f"episode writer is {self._state}; cannot finalize")
            if self._n == 0:
                self._discard()
                raise EpisodeError(f"{self.partial_path}: cannot finalize an episode with zero steps (discarded)")
            if metadata:
                self.metadata.update(metadata)
            try:
                self._write_rows()
                a = self._file.attrs
                a["metadata"] = _json_dumps(self.metadata, "metadata")
                a["success"] = bool(success)
                a["n_steps"] = self._n
                a["finalized_utc"] = _utc_now().isoformat()
                a["complete"] = True
                self._file.flush()
                self._file.close()
                _fsync_path(self.partial_path)
                os.replace(self.partial_path, self.final_path)
                _fsync_path(self.root, directory=True)
            except BaseException:
                self._discard()
                raise
            self._state = "finalized"
            return self.final_path

    def abort(self) -> None:
        """Discard the episode (removes the partial file). Idempotent; no-op after finalize."""
        with self._lock:
            if self._state == "open":
                self._discard()

    def _discard(self) -> None:
        self._state = "aborted"
        try:
            if self._file.id.valid:
                self._file.close()
        except Exception:  # pragma: no cover
            pass
        try:
            self.partial_path.unlink()
        except FileNotFoundError:
            pass

    def close_without_finalize(self) -> None:
        """Close the file but leave the `.partial` on disk (what a crash leaves behind)."""
        with self._lock:
            if self._state == "open":
                self._state = "aborted"
                try:
                    self._write_rows()  # what a crash after a flush would leave
                finally:
                    self._file.close()

    def __enter__(self) -> "EpisodeWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._state != "open":
            return
        if exc_type is None:
            _log.warning("episode %s left its context without finalize(); discarded", self.partial_path)
        self.abort()

    def __del__(self):
        # Garbage-collected without finalize/abort: behave like a crash (keep the partial file
        # so scan_episodes reports it), but release the HDF5 handle.
        try:
            if getattr(self, "_state", None) == "open" and self._file.id.valid:
                self._file.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"EpisodeWriter({self.path}, steps={self._n}, state={self._state})"


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------
@dataclass
class EpisodeInfo:
    """Attrs + length of a validated episode (what scan_episodes reads; no arrays kept)."""

    path: Path
    name: str
    instruction: str
    task: str
    source: str
    success: bool
    iteration: int
    n_steps: int
    action_spec: ActionSpec
    joint_names: list[str]
    camera_names: list[str]
    image_shapes: dict[str, tuple[int, ...]]
    metadata: dict
    total_return: float
    has_policy: bool
    format_version: int


@dataclass
class Episode:
    path: Path
    instruction: str
    task: str
    source: str
    success: bool
    iteration: int
    action_spec: ActionSpec
    joint_names: list[str]
    images: dict[str, np.ndarray]          # camera -> (T, H, W, 3) uint8; {} if load_images=False
    joint_positions: np.ndarray            # (T, J) float32
    actions: np.ndarray                    # (T, A) float32
    rewards: np.ndarray                    # (T,) float32
    timestamps: np.ndarray                 # (T,) float64
    log_probs: np.ndarray | None = None    # (T,) float32
    values: np.ndarray | None = None       # (T,) float32
    metadata: dict = field(default_factory=dict)
    camera_names: list[str] = field(default_factory=list)
    format_version: int = FORMAT_VERSION
    step_info: dict[str, np.ndarray] = field(default_factory=dict)  # key -> (T,) float32

    @property
    def n_steps(self) -> int:
        return int(self.actions.shape[0])

    @property
    def total_return(self) -> float:
        return float(np.sum(self.rewards, dtype=np.float64))

    @property
    def name(self) -> str:
        return _episode_name(self.path)


def _episode_name(path: Path) -> str:
    n = path.name
    for ext in (PARTIAL_EXTENSION, EXTENSION):
        if n.endswith(ext):
            return n[: -len(ext)]
    return n


def _attr_str(attrs, key: str, where: str) -> str:
    if key not in attrs:
        raise EpisodeError(f"{where}: missing attribute '{key}'")
    v = attrs[key]
    if isinstance(v, bytes):
        v = v.decode("utf-8", "replace")
    if not isinstance(v, str):
        raise EpisodeError(f"{where}: attribute '{key}' is not a string ({type(v).__name__})")
    return v


def _attr_json(attrs, key: str, where: str, default: Any = None) -> Any:
    if key not in attrs:
        if default is not None:
            return default
        raise EpisodeError(f"{where}: missing attribute '{key}'")
    s = _attr_str(attrs, key, where)
    try:
        return json.loads(s)
    except json.JSONDecodeError as e:
        raise EpisodeError(f"{where}: attribute '{key}' is not valid JSON ({e})") from e


def _require_dataset(f: h5py.File, key: str, where: str) -> h5py.Dataset:
    obj = f.get(key)
    if obj is None:
        raise EpisodeError(f"{where}: missing dataset '/{key}'")
    if not isinstance(obj, h5py.Dataset):
        raise EpisodeError(f"{where}: '/{key}' is not a dataset")
    return obj


def _read_array(ds: h5py.Dataset, where: str) -> np.ndarray:
    try:
        return ds[()]
    except Exception as e:  # corrupted chunk, truncated data, filter error...
        raise EpisodeError(f"{where}: cannot read dataset '{ds.name}' ({type(e).__name__}: {e})") from e


def _check_finite(a: np.ndarray, what: str, where: str) -> None:
    bad = ~np.isfinite(a)
    if bad.any():
        steps = np.unique(np.nonzero(bad)[0])
        raise EpisodeError(
            f"{where}: NaN/inf in {what} at {int(bad.sum())} value(s), steps {steps[:10].tolist()}"
            + (" ..." if len(steps) > 10 else "")
        )


def _open_h5(path: Path, where: str) -> h5py.File:
    try:
        return h5py.File(path, "r", locking=False)
    except Exception as e:
        raise EpisodeError(f"{where}: unreadable/truncated HDF5 file ({type(e).__name__}: {e})") from e


def _load(path: Path, *, load_images: bool, want_arrays: bool) -> tuple[EpisodeInfo, dict[str, Any]]:
    """Open and validate one finalized episode file. Returns its info and (if wanted) arrays."""
    path = Path(path)
    where = str(path)
    if path.name.endswith(PARTIAL_EXTENSION):
        raise EpisodeError(f"{where}: incomplete (partial file; the writer crashed or is still recording)")
    if not path.is_file():
        raise EpisodeError(f"{where}: no such file")
    f = _open_h5(path, where)
    try:
        try:
            return _load_open(f, path, where, load_images=load_images, want_arrays=want_arrays)
        except EpisodeError:
            raise
        except Exception as e:  # any low-level HDF5 failure while reading metadata
            raise EpisodeError(f"{where}: corrupted HDF5 file ({type(e).__name__}: {e})") from e
    finally:
        try:
            f.close()
        except Exception:
            pass


def _load_open(f: h5py.File, path: Path, where: str, *, load_images: bool, want_arrays: bool):
    a = f.attrs
    if "format_version" not in a:
        raise EpisodeError(f"{where}: missing attribute 'format_version' (not an episode file?)")
    version = int(a["format_version"])
    if version != FORMAT_VERSION:
        raise EpisodeError(f"{where}: unsupported format_version {version} (expected {FORMAT_VERSION})")
    if not bool(a.get("complete", False)):
        raise EpisodeError(f"{where}: not complete (attribute complete is not true)")
    instruction = _attr_str(a, "instruction", where) if "instruction" in a else ""
    if not instruction.strip():
        raise EpisodeError(f"{where}: empty or missing instruction")
    task = _attr_str(a, "task", where)
    source = _attr_str(a, "source", where)
    if source not in SOURCES:
        raise EpisodeError(f"{where}: invalid source {source!r} (expected one of {SOURCES})")
    if "success" not in a:
        raise EpisodeError(f"{where}: missing attribute 'success'")
    success = bool(a["success"])
    iteration = int(a.get("iteration", 0))
    try:
        action_spec = ActionSpec.from_dict(_attr_json(a, "action_spec", where))
    except EpisodeError:
        raise
    except Exception as e:
        raise EpisodeError(f"{where}: invalid action_spec ({e})") from e
    joint_names = _attr_json(a, "joint_names", where)
    if not isinstance(joint_names, list):
        raise EpisodeError(f"{where}: joint_names is not a list")
    metadata = _attr_json(a, "metadata", where, default={})
    if not isinstance(metadata, dict):
        raise EpisodeError(f"{where}: metadata is not a JSON object")

    # ---- datasets: presence, shapes, lengths --------------------------------------------
    d_joint = _require_dataset(f, JOINTS, where)
    d_act = _require_dataset(f, ACTION, where)
    d_rew = _require_dataset(f, REWARD, where)
    d_ts = _require_dataset(f, TIMESTAMP, where)
    img_group = f.get(IMAGES_GROUP)
    if not isinstance(img_group, h5py.Group) or len(img_group) == 0:
        raise EpisodeError(f"{where}: missing image datasets under '/{IMAGES_GROUP}'")
    camera_names = _attr_json(a, "camera_names", where, default=sorted(img_group.keys()))
    d_imgs = {c: _require_dataset(f, f"{IMAGES_GROUP}/{c}", where) for c in camera_names}
    has_policy = LOG_PROB in f or VALUE in f
    d_lp = _require_dataset(f, LOG_PROB, where) if has_policy else None
    d_val = _require_dataset(f, VALUE, where) if has_policy else None
    info_group = f.get(STEP_INFO_GROUP)
    d_info = ({k: _require_dataset(f, f"{STEP_INFO_GROUP}/{k}", where) for k in sorted(info_group.keys())}
              if isinstance(info_group, h5py.Group) else {})

    T = d_act.shape[0] if d_act.ndim >= 1 else 0
    if T == 0:
        raise EpisodeError(f"{where}: zero steps")
    lengths = {"action": T, "joint_positions": d_joint.shape[0], "reward": d_rew.shape[0], "timestamp": d_ts.shape[0]}
    lengths.update({f"images/{c}": d.shape[0] for c, d in d_imgs.items()})
    if has_policy:
        lengths.update({"policy/log_prob": d_lp.shape[0], "policy/value": d_val.shape[0]})
    lengths.update({f"{STEP_INFO_GROUP}/{k}": d.shape[0] for k, d in d_info.items()})
    if len(set(lengths.values())) != 1:
        raise EpisodeError(f"{where}: mismatched dataset lengths {lengths}")
    n_attr = int(a.get("n_steps", T))
    if n_attr != T:
        raise EpisodeError(f"{where}: n_steps attribute {n_attr} != dataset length {T}")
    if d_act.ndim != 2 or d_act.shape[1] != action_spec.dim:
        raise EpisodeError(f"{where}: action shape {d_act.shape} does not match action_spec dim {action_spec.dim}")
    if d_joint.ndim != 2 or d_joint.shape[1] != len(joint_names):
        raise EpisodeError(f"{where}: joint_positions shape {d_joint.shape} does not match {len(joint_names)} joint_names")
    if d_rew.ndim != 1 or d_ts.ndim != 1:
        raise EpisodeError(f"{where}: reward/timestamp must be 1-D, got {d_rew.shape}, {d_ts.shape}")
    image_shapes = {}
    for c, d in d_imgs.items():
        if d.dtype != np.uint8 or d.ndim != 4 or d.shape[3] != 3:
            raise EpisodeError(f"{where}: image dataset '{c}' must be (T, H, W, 3) uint8, got {d.shape} {d.dtype}")
        image_shapes[c] = tuple(int(s) for s in d.shape[1:])

    # ---- values: actions (always), the other small arrays (cheap) -------------------------
    actions = _read_array(d_act, where).astype(np.float32, copy=False)
    _check_finite(actions, "actions", where)
    joints = _read_array(d_joint, where).astype(np.float32, copy=False)
    _check_finite(joints, "joint_positions", where)
    rewards = _read_array(d_rew, where).astype(np.float32, copy=False)
    _check_finite(rewards, "rewards", where)
    timestamps = _read_array(d_ts, where).astype(np.float64, copy=False)
    arrays: dict[str, Any] = {}
    if want_arrays:
        arrays = {"actions": actions, "joint_positions": joints, "rewards": rewards, "timestamps": timestamps,
                  "log_probs": None, "values": None, "images": {},
                  "step_info": {k: _read_array(d, where).astype(np.float32, copy=False) for k, d in d_info.items()}}
        if has_policy:
            arrays["log_probs"] = _read_array(d_lp, where).astype(np.float32, copy=False)
            arrays["values"] = _read_array(d_val, where).astype(np.float32, copy=False)
        if load_images:
            arrays["images"] = {c: _read_array(d, where) for c, d in d_imgs.items()}
    elif load_images:  # decode every image chunk without keeping them (bounded memory)
        for d in d_imgs.values():
            for s in range(0, T, 32):
                try:
                    d[s : s + 32]
                except Exception as e:
                    raise EpisodeError(
                        f"{where}: cannot read dataset '{d.name}' frames {s}..{min(T, s + 32) - 1} "
                        f"({type(e).__name__}: {e})"
                    ) from e

    info = EpisodeInfo(
        path=path, name=_episode_name(path), instruction=instruction, task=task, source=source,
        success=success, iteration=iteration, n_steps=T, action_spec=action_spec,
        joint_names=[str(n) for n in joint_names], camera_names=list(camera_names),
        image_shapes=image_shapes, metadata=metadata,
        total_return=float(np.sum(rewards, dtype=np.float64)), has_policy=has_policy,
        format_version=version,
    )
    return info, arrays


def read_episode_info(path: str | os.PathLike, *, check_images: bool = False) -> EpisodeInfo:
    """Validate a file the way scan_episodes does (attrs + small arrays), return its summary.

    With check_images=True the image data are decoded too (catches corrupted image chunks).
    """
    info, _ = _load(Path(path), load_images=check_images, want_arrays=False)
    return info


def read_episode(path: str | os.PathLike, *, load_images: bool = True) -> Episode:
    """Load one finalized episode; raises EpisodeError with the file and a clear reason."""
    info, arr = _load(Path(path), load_images=load_images, want_arrays=True)
    return Episode(
        path=info.path, instruction=info.instruction, task=info.task, source=info.source,
        success=info.success, iteration=info.iteration, action_spec=info.action_spec,
        joint_names=info.joint_names, images=arr["images"], joint_positions=arr["joint_positions"],
        actions=arr["actions"], rewards=arr["rewards"], timestamps=arr["timestamps"],
        log_probs=arr["log_probs"], values=arr["values"], metadata=info.metadata,
        camera_names=info.camera_names, format_version=info.format_version, step_info=arr["step_info"],
    )


# --------------------------------------------------------------------------------------------
# scanning
# --------------------------------------------------------------------------------------------
@dataclass
class ScanResult:
    episodes: list[Path] = field(default_factory=list)              # valid, matching the filters, sorted
    rejected: list[tuple[Path, str]] = field(default_factory=list)  # (path, reason), incl. .partial files
    infos: list[EpisodeInfo] = field(default_factory=list)          # parallel to `episodes`
    skipped: int = 0                                                # valid but filtered out

    @property
    def incomplete(self) -> list[Path]:
        return [p for p, _ in self.rejected if p.name.endswith(PARTIAL_EXTENSION)]

    def __len__(self) -> int:
        return len(self.episodes)


def _as_filter(x: str | Iterable[str] | None) -> set[str] | None:
    if x is None:
        return None
    if isinstance(x, str):
        return {x}
    return set(x)


def scan_episodes(
    root: str | os.PathLike,
    *,
    sources: str | Iterable[str] | None = None,
    tasks: str | Iterable[str] | None = None,
    successful_only: bool = False,
    logger: logging.Logger | None = None,
    check_images: bool = False,
) -> ScanResult:
    """Find and validate every episode under `root` (recursively). Never raises for a bad file.

    Each `.h5` file is opened and its attrs and action/joint/reward arrays are checked (images are
    only checked for shape unless check_images=True). Bad files and `.partial` files go to
    `.rejected` with a reason and are logged as warnings via `logger`. Valid files that do not
    match `sources`/`tasks`/`successful_only` are silently skipped. A missing root is empty.
    """
    log = logger if logger is not None else _log
    src_f, task_f = _as_filter(sources), _as_filter(tasks)
    if src_f is not None:
        for s in src_f:
            _validate_source(s)
    result = ScanResult()
    root = Path(root)
    if root.is_file():
        candidates = [root]
    elif root.is_dir():
        candidates = sorted(
            [p for p in root.rglob(f"*{EXTENSION}") if p.is_file()]
            + [p for p in root.rglob(f"*{PARTIAL_EXTENSION}") if p.is_file()]
        )
    else:
        return result
    for p in candidates:
        try:
            info = read_episode_info(p, check_images=check_images)
        except EpisodeError as e:
            reason = str(e)
            prefix = f"{p}: "
            if reason.startswith(prefix):
                reason = reason[len(prefix):]
            result.rejected.append((p, reason))
            log.warning("rejected episode %s: %s", p, reason)
            continue
        except Exception as e:  # never raise for a bad file
            reason = f"unexpected error ({type(e).__name__}: {e})"
            result.rejected.append((p, reason))
            log.warning("rejected episode %s: %s", p, reason)
            continue
        if (src_f is not None and info.source not in src_f) or (task_f is not None and info.task not in task_f) or (
            successful_only and not info.success
        ):
            result.skipped += 1
            continue
        result.episodes.append(p)
        result.infos.append(info)
    return result
