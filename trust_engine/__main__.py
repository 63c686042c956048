"""Command line: `python -m trust_engine <command>`; the bundled testbed is the default model everywhere.
Commands: demo (the main job), unlearn (any method), methods, evaluate, verify, export, saliency, figures, bench,
bench-scale, testbed-check.
"""

from __future__ import annotations

import argparse
import json
import math
import os
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

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    config = check.CheckConfig(steps=args.steps, cfg=args.cfg, seed=args.seed)
    report, samples = check.run(config, progress=None if args.json else _progress("sampling"))
    if args.grid:
        prompts = [p for name in ("single_object", "two_object") for p in samples[name][0][::5]]
        images = [i for name in ("single_object", "two_object") for i in samples[name][1][::5]]
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


def _load_model(args: argparse.Namespace):
    """(pipeline, parts, aligner, default cfg) of --model (a diffusers SD1.x/SD2.x/SDXL folder) or of the bundled
    testbed. Every path and option is checked before anything is loaded."""
    import torch

    from . import loading
    from .testbed import bundle
    from .testbed.check import DEFAULT_CFG

    if args.threads:
        torch.set_num_threads(args.threads)
    model, aligner_dir = getattr(args, "model", None), getattr(args, "aligner", None)
    device_name, dtype_name = getattr(args, "device", "auto"), getattr(args, "dtype", "auto")
    clip_skip, resolution = getattr(args, "clip_skip", None), getattr(args, "resolution", None)
    if model:
        loading.inspect_model(model)
    if aligner_dir:
        loading.inspect_aligner(aligner_dir)
    if clip_skip is not None and clip_skip < 0:
        raise loading.CheckpointError(f"--clip-skip must be 0 or more, got {clip_skip}")
    if model:
        device = loading.resolve_device(device_name)
        dtype = loading.resolve_dtype(dtype_name, device)
        loaded = loading.load_model(model, device, dtype, clip_skip, resolution)
        aligner = loading.load_aligner(aligner_dir, device) if aligner_dir else None
        return loaded.pipe, loaded.parts, aligner, loaded.cfg
    # the testbed's figures are made on CPU in float32: "auto" keeps them there; an explicit choice is honoured
    device = torch.device("cpu") if device_name == "auto" else loading.resolve_device(device_name)
    dtype = torch.float32 if dtype_name == "auto" else loading.resolve_dtype(dtype_name, device)
    pipe, parts, aligner = bundle.load_parts(device, dtype)
    if clip_skip or resolution:
        from .parts import from_pipeline
        from .testbed import world

        parts = from_pipeline(pipe, name="bundled testbed", check_prompt=world.check_words, clip_skip=clip_skip,
                              resolution=resolution)
    if aligner_dir:
        aligner = loading.load_aligner(aligner_dir, device)
    return pipe, parts, aligner, DEFAULT_CFG


# TRuST's own options (the others' settings go through --set); option dest -> shown name
_TRUST_ONLY = ("loss", "steps", "lr", "relative_lr", "beta", "alpha", "retain_target", "xi", "mask_every",
               "negative_guidance", "saliency_momentum", "projections", "saliency_images", "cip_update",
               "saliency_precision")


def _unlearn_config(args: argparse.Namespace):
    """The chosen method's config: its --preset, then (TRuST) the TRuST options or --set key=value settings."""
    from . import methods
    from .saliency import SaliencyConfig

    method = getattr(args, "method", None) or "trust"
    settings = {}
    for item in getattr(args, "set", None) or ():
        settings.update(methods.parse_options(method, item))
    if method != "trust":
        given = [k for k in _TRUST_ONLY if getattr(args, k, None) is not None] + (
            ["static_mask"] if getattr(args, "static_mask", False) else [])
        if given:
            flag = "--" + given[0].replace("_", "-")
            raise ValueError(f"{flag} is a TRuST option; {method}'s settings go through --set key=value "
                             f"(`python -m trust_engine methods {method}` lists them)")
        if "seed" in {f.name for f in __import__("dataclasses").fields(methods.METHODS[method][0])}:
            settings.setdefault("seed", args.seed)
        return methods.config_for(method, getattr(args, "preset", None) or "paper", **settings)
    keys = ("steps", "lr", "relative_lr", "beta", "alpha", "mask_every", "seed", "retain_target", "projections",
            "negative_guidance", "saliency_momentum", "cip_update")
    overrides = {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
    config = methods.config_for("trust", getattr(args, "preset", None) or "paper",
                                **{"loss": args.loss or "cip", **overrides, "static_mask": args.static_mask,
                                   **settings})
    config.saliency = SaliencyConfig(xi=args.xi if args.xi is not None else 2.0)
    if getattr(args, "saliency_images", None):
        config.saliency.images = args.saliency_images
    if getattr(args, "saliency_precision", None):
        config.saliency.decode_precision = args.saliency_precision
    return config


def run_unlearn(args: argparse.Namespace, pipe=None, parts=None, aligner=None, cfg=None, quiet: bool = False):
    """Expand the concept(s), run the chosen method (TRuST by default), save the delta; (expanded concepts, delta)."""
    from . import concepts as concept_specs
    from . import methods
    from .progress import text_progress

    expanded = concept_specs.expand_all(args.concept, args.mode, preserve=args.preserve or (),
                                        concept_type=getattr(args, "concept_type", None) or "none")
    if parts is not None or not getattr(args, "model", None):  # a closed vocabulary (the testbed): refuse up front
        from .testbed import world

        check = parts.check_prompt if parts is not None else world.check_words
        if check:
            concept_specs.check_concept_types(expanded, check)
    method = getattr(args, "method", None) or "trust"
    config = _unlearn_config(args)  # every setting checked before the model is loaded
    if pipe is None:
        pipe, parts, aligner, cfg = _load_model(args)
    if not quiet:
        for e in expanded:
            print(e.explain())
    metadata = {"mode": args.mode, "model": parts.name}
    delta = methods.run(method, parts, expanded, config, text_progress(), aligner=aligner, default_cfg=cfg,
                        metadata=metadata)
    if args.out:
        delta.save(args.out)
    return expanded, delta


def cmd_unlearn(args: argparse.Namespace) -> int:
    from .methods import report

    _, delta = run_unlearn(args)
    print(report(delta))
    print(f"delta written to {args.out}")
    return 0


def evaluate_delta(delta, concept: str, mode: str, seeds: int = 2, base_pipe=None, before: dict | None = None):
    """Testbed judge's before/after figures of a delta for one concept (the keys `evaluate --json` prints)."""
    from .testbed import bundle
    from .testbed.evaluate import apply_delta, eval_sets, evaluate

    judge = bundle.load_judge()
    sets = eval_sets(concept, mode)
    base_pipe = base_pipe or bundle.load_pipeline()
    if before is None:
        before = evaluate(base_pipe, judge, sets, seeds=seeds)
    patched = bundle.load_pipeline()
    apply_delta(patched, delta)
    after = evaluate(patched, judge, sets, seeds=seeds)
    report = dict(after)
    report.update({f"{key}_before": value for key, value in before.items()})
    report.update(concept=concept, mode=mode, forget_images=len(sets.forget) * seeds,
                  preserve_images=len(sets.preserve) * seeds)
    return report, patched


def cmd_evaluate(args: argparse.Namespace) -> int:
    import json as _json

    from .delta import Delta

    delta = Delta.load(args.delta)
    if args.model:
        return _evaluate_on_model(args, delta)
    if args.aligner:
        from .loading import CheckpointError

        raise CheckpointError("on the bundled testbed evaluate uses the testbed judge; --aligner is for --model")
    concept = args.concept or (_json.loads(delta.metadata.get("concepts", "[]")) or [None])[0]
    mode = args.mode or delta.metadata.get("mode", "individual")
    if not concept:
        raise SystemExit("this delta records no concept: pass --concept and --mode")
    _check_base(delta)
    report, _ = evaluate_delta(delta, concept, mode, seeds=args.seeds)
    _print_report(report, args.json)
    return 0


def _print_report(report: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(_finite(report), allow_nan=False))  # NaN (e.g. no parts to judge) is not JSON: null
    else:
        for key, value in report.items():
            print(f"{key:>28}: {value}")


def _evaluate_on_model(args: argparse.Namespace, delta) -> int:
    """evaluate --model: the testbed judge cannot read another model's images, so the aligner's CLIP score of the
    forget and preserve prompts' generations is reported before and after the delta."""
    from . import aligner_eval
    from . import concepts as concept_specs
    from .delta import fingerprint
    from .loading import CheckpointError
    from .unet_view import find_sites, site_weights

    if not args.aligner:
        raise CheckpointError("evaluate --model needs --aligner (a transformers CLIPModel folder): the testbed judge "
                              "only reads the testbed's pictures, so on your model the delta is judged by the "
                              "aligner's CLIP score of the forget and preserve prompts' generations")
    if args.concept:
        expanded = concept_specs.expand(args.concept, args.mode or "individual")
        forget, preserve = list(expanded.forget), list(expanded.preserve)
    elif "forget" in delta.metadata:
        forget = json.loads(delta.metadata["forget"])
        preserve = json.loads(delta.metadata.get("preserve", "[]"))
    else:
        raise CheckpointError("this delta records no forget prompts: pass --concept (and --mode)")
    pipe, parts, aligner, cfg = _load_model(args)
    delta.check_base(fingerprint(site_weights(parts.unet, find_sites(parts.unet))))
    cfg = args.cfg if args.cfg is not None else cfg
    report = aligner_eval.evaluate(parts, aligner, delta, forget, preserve, seeds=args.seeds, steps=args.steps,
                                   cfg=cfg)
    report.update(model=parts.name, judge="aligner CLIP score (100 x cosine)")
    _print_report(report, args.json)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Attack a delta: per-attack ASR and budget, a worst-cases PNG and a JSON report; exit 0 pass / 1 fail."""
    from . import attacks, verify
    from .delta import Delta, fingerprint
    from .unet_view import find_sites, site_weights

    attacks.check_inputs(args.concept, args.attacks, args.budget, args.seed)  # before anything is loaded
    verify.check_threshold(args.threshold)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: give a folder")
    delta = Delta.load(args.delta)
    if args.model and not args.aligner:
        from .loading import CheckpointError

        raise CheckpointError("verify --model needs --aligner (a transformers CLIPModel folder): without the testbed "
                              "judge, an image shows the concept when its CLIP score is above an anchor-relative "
                              "threshold")
    _, base, aligner, cfg = _load_model(args)
    delta.check_base(fingerprint(site_weights(base.unet, find_sites(base.unet))))
    patched_pipe, patched, _, _ = _load_model(args)  # a second copy of the model, patched with the delta
    from .testbed.evaluate import apply_delta

    apply_delta(patched_pipe, delta)
    judge = None
    if not args.model:
        from .testbed import bundle

        judge = attacks.testbed_judge(bundle.load_judge())
    from .progress import text_progress

    verdict = verify.verify(patched, args.concept, args.attacks, threshold=args.threshold, budget=args.budget,
                            seed=args.seed, base=base, judge=judge, aligner=aligner, cfg=cfg,
                            progress=text_progress())
    report, grid = verify.write(verdict, out)
    print(verdict.report())
    print(f"report: {report}\nworst cases: {grid}")
    return 0 if verdict.passed else 1


def cmd_export(args: argparse.Namespace) -> int:
    """A delta as a LoRA file diffusers' load_lora_weights takes (diffusers module names, no .diff keys)."""
    from .delta import Delta
    from .export import export_diffusers

    delta = Delta.load(args.delta)
    config = json.loads((Path(args.model) / "unet" / "config.json").read_text()) if args.model else None
    out = export_diffusers(delta, args.out, config)
    rows = sum(d.rank for d in delta.sites.values())
    print(f"{out}: {len(delta.sites)} sites, {rows} rows, for diffusers' pipe.load_lora_weights (needs peft), "
          f"layout of {'--model ' + args.model if args.model else 'SD1.x/SD2.x (pass --model for SDXL)'}")
    return 0


def cmd_saliency(args: argparse.Namespace) -> int:
    """Concept saliency alone: which Q/K/V rows carry the concept (summary, per-block table, optional heatmap PNG)."""
    import torch

    from . import concepts as concept_specs
    from .functional import SiteDeltas
    from .saliency import SaliencyConfig, estimate
    from .unet_view import find_sites

    expanded = concept_specs.expand(args.concept, args.mode)
    anchor = args.anchor if args.anchor is not None else expanded.anchor
    pipe, parts, aligner, cfg = _load_model(args)
    prompts = list(expanded.forget)
    if parts.check_prompt:
        for prompt in (*prompts, anchor):
            parts.check_prompt(prompt)
    config = SaliencyConfig(xi=args.xi, steps=args.steps, images=args.images, cfg=args.cfg)
    deltas = SiteDeltas(parts.unet, find_sites(parts.unet))
    with torch.inference_mode(False), torch.enable_grad():
        result = estimate(parts, deltas, prompts, config, aligner, anchor, torch.Generator().manual_seed(args.seed),
                          cfg)
    how = "CLIP score" if result.mode == "clip" else "noise contrast (pass --aligner for CLIP-score saliency)"
    if args.heatmap:
        from PIL import Image

        from .render import saliency_heatmap

        Path(args.heatmap).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(saliency_heatmap(result, f"concept neurons of {args.concept!r}")).save(args.heatmap, "PNG")
    if args.json:
        print(json.dumps({"concept": args.concept, "model": parts.name, "mode": result.mode, "xi": args.xi,
                          "neurons": result.total(), "rows": sum(m.numel() for m in result.mask.values()),
                          "objective": result.objective, "counts": result.counts()}))
        return 0
    print(f"{args.concept!r} on {parts.name}: {result.summary()}")
    print(f"saliency: {how}; xi {args.xi}; {config.images} image(s) of {config.steps} steps, guidance "
          f"{config.cfg if config.cfg is not None else cfg}")
    kinds = [k for k in ("q", "k", "v", "out") if k in set(result.kinds.values())]
    print(f"{'block':<48}" + "".join(f"{k.upper() + ' (max z)':>14}" for k in kinds))
    for block, cells in result.table():
        print(f"{block:<48}" + "".join(f"{cells[k][0]:>6} ({cells[k][1]:5.1f})" if k in cells else f"{'-':>14}"
                                       for k in kinds))
    if args.heatmap:
        print(f"heatmap: {args.heatmap}")
    return 0


def _finite(report: dict) -> dict:
    """The report with non-finite numbers as None (JSON null)."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in report.items()}


# options checked against the table of allowed values before any work: option dest -> table name
_RANGED = {"steps": "steps", "lr": "lr", "relative_lr": "relative_lr", "beta": "beta", "alpha": "alpha", "xi": "xi", "mask_every": "mask_every",
           "negative_guidance": "negative_guidance", "saliency_momentum": "saliency_momentum",
           "projections": "projections", "saliency_images": "saliency_images", "seed": "seed", "seeds": "seeds"}


def _check_inputs(args: argparse.Namespace) -> None:
    """Refuse bad options before any work: values outside trust_engine.ranges, an --out folder that is missing or
    not writable, a --model that does not exist."""
    from .ranges import check

    if args.command not in ("unlearn", "demo", "figures", "evaluate", "export"):
        return
    for dest, name in _RANGED.items():
        if getattr(args, dest, None) is not None:
            check(name, getattr(args, dest), "--" + dest.replace("_", "-"))
    if args.command in ("unlearn", "demo"):
        _unlearn_config(args)  # the method's settings (--preset, --set, TRuST's options), before any work
    if getattr(args, "model", None) and args.command != "export":  # export reads only the folder's unet/config.json
        from .loading import inspect_model

        inspect_model(args.model)  # the one check of a --model folder (trust_engine.loading), before any work
    if args.command in ("unlearn", "export"):
        out = Path(args.out)
        folder = out.parent if str(out.parent) else Path(".")
        if out.is_dir():
            raise ValueError(f"--out {out} is a folder: give a file name such as {out / 'delta.safetensors'}")
        if not folder.is_dir():
            raise ValueError(f"--out {out}: the folder {folder} does not exist; create it first")
        if not os.access(folder, os.W_OK):
            raise ValueError(f"--out {out}: the folder {folder} is not writable")
    if args.command == "export":
        delta = Path(args.delta)
        if not delta.is_file():
            raise ValueError(f"--delta {delta}: no such file (give a delta written by unlearn or the ComfyUI nodes)")
        if not os.access(delta, os.R_OK):
            raise ValueError(f"--delta {delta}: the file is not readable")
        if delta.resolve() == Path(args.out).resolve():
            raise ValueError(f"--out {args.out} is the delta itself: give another file name")
        model = getattr(args, "model", None)
        if model and not (Path(model) / "unet" / "config.json").is_file():
            raise ValueError(f"--model {model}: no unet/config.json in this folder (give the diffusers pipeline "
                             f"folder the delta was made for)")


def _check_base(delta) -> None:
    """Refuse a delta made for another base model than the bundled testbed."""
    from .delta import fingerprint
    from .testbed import bundle
    from .unet_view import find_sites, site_weights

    unet = bundle.load_pipeline().unet
    delta.check_base(fingerprint(site_weights(unet, find_sites(unet))))


# (concept, mode, preserve prompts a user would add, prompts shown before/after in the grid). Combination and
# conditional concepts preserve their parts by themselves; an individual concept has no parts to derive.
DEMO_TASKS = (
    ("triangle", "individual", ("a circle", "a square", "a star"), ("a triangle", "a wedge", "a square")),
    ("red circle", "combination", (), ("a red circle", "a circle", "a red square")),
    ("circle on a square", "conditional", (), ("a circle on a square", "a circle", "a circle next to a square")),
)


def _erase_and_judge(args: argparse.Namespace, task, model, out: Path, seeds: int, before: dict | None = None,
                     tag: str = "") -> tuple[dict, object]:
    """Erase one demo task with the options in args, save its delta, judge it; (figures row, patched pipeline)."""
    pipe, parts, aligner, cfg = model
    concept, mode, preserve, _ = task
    path = out / f"erase_{concept.replace(' ', '_')}{tag}.safetensors"
    ns = argparse.Namespace(**{**vars(args), "concept": concept, "mode": mode, "preserve": list(preserve),
                               "out": str(path)})
    from .unet_view import find_sites

    start = time.time()
    _, delta = run_unlearn(ns, pipe, parts, aligner, cfg, quiet=True)
    seconds = time.time() - start
    report, patched = evaluate_delta(delta, concept, mode, seeds=seeds, base_pipe=pipe, before=before)
    meta = delta.metadata
    sites = find_sites(parts.unet)
    changed = sum(d.rank * d.in_features for d in delta.sites.values())
    changed += sum(int((d != 0).sum()) for d in delta.params.values())
    weights = sum(p.numel() for p in parts.unet.parameters())
    method = meta.get("method", "trust")
    config = json.loads(meta.get("config", "{}"))
    report.update(method=method, preset=getattr(args, "preset", None) or "paper", loss=config.get("loss", ""),
                  static_mask=bool(config.get("static_mask")), seconds=seconds,
                  steps=int(meta.get("steps_run", 0) or 0), rows_changed=sum(d.rank for d in delta.sites.values()),
                  rows_total=sum(s.out_features for s in sites), weights_changed=changed,
                  weights_changed_share=changed / weights, file_bytes=path.stat().st_size)
    return report, patched


def _table(rows: list[dict]) -> str:
    """Markdown table of figures rows."""
    lines = ["| concept | mode | method | forget before → after | synonym forget | preserve before → after | "
             "parts before → after | weights changed | delta file | time |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        parts = (f"{r['parts_accuracy_before']:.2f} → {r['parts_accuracy']:.2f}"
                 if r["parts_accuracy"] == r["parts_accuracy"] else "—")
        method = r.get("method", "trust")
        if method == "trust":
            method += f" {r['loss'].upper()}" + (", static mask" if r["static_mask"] else "")
        if r.get("preset", "paper") != "paper":
            method += f" ({r['preset']})"
        lines.append(
            f"| {r['concept']} | {r['mode']} | {method} "
            f"| {r['forget_rate_before']:.2f} → {r['forget_rate']:.2f} | {r['synonym_forget_rate']:.2f} "
            f"| {r['preserve_accuracy_before']:.2f} → {r['preserve_accuracy']:.2f} | {parts} "
            f"| {r['weights_changed']:,} ({100 * r['weights_changed_share']:.2f} %) "
            f"| {r['file_bytes'] / 1024:.0f} KiB | {r['seconds']:.0f} s |")
    return "\n".join(lines)


def cmd_demo(args: argparse.Namespace) -> int:
    """Erase one individual, one combination and one conditional concept; before/after table and PNG grid."""
    import torch

    from .testbed import check

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = _load_model(args)
    pipe = model[0]
    rows, grid_prompts, grid_images = [], [], []
    for task in DEMO_TASKS:
        concept, mode, _, shown = task
        how = (args.loss or "cip").upper() if (args.method or "trust") == "trust" else args.method
        print(f"\n== erasing {concept!r} ({mode}, {how}) ==")
        report, patched = _erase_and_judge(args, task, model, out, seeds=1)
        rows.append(report)
        for prompt in shown:
            before = check.generate(pipe, [prompt] * 4, seed=5)
            after = check.generate(patched, [prompt] * 4, seed=5)
            grid_prompts += [f"before: {prompt}"] * 4 + [f"after: {prompt}"] * 4
            grid_images += [before, after]
    print("\n" + _table(rows))
    grid = check.save_grid(out / "demo_before_after.png", grid_prompts, torch.cat(grid_images), columns=8)
    (out / "demo_results.json").write_text(json.dumps(rows, indent=2))
    print(f"\nbefore/after grid: {grid}\ndeltas and figures: {out}/")
    return 0


def cmd_figures(args: argparse.Namespace) -> int:
    """The engine's benchmark on the testbed: every demo task with each loss, and the static-mask ablation."""
    from .testbed import bundle
    from .testbed.evaluate import eval_sets, evaluate

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = _load_model(args)
    judge = bundle.load_judge()
    rows = []
    for task in (t for t in DEMO_TASKS if t[1] in args.modes):
        concept, mode = task[0], task[1]
        before = evaluate(model[0], judge, eval_sets(concept, mode), seeds=args.seeds)
        runs = []
        for method in args.methods:
            if method == "trust":
                runs += [("trust", "paper", loss, False) for loss in args.losses]
                runs += [("trust", "paper", args.losses[0], True)] if args.ablation else []
            else:
                from .methods import PRESETS

                own = [p.split(":", 1)[1] for p in args.presets if p.startswith(method + ":")]
                wanted = own or [p for p in args.presets if ":" not in p]
                runs += [(method, preset, None, False) for preset in PRESETS[method] if preset in wanted]
        for method, preset, loss, static in runs:
            label = (f"TRuST {loss.upper()}, {'static mask' if static else 'mask every step'}" if method == "trust"
                     else f"{method}, {preset} config")
            print(f"== {concept!r} ({mode}), {label} ==", file=sys.stderr)
            ns = argparse.Namespace(**{**vars(args), "method": method, "preset": preset, "loss": loss,
                                       "static_mask": static})
            tag = (f"_{loss}" + ("_static" if static else "")) if method == "trust" else f"_{method}_{preset}"
            report, _ = _erase_and_judge(ns, task, model, out, args.seeds, before, tag)
            rows.append(report)
            (out / "figures.json").write_text(json.dumps(rows, indent=2))
    table = _table(rows)
    if args.methods != ["trust"]:  # the methods side by side: one row per method and config, the tasks as columns
        table = _method_table(rows) + "\n\nEvery run:\n\n" + table
    header = (f"`python -m trust_engine {' '.join(sys.argv[1:])}` on {_hardware()}; judged by the testbed judge "
              f"with {args.seeds} image(s) per prompt\n\n")
    (out / "figures.md").write_text(header + table + "\n")
    print(header + table)
    return 0


def _hardware() -> str:
    """The machine the figures ran on: CPU architecture and cores, RAM, GPU (if used), torch version and threads."""
    import platform

    import torch

    try:
        ram = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal")) / 2**20
        ram_text = f", {ram:.0f} GiB"
    except (OSError, StopIteration, ValueError):
        ram_text = ""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{os.cpu_count()}-core {platform.machine()} CPU{ram_text}, {gpu}, torch {torch.__version__}, "
            f"{torch_threads()} torch thread(s)")


def _method_table(rows: list[dict]) -> str:
    """Per method and config: what it changes, the config, its file on SD1.5 (methods.sizes, from the shapes),
    and forget / preserve / seconds on each demo task."""
    from .methods import PRESETS, WHAT_CHANGES, sizes

    unet = sizes.sd15_unet()
    trust_share = [r["rows_changed"] / r["rows_total"] for r in rows if r.get("method", "trust") == "trust"]
    tasks = list(dict.fromkeys((r["concept"], r["mode"]) for r in rows))
    groups: dict[tuple, dict] = {}
    for r in rows:
        method = r.get("method", "trust")
        key = (method, r.get("preset") or "paper", r.get("loss", ""), r.get("static_mask", False))
        groups.setdefault(key, {})[(r["concept"], r["mode"])] = r
    head = "| method | what it changes | config | file on SD1.5 | " + " | ".join(
        f"{c} ({m}): forget / preserve / time" for c, m in tasks) + " |"
    lines = [head, "|" + "---|" * (4 + len(tasks))]
    for (method, preset, loss, static), by_task in groups.items():
        name = method + (f" {loss.upper()}" + (", static mask" if static else "") if method == "trust" else "")
        values = PRESETS.get(method, {}).get(preset, {})
        config = preset + (": " + ", ".join(f"{k}={v}" for k, v in values.items()) if values else " defaults")
        if method == "trust":
            share = max(trust_share) if trust_share else 0.05
            size = (f"{sizes.file_bytes(sizes.layout('trust', unet, row_share=max(share, 1e-6))) / 2**20:.1f} MiB "
                    f"at {100 * share:.1f} % of Q/K/V rows (the largest share here)")
        else:
            size = f"{sizes.file_bytes(sizes.layout(method, unet)) / 2**20:.1f} MiB"
        cells = []
        for task in tasks:
            r = by_task.get(task)
            cells.append("—" if r is None else
                         f"{r['forget_rate_before']:.2f} → {r['forget_rate']:.2f} / "
                         f"{r['preserve_accuracy_before']:.2f} → {r['preserve_accuracy']:.2f} / {r['seconds']:.0f} s")
        lines.append(f"| {name} | {WHAT_CHANGES[method]} | {config} | {size} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _preset_choice(text: str) -> str:
    """--presets entry: paper, testbed, or METHOD:PRESET (checked here, before any work)."""
    method, sep, preset = text.rpartition(":")
    if preset not in ("paper", "testbed") or (sep and method not in METHOD_NAMES):
        raise argparse.ArgumentTypeError(f"{text!r}: give paper, testbed or METHOD:PRESET with METHOD one of "
                                         f"{', '.join(METHOD_NAMES)}")
    return text


METHOD_NAMES = ("trust", "esd", "uce", "salun", "fia", "conceptprune")  # = trust_engine.methods.names() (a test
# checks): spelled out so that the CLI's help does not import torch
BENCH_VARIANTS = ("trust-static-topk", "trust-random", "trust-csr", "trust-csr-probes", "trust-csr-retain",
                  "trust-cheap-saliency", "trust-budget", "trust-project", "trust-project-90",
                  "trust-budget-project")  # = trust_engine.benchmark.VARIANTS (test_cli checks)
ATTACK_NAMES = ("paraphrase", "soft_prompt", "ring_a_bell", "relearn")  # = trust_engine.attacks.ATTACKS (test_attacks)


def cmd_methods(args: argparse.Namespace) -> int:
    from . import methods

    for name in [args.name] if args.name else methods.names():
        print(methods.describe(name) + "\n")
    return 0


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def cmd_bench_scale(args: argparse.Namespace) -> int:
    import torch

    from .bench import METHODS, run

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("float16" if device == "cuda" else "float32")
    rows = run(args.arch, args.steps, device, dtype, progress=lambda m: print(m, file=sys.stderr),
               batches=args.batch, latent=args.latent, methods=args.methods or METHODS, flops=args.flops)
    if args.json:
        print(json.dumps(rows))
        return 0
    gib = 2**30
    print(f"device {device}, {dtype}; each method: one process for memory and time "
          f"({max(args.steps, 1)} step(s)), {'another for the FLOPs of one step' if args.flops else 'FLOPs not counted'}; "
          f"batch = forget latents (+ as many retain latents) per step; peak = "
          f"{'max_memory_allocated' if device == 'cuda' else 'the process peak RSS during the step'}; above weights = "
          f"peak - the frozen weights; step state = peak - what the process held before the step")
    print(f"{'arch':<6}{'batch':>6} {'method':<10}{'TFLOP':>8}{'x FT':>7}{'peak GiB':>9}{'x FT':>7}{'weights':>8}"
          f"{'above w.':>9}{'step st.':>9}{'GiB/sample':>11}{'trainable':>13}{'cpu s':>8}{'x FT':>7}")
    for r in rows:
        slope = r.get("peak_bytes_per_sample")
        print(f"{r['arch']:<6}{r['batch']:>6} {r['method']:<10}{r['flops'] / 1e12:>8.2f}{r['flops_vs_full_ft']:>7.2f}"
              f"{r['peak_bytes'] / gib:>9.2f}{r['peak_bytes_vs_full_ft']:>7.2f}{r['weights_bytes'] / gib:>8.2f}"
              f"{(r['peak_bytes'] - r['weights_bytes']) / gib:>9.2f}{r.get('state_bytes', float('nan')) / gib:>9.2f}"
              f"{(slope / gib if slope is not None else float('nan')):>11.2f}{r['trainable']:>13,.0f}"
              f"{r['cpu_s']:>8.1f}{r['cpu_s_vs_full_ft']:>7.2f}  {r.get('note', '')}")
        if r.get("phases"):
            print("        peak RSS by part of the step (GiB): " + ", ".join(
                f"{k} {v / gib:.2f}" for k, v in sorted(r["phases"].items(), key=lambda kv: -kv[1])))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """The method arena on the testbed (trust_engine.benchmark): methods x tasks x seeds, resumed from --out."""
    import torch

    from . import benchmark

    if args.seeds is not None and args.seeds < 1:
        raise ValueError(f"--seeds must be 1 or more, got {args.seeds}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: give a folder")
    parent = out.absolute()
    while not parent.exists():  # the folder (and missing parents) will be created: the first existing one decides
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise ValueError(f"--out {out}: {parent} is not a writable folder")
    config = benchmark.quick_config() if args.quick else benchmark.BenchConfig()
    if args.quick and args.methods:  # quick settings on the named methods x tasks instead of the quick subset
        config.cells = None
    if args.methods:
        config.methods = tuple(args.methods)
    if args.tasks:
        config.tasks = tuple(args.tasks)
    if args.seeds is not None:
        config.seeds = args.seeds
    if args.attacks is not None:
        config.attacks = () if args.attacks == ["none"] else tuple(args.attacks)
    config.flops = args.flops if args.flops is not None else config.flops
    if not config.pairs():
        raise ValueError("no (method, task) cell left: --quick runs only " + benchmark.describe_quick())
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()
    results = benchmark.run(config, out, say=benchmark.main_progress)
    print((out / "bench.md").read_text())
    print(f"bench: {len(results['cells'])} cells in {out}/bench.json; this sitting {time.time() - start:.0f} s; "
          f"table {out}/bench.md, plot {out}/bench.png")
    return 0


def cmd_scale_check(args: argparse.Namespace) -> int:
    """Does a default run move rows by about as much on SD-shaped models as on the testbed? A few engine steps per
    model (random-init SD shapes, the bundled testbed's own weights), with the relative learning rate and with the
    old absolute one, printing the median relative row change of each step. A scale check, not an erasure."""
    import torch

    from .bench import erasure_check

    say = lambda m: print(m, file=sys.stderr)  # noqa: E731
    print(f"scale check: {args.steps} engine step(s) per model at {args.latent}x{args.latent} latents, float32, "
          f"{args.device}; row change = median over changed rows of |row step| / |row|")
    print(f"{'model':<8}{'K/V RMS':>9}  {'learning rate':<26}{'row change per step'}")
    for arch in args.arch:
        for lr in (None, args.absolute_lr):
            check = erasure_check(arch, args.device, torch.float32, steps=args.steps, images=2, latent=args.latent,
                                  progress=say, lr=lr)
            label = "relative (0.1 x RMS)" if lr is None else f"absolute {lr:g}"
            print(f"{arch:<8}{check['weight_rms']:>9.4f}  {label:<26}"
                  + "  ".join(f"{c:.3f}" for c in check["row_change"]))
    return 0


def cmd_gpu_check(args: argparse.Namespace) -> int:
    """On a CUDA machine: bench-scale in float16 and bfloat16, and an SD1.5-shaped erasure through the engine."""
    import torch

    from .bench import erasure_check, run

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: gpu-check needs a CUDA GPU (torch.cuda.is_available() is False here). MPS is untested; "
              "`--device cpu --arch tiny` runs the same checks on the CPU as a dry run.", file=sys.stderr)
        return 2
    say = lambda m: print(m, file=sys.stderr)  # noqa: E731
    if args.device == "cuda":
        print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for dtype in args.dtypes:
        if dtype == "bfloat16" and args.device == "cuda" and not torch.cuda.is_bf16_supported():
            print("bfloat16: not supported on this GPU, skipped")
            continue
        rows = run([args.arch], 1, args.device, dtype, progress=say, batches=(1,), latent=args.latent,
                   methods=("full_ft", "trust_cip", "trust_csr"), flops=False)
        for r in rows:
            print(f"bench-scale {args.arch} {dtype} {r['method']:<10} peak {r['peak_bytes'] / 2**30:6.2f} GiB "
                  f"({r['peak_bytes_vs_full_ft']:.2f}x full FT)  {r['wall_s']:7.2f} s/step")
        check = erasure_check(args.arch, args.device, getattr(torch, dtype), latent=args.latent, progress=say)
        print(f"erasure {args.arch} {dtype}: {check['steps']} steps, {check['seconds_per_step']:.2f} s/step, "
              f"peak {check['peak_bytes'] / 2**30:.2f} GiB, {check['rows_changed']} rows changed")
        for note in check["notes"]:
            print("  " + note)
    return 0


def main(argv: list[str] | None = None) -> int:
    from .concepts import CONCEPT_TYPES
    from .testbed.check import DEFAULT_CFG, DEFAULT_STEPS

    parser = argparse.ArgumentParser(prog="python -m trust_engine", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def sampling_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"DDIM steps (default {DEFAULT_STEPS})")
        p.add_argument("--cfg", type=float, default=DEFAULT_CFG, help=f"guidance scale (default {DEFAULT_CFG})")
        p.add_argument("--seed", type=int, default=0, help="seed of prompts and sampling noise (default 0)")
        p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")

    p = sub.add_parser("testbed-check", help="sample the bundled model over a fixed prompt set and judge it")
    sampling_options(p)
    p.add_argument("--json", action="store_true", help="print one JSON object and nothing else on stdout")
    p.add_argument("--grid", help="also write a PNG grid of samples to this path")
    p.set_defaults(func=cmd_testbed_check)

    def training_options(p: argparse.ArgumentParser, method: bool = True) -> None:
        if method:
            p.add_argument("--method", choices=METHOD_NAMES, default="trust",
                           help="the eraser (default trust); `python -m trust_engine methods` describes each")
            p.add_argument("--preset", help="a named config of the method: paper (default: the paper's defaults) or "
                                            "testbed (tuned on the bundled testbed, where the method has one)")
            p.add_argument("--set", action="append", metavar="KEY=VALUE[,KEY=VALUE]",
                           help="a setting of the method's config, e.g. --set iterations=200,lr=1e-4 (repeatable)")
        p.add_argument("--loss", choices=("cip", "csr"), help="TRuST: CIP (hard, sparsity) or CSR (soft, sensitivity); "
                                                              "default cip")
        p.add_argument("--steps", type=int, help="fine-tuning steps (default: the loss's config, 60)")
        p.add_argument("--lr", type=float, help="absolute learning rate of the delta rows (default: --relative-lr)")
        p.add_argument("--relative-lr", type=float, help="learning rate as a fraction of each site's weight RMS "
                       "(default 0.1; used unless --lr is given)")
        p.add_argument("--beta", type=float, help="weight of the CIP/CSR term (default 0.1 CIP, 0.02 CSR)")
        p.add_argument("--alpha", type=float, help="weight of the retain loss (default 0.5)")
        p.add_argument("--retain-target", choices=("noise", "base"), help="retain loss target (default base: the base model's prediction; noise = SalUn)")
        p.add_argument("--xi", type=float, help="z-score threshold of concept neurons (default 2.0)")
        p.add_argument("--mask-every", type=int, help="re-find the concept neurons every k steps (default 1)")
        p.add_argument("--static-mask", action="store_true", help="ablation: find the concept neurons once only")
        p.add_argument("--negative-guidance", type=float, help="eta of the forget target (default 1.0; 0 = plain anchor)")
        p.add_argument("--cip-update", choices=("gradient", "proximal"), help="how the CIP term acts (default gradient)")
        p.add_argument("--saliency-momentum", type=float, help="EMA momentum of row saliencies across steps (default 0)")
        p.add_argument("--projections", help="projection types that may change, letters of q, k, v (default kv; the paper: qkv)")
        p.add_argument("--saliency-images", type=int, help="images per saliency estimate (default 2)")
        p.add_argument("--saliency-precision", choices=("host", "bfloat16"),
                       help="the saliency's differentiable decode + CLIP score in the model's dtype (host, default) "
                            "or under bfloat16 autocast on a float32 model: about half that path's activation memory; "
                            "masks overlap the host-precision ones at IoU 0.94-1.0 on the testbed")
        p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
        p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")

    def model_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", help="a diffusers folder of SD1.x, SD2.x (incl. v-prediction) or SDXL, with "
                                        "model_index.json (default: the bundled testbed)")
        p.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto",
                       help="auto (default): CUDA, else MPS, else CPU for --model; the testbed stays on CPU")
        p.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto",
                       help="weights' dtype; auto (default): float16 on CUDA, float32 otherwise")
        p.add_argument("--aligner", help="a transformers CLIPModel folder: CLIP-score saliency (and unlearn's early "
                                          "stop); default: the testbed's own aligner, none for --model")
        p.add_argument("--clip-skip", type=int, help="skip this many last CLIP text layers when encoding prompts, "
                                                      "as the diffusers pipelines' clip_skip (default: none)")
        p.add_argument("--resolution", type=int, help="image size the model generates and trains at (default: the "
                                                       "model's native size: SD1.x 512, SD2.x-768 768, SDXL 1024)")

    p = sub.add_parser("unlearn", help="erase a concept; writes a delta (a LoRA file)")
    p.add_argument("--concept", required=True, help="the concept to erase; several: one per line")
    p.add_argument("--mode", choices=("individual", "combination", "conditional"), default="individual",
                   help="individual ('triangle'), combination ('red circle'), conditional ('circle on a square')")
    p.add_argument("--preserve", nargs="*", help="extra prompts to keep working")
    p.add_argument("--concept-type", default="none", help="preserve prompts and an anchor for a common kind of "
                   "concept, for real checkpoints (--model): " + "; ".join(f"{name!r}: {kind.help}" for name, kind in
                                                                            CONCEPT_TYPES.items()) + " (default none)")
    p.add_argument("--out", default="delta.safetensors", help="delta file to write (default delta.safetensors)")
    training_options(p)
    model_options(p)
    p.set_defaults(func=cmd_unlearn)

    p = sub.add_parser("evaluate", help="judge a delta: on the testbed with its judge (forget rate, preserved "
                                        "accuracy); with --model by the --aligner's CLIP score before/after")
    p.add_argument("--delta", required=True, help="a delta file written by unlearn")
    p.add_argument("--concept", help="concept to judge (default: the one recorded in the delta)")
    p.add_argument("--mode", choices=("individual", "combination", "conditional"), help="(default: recorded)")
    p.add_argument("--seeds", type=int, default=2, help="images per prompt (default 2)")
    p.add_argument("--steps", type=int, default=20, help="with --model: DDIM steps per image (default 20)")
    p.add_argument("--cfg", type=float, help="with --model: guidance scale (default: SD 7.5, SDXL 5.0)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    model_options(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("verify", help="attack a delta (paraphrases, soft prompt, Ring-A-Bell search, relearning): "
                                      "ASR per attack, worst-cases PNG, JSON; exit 0 pass / 1 fail")
    p.add_argument("--delta", required=True, help="a delta file written by unlearn or the ComfyUI nodes")
    p.add_argument("--concept", required=True, help="the erased concept, in words")
    p.add_argument("--attacks", nargs="+", default=list(ATTACK_NAMES), metavar="ATTACK",
                   help=f"attacks to run: {', '.join(ATTACK_NAMES)} (default all)")
    p.add_argument("--budget", default="quick", help="quick (default) or full: what each attack may spend")
    p.add_argument("--threshold", type=float, default=0.2, help="pass when every attack's ASR is at or below this "
                                                                 "(default 0.2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the attacks (default 0)")
    p.add_argument("--out", default="out/verify", help="folder for verify.json and verify_worst.png "
                                                      "(default ./out/verify)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    model_options(p)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("export", help="write a delta as a LoRA file diffusers' pipe.load_lora_weights reads "
                                      "(diffusers module names, no .diff keys; loading it needs peft)")
    p.add_argument("--delta", required=True, help="a delta file written by unlearn or the ComfyUI nodes")
    p.add_argument("--out", required=True, help="the file to write, e.g. cat-diffusers.safetensors")
    p.add_argument("--model", help="the diffusers folder the delta was made for (only its unet/config.json is "
                                   "read); default: the SD1.x/SD2.x UNet layout. Needed for SDXL")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("saliency", help="find the concept neurons (Q/K/V rows) of a concept: summary, per-block "
                                        "table and optionally the heatmap PNG")
    p.add_argument("--concept", required=True, help="what to look for, in plain words")
    p.add_argument("--mode", choices=("individual", "combination", "conditional"), default="individual",
                   help="how the concept is expanded into prompts (default individual)")
    p.add_argument("--anchor", help="noise-contrast saliency compares with this prompt (default: the mode's anchor)")
    p.add_argument("--xi", type=float, default=2.0, help="z-score threshold of concept neurons (default 2.0)")
    p.add_argument("--steps", type=int, default=10, help="DDIM steps of the measured generation (default 10)")
    p.add_argument("--images", type=int, default=2, help="images per estimate (default 2)")
    p.add_argument("--cfg", type=float, help="guidance scale (default: the model's, testbed 3.0 / SD 7.5 / SDXL 5.0)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    p.add_argument("--heatmap", help="also write the heatmap (blocks x Q/K/V) as a PNG to this path")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    model_options(p)
    p.set_defaults(func=cmd_saliency)

    p = sub.add_parser("demo", help="the main job: erase three testbed concepts; table + before/after PNG in --out")
    p.add_argument("--out", default="out", help="folder for deltas, figures and the PNG grid (default ./out)")
    training_options(p)
    p.set_defaults(func=cmd_demo)

    MODES = ("individual", "combination", "conditional")
    p = sub.add_parser("figures", help="the engine's testbed benchmark: each demo task with CIP and CSR, plus the "
                                      "static-mask ablation; markdown table in --out/figures.md")
    p.add_argument("--out", default="out/figures", help="folder for deltas and figures (default ./out/figures)")
    p.add_argument("--losses", nargs="+", choices=("cip", "csr"), default=["cip", "csr"], help="(default cip csr)")
    p.add_argument("--no-ablation", dest="ablation", action="store_false", help="skip the static-mask runs")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                   help="which demo tasks, by mode (default all three)")
    p.add_argument("--seeds", type=int, default=2, help="images per judged prompt (default 2)")
    p.add_argument("--methods", nargs="+", choices=METHOD_NAMES, default=["trust"],
                   help="erasers to run on each task (default trust); each other method runs with each of its "
                        "--presets it has")
    p.add_argument("--presets", nargs="+", type=_preset_choice, default=["paper", "testbed"],
                   help="named configs of the other methods (default both: paper defaults, testbed-tuned); "
                        "METHOD:PRESET (e.g. esd:testbed) limits that method to the presets named so")
    training_options(p, method=False)
    p.set_defaults(func=cmd_figures)

    p = sub.add_parser("methods", help="the erasers, what each changes, their presets and settings")
    p.add_argument("name", nargs="?", choices=METHOD_NAMES, help="one method (default: all)")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("bench", help="every method x task (individual, combination, conditional, three at once, "
                                     "five in sequence) x seeds on the testbed: bench.md/.json/.png in --out, resumable")
    p.add_argument("--quick", action="store_true", help="a named subset of methods x tasks, 1 seed, quick attack "
                                                        "budget, smaller image caps (README: Bench); with --methods, "
                                                        "those methods x --tasks at the quick settings")
    p.add_argument("--methods", nargs="+", choices=METHOD_NAMES + BENCH_VARIANTS,
                   help="(default the methods; the trust-* variants are TRuST's ablation rows, README: What each "
                        "TRuST choice buys)")
    p.add_argument("--tasks", nargs="+", choices=("individual", "combination", "conditional", "three", "sequence"),
                   help="(default all)")
    p.add_argument("--seeds", type=int, help="seeds per cell, each a training seed and its evaluation noise "
                                             "(default 3; --quick 1)")
    p.add_argument("--attacks", nargs="+", help="attack names of trust_engine.attacks (default all; 'none' = skip)")
    p.add_argument("--no-flops", dest="flops", action="store_false", default=None,
                   help="skip the FLOP-counting second training run (default: counted, except under --quick)")
    p.add_argument("--out", default="out/bench", help="folder of bench.json (resumed), bench.md, bench.png, deltas "
                                                      "(default out/bench)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("bench-scale", help="FLOPs/memory/time of one TRuST step vs full fine-tuning and ESD on SD-sized UNets")
    p.add_argument("--arch", nargs="+", choices=("sd15", "sdxl", "tiny"), default=["sd15", "sdxl"], help="UNet shapes (default sd15 sdxl)")
    p.add_argument("--steps", type=int, default=1, help="steps per method in the memory-and-time process (default 1; 0 = 1)")
    p.add_argument("--no-flops", dest="flops", action="store_false", help="skip the FLOP-counting processes (each runs "
                   "one more step: on a CPU, minutes per TRuST step)")
    p.add_argument("--device", default="auto", help="cpu, cuda, mps or auto (default)")
    p.add_argument("--dtype", help="float32 / float16 / bfloat16 (default: float16 on CUDA, else float32)")
    p.add_argument("--batch", nargs="+", type=int, default=[1], help="forget latents per step (as many retain "
                   "latents); several: the per-sample slope of peak memory is reported (default 1)")
    p.add_argument("--latent", type=int, help="latent size (default: the architecture's, 64 SD1.5, 128 SDXL)")
    p.add_argument("--methods", nargs="+", choices=("full_ft", "esd", "trust_cip", "trust_csr", "trust_cip_bf16decode",
                                                    "trust_csr_bf16decode", "trust_cip_setsaliency"),
                   help="(default: the first four; full_ft first, the ratios' reference; *_bf16decode: TRuST with "
                        "--saliency-precision bfloat16; trust_cip_setsaliency: saliency from a noised forget-set latent)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.set_defaults(func=cmd_bench_scale)

    p = sub.add_parser("scale-check", help="relative row change per step of a default run on SD-shaped models vs the "
                                           "testbed (a few steps; a scale check, not an erasure)")
    p.add_argument("--arch", nargs="+", choices=("testbed", "tiny", "sd15", "sdxl"), default=["testbed", "sd15"],
                   help="models (default testbed sd15); sd15/sdxl are random-init SD-shaped UNets")
    p.add_argument("--steps", type=int, default=2, help="engine steps per model (default 2)")
    p.add_argument("--latent", type=int, default=8, help="latent size (default 8: the scale, not the picture, matters)")
    p.add_argument("--absolute-lr", type=float, default=5e-3, help="the absolute rate to compare with (default 5e-3, "
                                                                    "the old default)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_scale_check)
    p = sub.add_parser("gpu-check", help="on a CUDA GPU: bench-scale in float16/bfloat16 and an SD1.5-shaped "
                                         "erasure, with max_memory_allocated and seconds per step")
    p.add_argument("--device", default="cuda", help="cuda (default); cpu for a dry run of the harness")
    p.add_argument("--arch", choices=("sd15", "sdxl", "tiny"), default="sd15", help="UNet shape (default sd15)")
    p.add_argument("--dtypes", nargs="+", choices=("float16", "bfloat16", "float32"),
                   default=["float16", "bfloat16"], help="(default float16 bfloat16)")
    p.add_argument("--latent", type=int, help="latent size (default: the architecture's)")
    p.set_defaults(func=cmd_gpu_check)

    args = parser.parse_args(argv)
    from .concepts import ConceptError
    from .delta import BaseMismatchError, DeltaFileError
    from .loading import CheckpointError
    from .unet_view import UnknownArchitectureError

    try:
        _check_inputs(args)
        return args.func(args)
    except (ConceptError, DeltaFileError, BaseMismatchError, UnknownArchitectureError, CheckpointError,
            ValueError) as error:
        print(f"error: {error}", file=sys.stderr)  # a clear message, not a traceback, for input problems
        return 2


if __name__ == "__main__":
    sys.exit(main())
