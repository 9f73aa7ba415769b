"""`ire-vla episodes export --format mcap|lerobot` and `ire-vla episodes import --format lerobot`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ire_vla_ros.episodes.store import SOURCES


def _selection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", dest="sources", nargs="+", choices=SOURCES, help="only these sources")
    p.add_argument("--task", dest="tasks", nargs="+", help="only these tasks")
    p.add_argument("--successful", action="store_true", help="only successful episodes")


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", type=Path, help="episode store root (or one episode file)")
    p.add_argument("--format", required=True, choices=("mcap", "lerobot"))
    p.add_argument("--out", type=Path, required=True,
                   help="mcap: directory for <episode>.mcap files; lerobot: the new dataset directory")
    p.add_argument("--single", type=Path, help="mcap: all selected episodes in this one file (relative to --out)")
    p.add_argument("--rate", type=float, default=10.0,
                   help="control rate (Hz) for the twist conversion / LeRobot fps when an episode does not record "
                        "one (default: %(default)s)")
    p.add_argument("--robot-type", help="lerobot: info.json robot_type")
    p.add_argument("--codec", choices=("h264", "av1"), default="h264", help="lerobot: video codec (default: %(default)s)")
    p.add_argument("--crf", type=int, default=18, help="lerobot: encoder quality, lower is better (default: %(default)s)")
    _selection(p)


def run_export(args) -> int:
    try:
        if args.format == "mcap":
            from ire_vla_ros.episodes.mcap_export import export_mcap

            files = export_mcap(args.path, args.out, single=args.single, rate_hz=args.rate, sources=args.sources,
                                tasks=args.tasks, successful_only=args.successful)
            for f in files:
                print(f)
            print(f"{len(files)} MCAP file(s) in {args.out}")
        else:
            from ire_vla_ros.episodes.lerobot import export_lerobot

            out = export_lerobot(args.path, args.out, fps=None if args.rate == 10.0 else args.rate,
                                 robot_type=args.robot_type, codec=args.codec, crf=args.crf, sources=args.sources,
                                 tasks=args.tasks, successful_only=args.successful)
            print(f"LeRobotDataset v3.0 in {out}")
    except (ValueError, OSError) as e:
        print(f"export: {e}", file=sys.stderr)
        return 2
    return 0


def add_import_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", type=Path, help="LeRobotDataset v3.0 directory")
    p.add_argument("--format", required=True, choices=("lerobot",))
    p.add_argument("--out", type=Path, required=True, help="episode store root")
    p.add_argument("--source", choices=SOURCES, help="tag the episodes with this source (default: as exported, "
                                                      "else teleop)")
    p.add_argument("--episodes", type=int, nargs="+", help="only these episode indices")


def run_import(args) -> int:
    from ire_vla_ros.episodes.lerobot import import_lerobot

    try:
        files = import_lerobot(args.path, args.out, source=args.source, episodes=args.episodes)
    except (ValueError, OSError, KeyError) as e:
        print(f"import: {e}", file=sys.stderr)
        return 2
    print(f"{len(files)} episode(s) imported into {args.out}")
    return 0
