"""Concept-neuron masks of the saliency with its decode + CLIP score in the host's float32 vs under bfloat16 autocast
(`--saliency-precision bfloat16`), on the bundled testbed: per demo concept and seed, the two masks' sizes, their IoU
and the correlation of the row scores.

    PYTHONPATH=. OMP_NUM_THREADS=1 python tools/saliency_precision.py [--seeds 4]
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    from trust_engine.functional import SiteDeltas
    from trust_engine.saliency import SaliencyConfig, estimate
    from trust_engine.testbed import bundle
    from trust_engine.unet_view import find_sites

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=4)
    args = p.parse_args()
    torch.set_num_threads(1)
    _, parts, aligner = bundle.load_parts()
    deltas = SiteDeltas(parts.unet, find_sites(parts.unet))
    for concept in ("triangle", "red circle", "circle on a square"):
        for seed in range(args.seeds):
            res = {prec: estimate(parts, deltas, [f"a {concept}"], SaliencyConfig(decode_precision=prec), aligner,
                                  generator=torch.Generator().manual_seed(seed))
                   for prec in ("host", "bfloat16")}
            a, b = res["host"].mask, res["bfloat16"].mask
            inter = sum(int((a[k] & b[k]).sum()) for k in a)
            union = sum(int((a[k] | b[k]).sum()) for k in a)
            scores = torch.stack([torch.cat([r.scores[k] for k in a]) for r in res.values()])
            print(f"{concept!r} seed {seed}: neurons float32 {res['host'].total()}, bfloat16 {res['bfloat16'].total()}, "
                  f"IoU {inter / max(union, 1):.3f}, score correlation {float(torch.corrcoef(scores)[0, 1]):.4f}",
                  flush=True)


if __name__ == "__main__":
    main()
