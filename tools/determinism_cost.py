"""What torch's deterministic algorithms cost on the CPU: TRuST (10 steps, triangle) twice with and twice without
(`methods.run(..., deterministic_algorithms=...)`, alternated in one process), CPU seconds of each run and whether
all four deltas are bit-identical. Run: `OMP_NUM_THREADS=1 PYTHONPATH=. python tools/determinism_cost.py`.
"""

import time

import torch

from trust_engine import concepts, methods
from trust_engine.testbed import bundle


def tensors(delta) -> dict[str, torch.Tensor]:
    return {**{"s:" + n: r.dense() for n, r in delta.sites.items()}, **{"p:" + n: p for n, p in delta.params.items()}}


def main() -> None:
    _, parts, aligner = bundle.load_parts()
    expanded = concepts.expand_all("triangle", "individual", preserve=["a circle", "a square", "a star"])
    config = methods.config_for("trust", "paper", steps=10, eval_every=100, forget_images=8, preserve_images=8,
                                gen_steps=10)
    times: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    deltas = []
    for det in (True, False, True, False):
        cpu, wall = time.process_time(), time.time()
        delta = methods.run("trust", parts, expanded, config, aligner=aligner, deterministic_algorithms=det)
        times[det].append((time.process_time() - cpu, time.time() - wall))
        deltas.append(tensors(delta))
    same = all(d.keys() == deltas[0].keys() and all(torch.equal(d[k], deltas[0][k]) for k in d) for d in deltas)
    for det in (True, False):
        print(f"deterministic {'on ' if det else 'off'}: " + ", ".join(f"{c:.1f} CPU s ({w:.0f} s wall)"
                                                                      for c, w in times[det]))
    ratio = sum(c for c, _ in times[True]) / sum(c for c, _ in times[False])
    print(f"CPU time ratio on/off {ratio:.3f}; all four deltas bit-identical: {same}")


if __name__ == "__main__":
    main()
