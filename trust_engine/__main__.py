"""Command line: `python -m trust_engine <command>`; the bundled testbed is the default model everywhere.
Commands: testbed-check (quality report of the testbed), demo (the main job).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _progress(label: str):
    """A one-line textual progress bar on stderr (the CLI's face of the engine's progress protocol)."""
    start = time.time()

    def report(done: int, total: int) -> None:
        filled = int(30 * done / max(1, total))
        sys.stderr.write(f"\r{label} [{'#' * filled}{'.' * (30 - filled)}] {done}/{total} {time.time() - start:.0f}s")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return report


def cmd_testbed_check(args: argparse.Namespace) -> int:
    from .testbed import check

    config = check.CheckConfig(steps=args.steps, cfg=args.cfg, seed=args.seed)
    report, samples = check.run(config, progress=None if args.json else _progress("sampling"))
    if args.grid:
        prompts = [p for name in ("single_object", "two_object") for p in samples[name][0][::6]]
        images = [i for name in ("single_object", "two_object") for i in samples[name][1][::6]]
        import torch

        check.save_grid(args.grid, prompts, torch.stack(images))
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key:>32}: {value}")
        if args.grid:
            print(f"{'grid':>32}: {args.grid}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Until the unlearning engine lands: the testbed's quality report and a PNG grid of its samples."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ns = argparse.Namespace(json=False, steps=args.steps, cfg=args.cfg, seed=args.seed, grid=str(out / "testbed_samples.png"))
    return cmd_testbed_check(ns)


def main(argv: list[str] | None = None) -> int:
    from .testbed.check import DEFAULT_CFG, DEFAULT_STEPS

    parser = argparse.ArgumentParser(prog="python -m trust_engine", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def sampling_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"DDIM steps (default {DEFAULT_STEPS})")
        p.add_argument("--cfg", type=float, default=DEFAULT_CFG, help=f"guidance scale (default {DEFAULT_CFG})")
        p.add_argument("--seed", type=int, default=0, help="seed of prompts and sampling noise (default 0)")

    p = sub.add_parser("testbed-check", help="sample the bundled model over a fixed prompt set and judge it")
    sampling_options(p)
    p.add_argument("--json", action="store_true", help="print one JSON object and nothing else on stdout")
    p.add_argument("--grid", help="also write a PNG grid of samples to this path")
    p.set_defaults(func=cmd_testbed_check)

    p = sub.add_parser("demo", help="the main job on the bundled testbed; writes PNGs to --out")
    sampling_options(p)
    p.add_argument("--out", default="out", help="folder for the PNG grid (default ./out)")
    p.set_defaults(func=cmd_demo)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
