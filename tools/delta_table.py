"""Markdown table of judged deltas (the JSON files tools/judge_deltas.py writes).

    PYTHONPATH=. python tools/delta_table.py judged/a.judge.json judged/b.judge.json ... [--label-from-name]

Per delta: forget before -> after, synonym forget, preserve before -> after (single / two-object after), parts
before -> after, rows changed, steps run (from the delta's metadata), and, when the unlearn process was run under
`/usr/bin/time -v -o <delta stem>.unlearn.time`, its wall clock and CPU (user + system) seconds: the whole process
(model load, forget/retain generation and training), the one time measured the same way for every engine version.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path


def _time_file(path: Path) -> dict[str, float]:
    if not path.exists():
        return {}
    text = path.read_text()
    out = {}
    user = re.search(r"User time \(seconds\): ([\d.]+)", text)
    system = re.search(r"System time \(seconds\): ([\d.]+)", text)
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text)
    if user and system:
        out["cpu"] = float(user.group(1)) + float(system.group(1))
    if wall:
        seconds = 0.0
        for part in wall.group(1).split(":"):
            seconds = seconds * 60 + float(part)
        out["wall"] = seconds
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("judged", nargs="+")
    args = ap.parse_args()

    from trust_engine.delta import Delta

    print("| run | forget before → after | synonym forget | preserve before → after | single / two-object after "
          "| parts before → after | rows changed | steps | unlearn wall / CPU s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.judged:
        r = json.loads(Path(name).read_text())
        delta_path = Path(r["delta"])
        delta = Delta.load(str(delta_path))
        rows = sum(d.rank for d in delta.sites.values())
        steps = delta.metadata.get("steps_run", "?")
        t = _time_file(delta_path.with_name(delta_path.name.removesuffix(".safetensors") + ".unlearn.time"))
        parts = (f"{r['parts_accuracy_before']:.2f} → {r['parts_accuracy']:.2f}"
                 if r["parts_accuracy"] == r["parts_accuracy"] else "—")
        timing = f"{t['wall']:.0f} / {t['cpu']:.0f}" if t else "?"
        print(f"| {delta_path.name.removesuffix('.safetensors')} "
              f"| {r['forget_rate_before']:.2f} → {r['forget_rate']:.2f} | {r['synonym_forget_rate']:.2f} "
              f"| {r['preserve_accuracy_before']:.3f} → {r['preserve_accuracy']:.3f} "
              f"| {r['preserve_single_accuracy']:.2f} / {r['preserve_two_object_accuracy']:.3f} | {parts} "
              f"| {rows:,} | {steps} | {timing} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
