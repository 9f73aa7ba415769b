"""Episode writing in a child process, so that a filesystem fault cannot take the caller down.

Why: h5py does not survive ENOSPC/EIO in the middle of a file. Measured on a 4 MB tmpfs: the
write raises OSError, `close()` raises again, and freeing the half-closed file segfaults the
Python process ("Can't destroy cache", then SIGSEGV): `ire-vla collect` died with rc -11, and a
recorder node would have died with it. Here every h5py handle lives in a child process:

* before each episode and each step the child checks free space (`min_free_mb` plus twice the
  step's raw size: HDF5 keeps up to one unwritten image chunk in its cache) and aborts the episode
  while there is still room;
* that abort, and an OSError while writing anyway (EIO, a quota, another process filling the
  disk), make the child report the error, remove the partial file and exit at once with os._exit,
  before h5py can free a broken handle (a failed close is not always raised by h5py); the parent
  starts a fresh child for the next episode (about half a second);
* a child that dies for any other reason (a segfault) is noticed by the parent (closed pipe), the
  episode is reported failed and the partial file removed.

Finished episodes are never touched: they were renamed into place (fsynced) before the next began.

Messages are small JSON headers over a private socketpair (no pickle). The images travel through
a ring of frame slots in shared memory (`_FrameRing`): the parent copies a step's images into a
free slot once, the child hands a numpy view of the slot straight to h5py and then counts the slot
free. Sending the images through the socket instead (what this module did first, still the
fallback where memfd_create is missing) copies each frame into and out of the kernel in socket-
buffer pieces; measured on 640x480 rgb8 frames (2 loaded cores) the ring saves the child about
0.2 ms of its 2.5-2.9 ms CPU per step. What is left is h5py's: the image chunk (lzf, fletcher32)
as in a bare h5py loop, plus EpisodeWriter's six small per-step datasets (about 0.5 ms). The ring
is an anonymous memfd passed to the child with SCM_RIGHTS: it has no name under /dev/shm, so
nothing can leak when either process dies; its memory goes with the last mapping.

    proc = WriterProcess(min_free_mb=100)
    w = proc.open(root, dict(instruction=..., task=..., source=..., action_spec=..., joint_names=...))
    w.append(images={"main": rgb}, joint_positions=q, action=a, reward=r, timestamp=t)
    path = w.finalize(True)
    proc.close()
"""
from __future__ import annotations

import json
import mmap
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ire_vla_ros.vla.action_spec import ActionSpec

__all__ = ["EpisodeWriteError", "WriterProcess", "ProcessEpisodeWriter"]

_FAULT_EXIT = 75  # the child's exit status after a filesystem fault (EX_TEMPFAIL)
_RING_SLOTS = 6  # steps in flight between parent and child (slack for the child's slower steps)
_RING_MAX_BYTES = 64 * 1024 * 1024  # fewer slots (at least 2) for very large steps
_RING_HEAD = 64  # bytes before the first slot: the child's count of consumed steps (int64)
_RING_NAME = "ire_vla_writer_ring"  # the memfd's name, as /proc/<pid>/maps shows it
_PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])


class EpisodeWriteError(RuntimeError):
    """The episode could not be written (disk full, I/O error, writer process died); it was aborted."""


def _send(conn: Connection, header: dict, blobs: tuple = ()) -> None:
    conn.send_bytes(json.dumps(header).encode())
    for b in blobs:
        conn.send_bytes(b)


def _recv(conn: Connection) -> dict:
    return json.loads(conn.recv_bytes().decode())


class _FrameRing:
    """Frame slots in shared memory (an anonymous memfd) between the parent and the child.

    Step number k uses slot k % slots. The parent writes a slot only once the child has counted
    the step that used it before as consumed (`consumed`, an int64 in the ring's head that only
    the child writes; aligned 8-byte stores are atomic on the platforms ROS 2 runs on); the child
    counts a step consumed once h5py has taken its data. The memory is bounded: slots x the first
    step's image bytes.
    """

    def __init__(self, fd: int, slots: int, slot_bytes: int):
        self.slots, self.slot_bytes = int(slots), int(slot_bytes)
        self._mm = mmap.mmap(fd, _RING_HEAD + self.slots * self.slot_bytes)
        self.consumed = np.ndarray((1,), np.int64, buffer=self._mm, offset=0)
        self.data = np.ndarray((self.slots, self.slot_bytes), np.uint8, buffer=self._mm, offset=_RING_HEAD)
        self.produced = 0  # parent side: steps written into the ring

    @classmethod
    def create(cls, step_bytes: int) -> tuple["_FrameRing", int]:
        """A new ring for steps of `step_bytes` image bytes, and its fd (the caller closes it)."""
        slots = max(2, min(_RING_SLOTS, _RING_MAX_BYTES // max(1, step_bytes)))
        fd = os.memfd_create(_RING_NAME, os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, _RING_HEAD + slots * step_bytes)
            return cls(fd, slots, step_bytes), fd
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        self.consumed = self.data = None
        try:
            self._mm.close()
        except BufferError:  # a view of it is still alive: the mapping ends with that view
            pass


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


# =============================================================================================
# parent side
# =============================================================================================
class WriterProcess:
    """One child process that writes episodes, one at a time; restarted when it has died."""

    def __init__(self, *, min_free_mb: float = 0.0, start: bool = True, reply_timeout_s: float = 120.0):
        self.min_free_mb = float(min_free_mb)
        self.reply_timeout_s = float(reply_timeout_s)
        self.restarts = 0
        self.last_exit = ""
        self._proc: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self._ring: _FrameRing | None = None  # the current child's frame ring (made at its first step)
        self._lock = threading.Lock()
        if start:
            self.ensure_started()

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def ensure_started(self) -> None:
        with self._lock:
            if self.alive:
                return
            if self._proc is not None:
                self._reap()
            if self.last_exit:
                self.restarts += 1
            parent_sock, child_sock = socket.socketpair()
            try:
                self._proc = subprocess.Popen(
                    [sys.executable, "-m", "ire_vla_ros.episodes.safe_writer", str(child_sock.fileno())],
                    pass_fds=(child_sock.fileno(),), stdin=subprocess.DEVNULL, close_fds=True,
                    env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": _PACKAGE_PARENT + os.pathsep
                         + os.environ.get("PYTHONPATH", "")},  # this very package, however it was found
                )
            finally:
                child_sock.close()
            self._conn = Connection(parent_sock.detach())

    def _reap(self) -> None:
        proc, self._proc = self._proc, None
        if self._ring is not None:  # the child's mapping ends with the child
            self._ring.close()
            self._ring = None
        if self._conn is not None:
            try:
                self._conn.close()
            except OSError:
                pass
            self._conn = None
        if proc is not None:
            try:
                code = proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
            self.last_exit = _describe_exit(code)

    def open(self, root, meta: Mapping[str, Any], *, compression: str | None = "lzf") -> "ProcessEpisodeWriter":
        """Start an episode (`meta`: EpisodeWriter's keyword arguments); raises what EpisodeWriter
        raises (ValueError for bad metadata) or EpisodeWriteError (disk full, I/O error)."""
        self.ensure_started()
        meta = dict(meta)
        spec = meta.get("action_spec")
        if isinstance(spec, ActionSpec):
            meta["action_spec"] = spec.to_dict()
        meta["camera_names"] = list(meta.get("camera_names", ("main",)))
        meta["joint_names"] = list(meta["joint_names"])
        reply = self.request({"op": "open", "root": str(root), "meta": meta, "compression": compression,
                              "min_free_mb": self.min_free_mb})
        if reply["op"] == "error":
            raise (ValueError if reply.get("kind") == "value" else EpisodeWriteError)(reply["message"])
        return ProcessEpisodeWriter(self, reply, meta)

    # plumbing used by ProcessEpisodeWriter ---------------------------------------------------
    def send(self, header: dict, blobs: tuple = ()) -> None:
        conn = self._conn
        if conn is None or not self.alive:
            raise EpisodeWriteError(self._death())
        try:
            _send(conn, header, blobs)
        except (OSError, EOFError, ValueError):
            raise EpisodeWriteError(self._death()) from None

    def send_images(self, header: dict, images: Mapping[str, np.ndarray]) -> None:
        """Send a step: its images through the frame ring (waiting for a free slot while the
        child is busy), the header through the socket."""
        nbytes = sum(int(a.nbytes) for a in images.values())
        ring = self._ring_for(nbytes)
        if ring is None:  # no shared memory here: the images follow the header on the socket
            self.send(header, tuple(memoryview(np.ascontiguousarray(a)).cast("B") for a in images.values()))
            return
        self._wait_for_slot(ring)
        slot = ring.produced % ring.slots
        dst, off = ring.data[slot], 0
        for a in images.values():
            np.copyto(dst[off:off + a.nbytes].reshape(a.shape), a)
            off += a.nbytes
        self.send({**header, "slot": slot})
        ring.produced += 1

    def _ring_for(self, nbytes: int) -> "_FrameRing | None":
        """The child's ring if its slots hold `nbytes`; else a new one, handed to the child (the
        child switches to it after the steps sent before, so the old one may go at once)."""
        ring = self._ring
        if ring is not None and ring.slot_bytes >= nbytes:
            return ring
        if not hasattr(os, "memfd_create"):
            return None
        conn = self._conn
        if conn is None or not self.alive:
            raise EpisodeWriteError(self._death())
        try:
            new, fd = _FrameRing.create(nbytes)
        except OSError:
            return None  # no memory for a ring now: this step goes through the socket
        try:
            _send(conn, {"op": "ring", "slots": new.slots, "slot_bytes": new.slot_bytes})
            with socket.socket(fileno=os.dup(conn.fileno())) as sock:
                socket.send_fds(sock, [b"R"], [fd])
        except (OSError, EOFError, ValueError):
            new.close()
            raise EpisodeWriteError(self._death()) from None
        finally:
            os.close(fd)  # both mappings keep the memory; no name, no fd left behind
        if ring is not None:
            ring.close()
        self._ring = new
        return new

    def _wait_for_slot(self, ring: "_FrameRing") -> None:
        """Until the child has consumed the step that used the next slot before (or died)."""
        if ring.produced - int(ring.consumed[0]) < ring.slots:
            return
        deadline = time.monotonic() + self.reply_timeout_s
        pause = 0.0005  # growing to 4 ms: the other slots keep the child busy meanwhile
        while ring.produced - int(ring.consumed[0]) >= ring.slots:
            self._give_up_if_stuck(deadline, f"took more than {self.reply_timeout_s:.0f} s for one step")
            time.sleep(pause)
            pause = min(0.004, 2 * pause)

    def _give_up_if_stuck(self, deadline: float, what: str) -> None:
        """While waiting on the child: EpisodeWriteError if it died, or (killing it) once `deadline` passed."""
        if not self.alive:
            raise EpisodeWriteError(self._death())
        if time.monotonic() >= deadline:
            self.kill()
            raise EpisodeWriteError(f"episode writer process {what} (killed)")

    def poll_fault(self) -> str | None:
        """A fault the child reported since the last call (non-blocking), else None."""
        conn = self._conn
        try:
            while conn is not None and conn.poll(0):
                msg = _recv(conn)
                if msg["op"] == "fault":
                    return msg["message"]
        except (OSError, EOFError, ValueError):
            return self._death()
        return None

    def request(self, header: dict) -> dict:
        """Send and wait for the answer, skipping fault notices (they are repeated in the answer)."""
        self.send(header)
        deadline = time.monotonic() + self.reply_timeout_s
        conn = self._conn
        try:
            while True:
                if not conn.poll(min(1.0, max(0.0, deadline - time.monotonic()))):
                    self._give_up_if_stuck(deadline, f"did not answer within {self.reply_timeout_s:.0f} s")
                    continue
                msg = _recv(conn)
                if msg["op"] != "fault":
                    return msg
        except (OSError, EOFError, ValueError):
            raise EpisodeWriteError(self._death()) from None

    def _death(self) -> str:
        """The child is gone (or going): its last fault notice if it sent one, and how it ended."""
        fault = ""
        with self._lock:
            conn = self._conn
            try:
                while conn is not None and conn.poll(0):
                    msg = _recv(conn)
                    if msg.get("op") == "fault":
                        fault = msg["message"]
            except (OSError, EOFError, ValueError):
                pass
            if self._proc is not None:
                try:
                    self._proc.wait(timeout=5.0)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                self._reap()
        how = f"episode writer process ended ({self.last_exit or 'pipe closed'})"
        return f"{fault}; {how}" if fault else how

    def retire(self, timeout: float = 5.0) -> None:
        """Reap a child that is exiting after a fault (killed after `timeout`) and start a fresh
        one, so the next episode does not wait for the start-up."""
        with self._lock:
            if self._proc is not None:
                try:
                    self._proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                self._reap()
        self.ensure_started()

    def kill(self) -> None:
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                self._proc.kill()
            self._reap()

    def close(self) -> None:
        """Ask the child to quit (an open episode is discarded), then reap it."""
        with self._lock:
            if self._conn is not None and self.alive:
                try:
                    _send(self._conn, {"op": "quit"})
                except OSError:
                    pass
            if self._proc is not None:
                try:
                    self._proc.wait(timeout=10.0)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
            self._reap()

    def __enter__(self) -> "WriterProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ProcessEpisodeWriter:
    """EpisodeWriter's interface (append / finalize / abort) for an episode written by a WriterProcess.

    `append` validates the step here (bad values raise ValueError and the episode goes on) and
    streams it to the child without waiting; a fault the child reports (disk full, I/O error, its
    death) raises EpisodeWriteError from the next append or finalize: the episode is gone, the
    partial file removed.
    """

    def __init__(self, proc: WriterProcess, reply: dict, meta: dict):
        from ire_vla_ros.episodes.store import StepValidator

        self._proc = proc
        self.partial_path = Path(reply["partial_path"])
        self.final_path = Path(reply["final_path"])
        self.name = reply["name"]
        self._check = StepValidator(meta["camera_names"], meta["joint_names"],
                                    ActionSpec.from_dict(meta["action_spec"]).dim)
        self._n = 0
        self._state = "open"
        self._fault: str | None = None
        self.write_time_s = 0.0  # time the child spent writing (reported by finalize)

    @property
    def n_steps(self) -> int:
        return self._n

    @property
    def is_open(self) -> bool:
        return self._state == "open"

    def _fail(self, message: str) -> None:
        self._state = "failed"
        self._fault = message
        self._proc.retire()  # the child exits after a fault: wait for it, the next open starts afresh
        try:  # the child has removed it already, unless it died before it could
            self.partial_path.unlink()
        except OSError:
            pass
        raise EpisodeWriteError(f"episode {self.name} aborted: {message}")

    def _check_fault(self) -> None:
        if self._state == "failed":
            raise EpisodeWriteError(f"episode {self.name} aborted: {self._fault}")
        if self._state != "open":
            raise RuntimeError(f"episode writer is {self._state}")
        fault = self._proc.poll_fault()
        if fault:
            self._fail(fault)

    def append(self, *, images, joint_positions, action, reward, timestamp, log_prob=None, value=None,
               step_info=None) -> int:
        self._check_fault()
        step = self._check.check(images=images, joint_positions=joint_positions, action=action, reward=reward,
                                 timestamp=timestamp, log_prob=log_prob, value=value, step_info=step_info)
        cams = list(step.images)
        header = {"op": "step", "cams": cams, "shapes": [list(step.images[c].shape) for c in cams],
                  "joint_positions": step.joint_positions.tolist(), "action": step.action.tolist(),
                  "reward": step.reward, "timestamp": step.timestamp, "log_prob": step.log_prob,
                  "value": step.value, "step_info": step.step_info, "nbytes": step.nbytes}
        try:
            self._proc.send_images(header, step.images)
        except EpisodeWriteError as exc:
            self._fail(str(exc))
        self._check.accept(step)
        self._n += 1
        return self._n

    def finalize(self, success: bool, *, metadata: Mapping[str, Any] | None = None) -> Path:
        from ire_vla_ros.episodes.store import EpisodeError

        self._check_fault()
        try:
            reply = self._proc.request({"op": "finalize", "success": bool(success), "metadata": dict(metadata or {})})
        except EpisodeWriteError as exc:
            self._fail(str(exc))
        if reply["op"] == "error":
            self._state = "failed"
            if reply.get("kind") == "empty":
                raise EpisodeError(reply["message"])
            self._fail(reply["message"])
        self._state = "finalized"
        self.write_time_s = float(reply.get("write_s", 0.0))
        return Path(reply["path"])

    def abort(self) -> None:
        if self._state != "open":
            return
        self._state = "aborted"
        try:
            self._proc.request({"op": "abort"})
        except EpisodeWriteError:
            try:
                self.partial_path.unlink()
            except OSError:
                pass


# =============================================================================================
# child side
# =============================================================================================
def _child_main(fd: int) -> int:
    from ire_vla_ros.diskspace import MB, DiskSpaceError, free_bytes, require_free_space
    from ire_vla_ros.episodes.store import EpisodeError, EpisodeWriter, ValidStep

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the parent, which closes us
    conn = Connection(fd)
    sock = socket.socket(fileno=os.dup(fd))  # the same socket, to receive the ring's fd
    ring: _FrameRing | None = None
    writer: EpisodeWriter | None = None
    root: Path | None = None
    min_free_mb = 0.0
    write_s = 0.0
    free_seen = 0     # free bytes at the last measurement
    unflushed = 0     # raw bytes appended since (HDF5 caches them: the file does not grow yet)

    def die(message: str) -> None:
        """After an OSError inside h5py: report, remove the partial file, exit before h5py
        frees its broken handles (which segfaults)."""
        try:
            _send(conn, {"op": "fault", "message": message})
        except OSError:
            pass
        if writer is not None:
            try:
                os.unlink(writer.partial_path)
            except OSError:
                pass
        os._exit(_FAULT_EXIT)

    while True:
        try:
            msg = _recv(conn)
        except (EOFError, OSError):
            break
        op = msg["op"]
        if op == "quit":
            break
        if op == "open":
            if writer is not None:
                writer.abort()
            writer, write_s = None, 0.0
            root = Path(msg["root"])
            min_free_mb = float(msg["min_free_mb"])
            try:
                root.mkdir(parents=True, exist_ok=True)
                require_free_space(root, min_free_mb, what="a new episode")
                free_seen, unflushed = free_bytes(root), 0
                writer = EpisodeWriter(root, compression=msg["compression"], **msg["meta"])
            except (ValueError, TypeError, FileExistsError) as exc:
                _send(conn, {"op": "error", "kind": "value", "message": str(exc)})
                continue
            except OSError as exc:
                _send(conn, {"op": "error", "kind": "io", "message": f"cannot create episode: {exc}"})
                if not isinstance(exc, DiskSpaceError):
                    os._exit(_FAULT_EXIT)
                continue
            _send(conn, {"op": "ok", "name": writer.name, "partial_path": str(writer.partial_path),
                         "final_path": str(writer.final_path)})
        elif op == "ring":
            _, fds, _, _ = socket.recv_fds(sock, 1, 1)
            if len(fds) != 1:
                die(f"frame ring: expected one file descriptor, got {len(fds)}")
            if ring is not None:
                ring.close()
            try:
                ring = _FrameRing(fds[0], msg["slots"], msg["slot_bytes"])
            except (OSError, ValueError) as exc:
                die(f"frame ring: cannot map {msg['slots']} x {msg['slot_bytes']} bytes: {exc}")
            finally:
                os.close(fds[0])
        elif op == "step":
            slot = msg.get("slot")
            if slot is None:
                blobs = [conn.recv_bytes() for _ in msg["cams"]]
                images = {c: np.frombuffer(b, np.uint8).reshape(s) for c, b, s in zip(msg["cams"], blobs, msg["shapes"])}
            else:  # views of the slot: h5py reads them directly, the slot is freed once it has
                images, off, base = {}, 0, ring.data[slot]
                for c, s in zip(msg["cams"], msg["shapes"]):
                    n = int(np.prod(s))
                    images[c] = base[off:off + n].reshape(s)
                    off += n
            if writer is None:
                if slot is not None:
                    ring.consumed[0] += 1
                continue  # the episode failed: its remaining steps are dropped
            step = ValidStep(images=images, joint_positions=np.asarray(msg["joint_positions"], np.float32),
                             action=np.asarray(msg["action"], np.float32), reward=msg["reward"],
                             timestamp=msg["timestamp"], log_prob=msg["log_prob"], value=msg["value"],
                             step_info=msg["step_info"])
            t0 = time.perf_counter()
            try:
                # Raw sizes bound what the cached, not yet written data will take: while they fit
                # into the free space last measured, no syscall and no flush. Otherwise flush (the
                # file now shows its true size), measure again, and refuse the step if it does
                # not fit with twice its size (one more chunk may sit in the cache) to spare.
                need = 2 * int(msg["nbytes"]) + int(max(0.0, min_free_mb) * MB)
                if free_seen < unflushed + need:
                    writer.flush()
                    free_seen, unflushed = free_bytes(root), 0
                    if free_seen < need:
                        raise DiskSpaceError(
                            f"disk full: {free_seen / MB:.1f} MB free under {root}, the next step needs "
                            f"{2 * int(msg['nbytes']) / MB:.1f} MB + min_free_mb {min_free_mb:g} MB")
                writer.append_valid(step)
                unflushed += int(msg["nbytes"])
            except DiskSpaceError as exc:
                # Checked before writing, so the file is still sound; but closing it on a nearly
                # full disk can fail, and h5py hides a failed close until it segfaults later: the
                # child ends after every fault, the next episode gets a fresh one.
                die(f"{exc} (episode aborted after {writer.n_steps} steps)")
            except Exception as exc:  # OSError from h5py (ENOSPC, EIO), or anything else it raises
                die(f"write failed: {type(exc).__name__}: {exc}")
            if slot is not None:
                ring.consumed[0] += 1  # h5py holds no reference to the slot: the parent may reuse it
            write_s += time.perf_counter() - t0
        elif op == "finalize":
            if writer is None:
                _send(conn, {"op": "error", "kind": "io", "message": "no episode is open"})
                continue
            w, writer = writer, None
            t0 = time.perf_counter()
            try:
                path = w.finalize(msg["success"], metadata=msg["metadata"] or None)
            except (EpisodeError, ValueError) as exc:  # zero steps or bad metadata: nothing kept
                w.abort()
                _send(conn, {"op": "error", "kind": "empty", "message": str(exc)})
                continue
            except Exception as exc:  # OSError from h5py (ENOSPC, EIO), or anything else it raises
                writer = w
                die(f"finalize failed: {type(exc).__name__}: {exc}")
            write_s += time.perf_counter() - t0
            _send(conn, {"op": "saved", "path": str(path), "write_s": write_s, "steps": w.n_steps})
        elif op == "abort":
            if writer is not None:
                writer.abort()
            writer = None
            _send(conn, {"op": "aborted"})
    if writer is not None:
        writer.abort()
    return 0


if __name__ == "__main__":
    raise SystemExit(_child_main(int(sys.argv[1])))
