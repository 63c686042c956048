"""The bundled concept-world testbed: a tiny Stable-Diffusion-architecture model, its CLIP aligner and judge.
The unlearning engine never imports this package; the CLI, demo and evaluator do.
"""
