"""Judge several delta files on the testbed in one process, as `python -m trust_engine evaluate --json` does for
one (same eval sets, seeds and judge), but with the base model's figures computed once per (concept, mode).

    PYTHONPATH=. python tools/judge_deltas.py OUT_DIR a.safetensors b.safetensors ... [--seeds 2] [--wait]

Writes OUT_DIR/<delta stem>.judge.json per delta: the keys `evaluate --json` prints. The base figures are
deterministic (fixed generation seeds), so they are the `…_before` keys of every delta of that concept.
--wait: a delta not written yet is waited for (its file present, unchanged for 10 s, and loadable), so this can
run next to the unlearn runs that produce the deltas.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _wait_loadable(path: Path):
    from trust_engine.delta import Delta

    last = None
    while True:
        if path.exists():
            size = path.stat().st_size
            if size == last:
                try:
                    return Delta.load(str(path))
                except Exception as error:  # half-written file: wait for the writer
                    print(f"{path}: not loadable yet ({error})", file=sys.stderr)
            last = size
        time.sleep(10)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("deltas", nargs="+")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--wait", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--before-from", nargs="*", default=[],
                    help="judged JSON files of earlier deltas: their `…_before` figures are reused for the same "
                         "concept and mode (the base model's figures are deterministic)")
    ap.add_argument("--warm", nargs=2, metavar=("CONCEPT", "MODE"),
                    help="judge the base model on this concept first (while --wait waits for the deltas)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from trust_engine.__main__ import _check_base, evaluate_delta
    from trust_engine.delta import Delta
    from trust_engine.testbed import bundle
    from trust_engine.testbed.evaluate import eval_sets, evaluate

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base_pipe, judge = bundle.load_pipeline(), bundle.load_judge()
    befores: dict[tuple[str, str], dict] = {}
    for name in args.before_from:
        r = json.loads(Path(name).read_text())
        befores[(r["concept"], r["mode"])] = {k.removesuffix("_before"): v for k, v in r.items()
                                              if k.endswith("_before")}
    if args.warm:
        befores[tuple(args.warm)] = evaluate(base_pipe, judge, eval_sets(*args.warm), seeds=args.seeds)
    for name in args.deltas:
        path = Path(name)
        target = out / f"{path.name.removesuffix('.safetensors')}.judge.json"
        if target.exists():  # judged already (by another judge process)
            continue
        delta = _wait_loadable(path) if args.wait else Delta.load(str(path))
        concept = json.loads(delta.metadata.get("concepts", "[]"))[0]
        mode = delta.metadata.get("mode", "individual")
        _check_base(delta)
        key = (concept, mode)
        start = time.time()
        if key not in befores:
            befores[key] = evaluate(base_pipe, judge, eval_sets(concept, mode), seeds=args.seeds)
        report, _ = evaluate_delta(delta, concept, mode, seeds=args.seeds, base_pipe=base_pipe, before=befores[key])
        report.update(delta=str(path), judge_seconds=time.time() - start)
        target.write_text(json.dumps(report))
        print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
