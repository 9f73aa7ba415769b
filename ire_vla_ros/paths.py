"""Where the package's shared files (config/, launch/, models/) live.

Installed by colcon they are in the ament share directory; in a source checkout (pip -e, tests)
they sit next to the Python package. Both are tried, share first.
"""
from __future__ import annotations

from pathlib import Path

PACKAGE = "ire_vla_ros"
SOURCE_ROOT = Path(__file__).resolve().parent.parent


def share_dir() -> Path:
    try:  # ament_index_python exists wherever ROS 2 does; not a hard dependency of the core
        from ament_index_python.packages import PackageNotFoundError, get_package_share_directory

        try:
            share = Path(get_package_share_directory(PACKAGE))
            if (share / "config").is_dir():
                return share
        except (PackageNotFoundError, OSError):  # OSError: AMENT_PREFIX_PATH unset (no ROS sourced)
            pass
    except ImportError:
        pass
    return SOURCE_ROOT


def config_path(name: str) -> Path:
    return share_dir() / "config" / name


def models_dir() -> Path:
    return share_dir() / "models"


class PathOutsideRoot(ValueError):
    """A run-time path (from a message, a service or a file) that does not resolve inside its root."""


def confine(root: str | Path, candidate: str | Path) -> Path:
    """`candidate` resolved inside `root`, or PathOutsideRoot with the reason.

    A relative candidate is taken relative to root. `..` segments, absolute paths elsewhere and
    symlinks (anywhere along the path) that lead out of root are refused: the check is made on the
    fully resolved path against the fully resolved root. For paths that arrive at run time from
    ROS messages or services; launch-time parameters are trusted and need no confinement.
    """
    root_resolved = Path(root).expanduser().resolve()
    text = str(candidate)
    if not text or "\x00" in text:
        raise PathOutsideRoot(f"refused path {text!r}: empty or contains NUL")
    path = Path(text).expanduser()
    joined = path if path.is_absolute() else root_resolved / path
    resolved = joined.resolve()
    if resolved != root_resolved and root_resolved not in resolved.parents:
        why = "symlink leads" if joined.absolute() != resolved and ".." not in path.parts else "resolves"
        raise PathOutsideRoot(f"refused path {text!r}: {why} outside {root_resolved} (to {resolved})")
    return resolved
