"""How far pruning one layer type can erase a concept on the bundled testbed: zero the top share of a locus's weights,
ranked by the concept's contrast score (ConceptPrune's |W| * (a_concept - a_base), pooled over samples and the first
steps), up to all of them, and judge forget / preserve after each. Prints one JSON line per share, and first how often
prompts that do not ask for the concept (the empty prompt, "a circle") draw it anyway.

    PYTHONPATH=. python tools/prune_limit.py triangle --locus ff.net.2 --shares 0.2 0.5 0.8 1.0

FIA and ConceptPrune zero a subset of one locus; if zeroing the whole locus leaves the concept drawn, no mask of
theirs there can erase it (the README's "The other erasers" section).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def main() -> int:
    from trust_engine import concepts
    from trust_engine.methods import _common as c
    from trust_engine.testbed import bundle, check
    from trust_engine.testbed.evaluate import eval_sets, evaluate, judge_rate
    from trust_engine.unet_params import modules_named

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("concept")
    p.add_argument("--preserve", nargs="*", default=["a circle", "a square", "a star"])
    p.add_argument("--locus", choices=c.LOCI, default="ff.net.2")
    p.add_argument("--shares", nargs="+", type=float, default=[0.2, 0.5, 0.8, 1.0])
    p.add_argument("--samples", type=int, default=10, help="generations per prompt set for the scores (default 10)")
    p.add_argument("--seeds", type=int, default=1, help="images per judged prompt (default 1)")
    args = p.parse_args()
    if any(not 0 <= s <= 1 for s in args.shares):
        p.error("--shares must lie in [0, 1]")
    torch.set_num_threads(1)
    pipe, parts, _ = bundle.load_parts(torch.device("cpu"), torch.float32)
    judge, sets = bundle.load_judge(), eval_sets(args.concept, "individual")
    for prompt in ("", *args.preserve[:1]):
        prompts = [prompt] * 24
        seen = judge_rate(judge, check.generate(pipe, prompts, seed=1000), prompts, sets.concept)
        print(json.dumps({"prompt": prompt, "concept_drawn": sum(seen) / len(seen)}), flush=True)
    concept = concepts.expand(args.concept, "individual", preserve=tuple(args.preserve))
    _, bases = c.contrast_sets(parts, [concept])
    tgt = c.ff_input_norms(parts, list(concept.forget), args.samples, 50, 10, 7.5, 0, locus=args.locus)
    base = c.ff_input_norms(parts, bases[0], args.samples, 50, 10, 7.5, 0, locus=args.locus)
    scores = {n: w.abs() * (tgt[n].sum(0).sqrt().mean(0) - base[n].sum(0).sqrt().mean(0)).view(1, -1)
              for n, w in c.ff_weights(parts, args.locus).items()}
    before = evaluate(pipe, judge, sets, seeds=args.seeds)
    print(json.dumps({"locus": args.locus, "share": 0.0, "forget": before["forget_rate"],
                      "preserve": before["preserve_accuracy"]}), flush=True)
    for share in args.shares:
        patched = bundle.load_pipeline()
        zeroed = 0
        with torch.no_grad():
            for name, module in modules_named(patched.unet, args.locus).items():
                k = int(share * scores[name].numel())
                if k:
                    module.weight.view(-1)[scores[name].flatten().topk(k).indices] = 0
                    zeroed += k
        after = evaluate(patched, judge, sets, seeds=args.seeds)
        print(json.dumps({"locus": args.locus, "share": share, "zeroed": zeroed, "forget": after["forget_rate"],
                          "preserve": after["preserve_accuracy"]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
