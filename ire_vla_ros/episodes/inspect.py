"""Text reports behind `ire-vla episodes list|show|validate` (no ROS, no torch)."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import h5py

from ire_vla_ros.episodes.store import EpisodeError, read_episode, scan_episodes

__all__ = ["list_table", "show", "validate"]

_quiet = logging.getLogger(__name__ + ".quiet")
_quiet.addHandler(logging.NullHandler())
_quiet.propagate = False  # the reports below already list every rejected file


def _rel(p: Path, root: Path) -> str:
    try:
        return str(p.relative_to(root))
    except ValueError:
        return str(p)


def list_table(root: str | os.PathLike) -> str:
    """One line per valid episode: name, task, source, success, steps, iteration (+ return);
    a footer counts rejected/incomplete files (see `validate`)."""
    root = Path(root)
    res = scan_episodes(root, logger=_quiet)
    headers = ("name", "task", "source", "success", "steps", "iteration", "return")
    rows = [
        (
            _rel(i.path, root)[: -len(".h5")], i.task, i.source, "yes" if i.success else "no",
            str(i.n_steps), str(i.iteration), f"{i.total_return:.2f}",
        )
        for i in res.infos
    ]
    widths = [max([len(h)] + [len(r[k]) for r in rows]) for k, h in enumerate(headers)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*headers)] + [fmt.format(*r) for r in rows]
    n_ok = sum(i.success for i in res.infos)
    lines.append(f"{len(rows)} episode(s) ({n_ok} successful, {sum(i.n_steps for i in res.infos)} steps) in {root}")
    if res.rejected:
        lines.append(
            f"{len(res.rejected)} file(s) rejected ({len(res.incomplete)} incomplete); "
            "run `ire-vla episodes validate` for details"
        )
    return "\n".join(lines)


def _raw_dump(path: Path) -> list[str]:
    """Attrs and dataset shapes straight from HDF5, for files read_episode refuses."""
    out: list[str] = []
    try:
        with h5py.File(path, "r", locking=False) as f:
            out.append("attributes:")
            for k in sorted(f.attrs):
                out.append(f"  {k}: {f.attrs[k]!r}")
            out.append("datasets:")

            def visit(name, obj):
                if isinstance(obj, h5py.Dataset):
                    out.append(f"  /{name}: {obj.shape} {obj.dtype}")

            f.visititems(visit)
    except Exception as e:
        out.append(f"(cannot open as HDF5: {type(e).__name__}: {e})")
    return out


def show(path: str | os.PathLike) -> str:
    """Attributes, dataset shapes, return and success of one episode file."""
    path = Path(path)
    lines = [f"episode: {path}"]
    try:
        ep = read_episode(path, load_images=False)
    except EpisodeError as e:
        lines.append(f"INVALID: {e}")
        if path.exists():
            lines += _raw_dump(path)
        return "\n".join(lines)
    lines += [
        f"  instruction: {ep.instruction}",
        f"  task: {ep.task}",
        f"  source: {ep.source}",
        f"  iteration: {ep.iteration}",
        f"  success: {ep.success}",
        f"  steps: {ep.n_steps}",
        f"  return: {ep.total_return:.4f}",
        f"  duration: {float(ep.timestamps[-1] - ep.timestamps[0]):.3f} s",
        f"  action_spec: {json.dumps(ep.action_spec.to_dict())}",
        f"  joint_names: {ep.joint_names}",
        f"  metadata: {json.dumps(ep.metadata)}",
        "  datasets:",
    ]
    with h5py.File(path, "r", locking=False) as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                comp = f" [{obj.compression}]" if obj.compression else ""
                lines.append(f"    /{name}: {obj.shape} {obj.dtype}{comp}")

        f.visititems(visit)
        extra = sorted(set(f.attrs) - {"instruction", "task", "source", "iteration", "success", "n_steps",
                                       "action_spec", "joint_names", "metadata"})
        lines.append("  other attributes: " + ", ".join(f"{k}={f.attrs[k]!r}" for k in extra))
    a = ep.actions
    lines.append("  action min/mean/max per dim:")
    for k, nm in enumerate(ep.action_spec.names):
        lines.append(f"    {nm}: {a[:, k].min():+.3f} / {a[:, k].mean():+.3f} / {a[:, k].max():+.3f}")
    for key, values in sorted(ep.step_info.items()):
        lines.append(f"  step_info/{key} min/mean/max: {values.min():.4g} / {values.mean():.4g} / {values.max():.4g}")
    lines.append(f"  file size: {path.stat().st_size / 1024:.1f} KiB")
    return "\n".join(lines)


def validate(root: str | os.PathLike) -> tuple[str, int]:
    """Deep check of every episode file under root (including image data).

    Returns (report, number of bad files). Bad = corrupted/truncated, incomplete (.partial),
    or failing any read_episode check.
    """
    root = Path(root)
    res = scan_episodes(root, logger=_quiet, check_images=True)
    lines = []
    for p, reason in res.rejected:
        lines.append(f"BAD  {_rel(p, root)}: {reason}")
    lines.append(f"{len(res.episodes)} valid episode(s), {len(res.rejected)} bad file(s) "
                 f"({len(res.incomplete)} incomplete) under {root}")
    if not root.exists():
        lines.append(f"(directory {root} does not exist)")
    return "\n".join(lines), len(res.rejected)
