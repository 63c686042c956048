"""Try one eraser's config on one demo task of the bundled testbed and print one JSON line (forget / synonym forget
/ preserve before and after, seconds, file size): how the methods' "testbed" presets were chosen.

    PYTHONPATH=. python tools/method_presets.py esd triangle individual --set iterations=100,lr=1e-4,ddim_steps=20

Judged by the testbed judge with --seeds images per prompt (default 1). Writes the delta to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch


def main() -> int:
    from trust_engine import concepts, methods
    from trust_engine.delta import Delta
    from trust_engine.testbed import bundle
    from trust_engine.testbed.evaluate import apply_delta, eval_sets, evaluate

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("method", choices=methods.names())
    p.add_argument("concept")
    p.add_argument("mode", choices=("individual", "combination", "conditional"))
    p.add_argument("--preset", default="paper")
    p.add_argument("--set", action="append", default=[], help="key=value settings (comma-separated)")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="method_preset.safetensors")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    settings = {}
    for item in args.set:
        settings.update(methods.parse_options(args.method, item))
    config = methods.config_for(args.method, args.preset, **settings)
    preserve = ("a circle", "a square", "a star") if args.mode == "individual" else ()  # as the demo's tasks
    pipe, parts, aligner = bundle.load_parts(torch.device("cpu"), torch.float32)
    start = time.time()
    delta = methods.run(args.method, parts, [concepts.expand(args.concept, args.mode, preserve=preserve)], config,
                        aligner=aligner, default_cfg=3.0)
    seconds = time.time() - start
    delta.save(args.out)
    judge, sets = bundle.load_judge(), eval_sets(args.concept, args.mode)
    before = evaluate(pipe, judge, sets, seeds=args.seeds)
    patched = bundle.load_pipeline()
    apply_delta(patched, Delta.load(args.out))
    after = evaluate(patched, judge, sets, seeds=args.seeds)
    print(json.dumps({"method": args.method, "preset": args.preset, "settings": settings, "seconds": round(seconds, 1),
                      "forget": [before["forget_rate"], after["forget_rate"]],
                      "synonym_forget": after["synonym_forget_rate"],
                      "preserve": [before["preserve_accuracy"], after["preserve_accuracy"]],
                      "file_bytes": os.path.getsize(args.out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
