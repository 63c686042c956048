"""The delta, the one output of an erasure: row-sparse differences to cross-attention weights and dense differences
to any other UNet weight or bias, saved as kohya-keyed safetensors that stock loaders read (exact LoRA, `.diff`/`.diff_b`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT_VERSION = "1"  # files with row-sparse sites only; readers of every version read them
PARAMS_FORMAT_VERSION = "2"  # files that also hold dense parameter differences (`params`)
FORMAT_KEY = "trust_delta_format"  # safetensors metadata key marking a TRuST delta file, value = a format version
FINGERPRINT_KEY = "base_fingerprint"
DENSE_MODULES_KEY = "trust_dense_modules"  # JSON list of the LDM module names whose .diff / .diff_b are `params`
LORA_PREFIX = "lora_unet_"
PARAM_DTYPE = torch.float16  # dtype of dense parameter differences in the file (.diff / .diff_b), as stock LoRAs ship

_LORA_KEY = re.compile(
    r"lora_unet_(?:(?P<io>input|output)_blocks_(?P<i>\d+)_1|middle_block_1)_transformer_blocks_(?P<j>\d+)"
    r"_attn2_(?P<kind>to_q|to_k|to_v|to_out_0)\.(?P<part>lora_up\.weight|lora_down\.weight|alpha|diff)"
)
_SITE = re.compile(
    r"(input_blocks\.\d+\.1|middle_block\.1|output_blocks\.\d+\.1)\.transformer_blocks\.\d+\.attn2\.(to_q|to_k|to_v|to_out\.0)"
)


# an LDM UNet parameter: a top-level block of UNetModel, then module path segments, then weight or bias
_PARAM = re.compile(
    r"(?P<module>(?:input_blocks|middle_block|output_blocks|time_embed|label_emb|out)(?:\.[A-Za-z0-9_]+)*)"
    r"\.(?P<kind>weight|bias)"
)


class DeltaFileError(ValueError):
    """A file that is not a readable TRuST delta (corrupt, truncated, a pickle, an ordinary LoRA)."""


class BaseMismatchError(ValueError):
    """A delta applied to a model other than the one it was made for."""


def lora_key(site: str) -> str:
    """Kohya key of a site, as ComfyUI and AUTOMATIC1111 map it: `lora_unet_` + LDM path with '.' -> '_'."""
    return LORA_PREFIX + site.replace(".", "_")


def _site_from_lora_key(match: re.Match[str]) -> str:
    block = f"{match['io']}_blocks.{match['i']}.1" if match["io"] else "middle_block.1"
    kind = "to_out.0" if match["kind"] == "to_out_0" else match["kind"]
    return f"{block}.transformer_blocks.{match['j']}.attn2.{kind}"


def fingerprint(base_weights: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the sorted site names, each weight's shape and the sign bit of every weight element.
    Pass the base Q/K/V site weights. Signs survive casts between float32, float16 and bfloat16 exactly, so a
    delta made on an fp32 copy still matches the same model loaded in half precision; different models differ."""
    h = hashlib.sha256(b"trust-base-fingerprint/1\0")
    for name in sorted(base_weights):
        w = base_weights[name].detach()
        if w.is_meta:
            raise ValueError(f"cannot fingerprint {name}: its weight is on the meta device (not loaded)")
        h.update(f"{name}\0{tuple(w.shape)}\0".encode())
        h.update(np.packbits(torch.signbit(w).cpu().numpy()).tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class RowDelta:
    """Changed output rows of one site: `rows` (R,) sorted unique indices, `values` (R x in) the differences."""

    rows: torch.Tensor
    values: torch.Tensor
    out_features: int

    def __post_init__(self) -> None:
        rows, values = self.rows.detach(), self.values.detach()
        if rows.dim() != 1 or rows.dtype.is_floating_point or rows.dtype == torch.bool:
            raise ValueError(f"rows must be a 1-D integer tensor, got {tuple(rows.shape)} {rows.dtype}")
        if values.dim() != 2 or values.shape[0] != rows.shape[0] or not values.dtype.is_floating_point:
            raise ValueError(f"values must be a float tensor of shape ({rows.shape[0]}, in), got {tuple(values.shape)}")
        rows = rows.to(torch.long)
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= self.out_features):
            raise ValueError(f"row indices must lie in [0, {self.out_features}), got {rows.min()}..{rows.max()}")
        if rows.unique().numel() != rows.numel():
            raise ValueError("row indices must be unique")
        if not bool(torch.isfinite(values).all()):
            raise ValueError("delta values are not all finite (NaN or inf): the run diverged; lower the learning rate")
        order = torch.argsort(rows)
        # own copies: a delta must not change when the tensors it was built from keep training
        object.__setattr__(self, "rows", rows[order].clone())
        object.__setattr__(self, "values", values[order].clone())

    @property
    def rank(self) -> int:
        return int(self.rows.numel())

    @property
    def in_features(self) -> int:
        return int(self.values.shape[1])

    def dense(self) -> torch.Tensor:
        out = self.values.new_zeros(self.out_features, self.in_features)
        out[self.rows.to(out.device)] = self.values
        return out


def row_factors(d: RowDelta) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact rank-R LoRA factors of a site's R changed rows, on the CPU: lora_up = one-hot row selector (out x R),
    lora_down = the rows (R x in), alpha = R; up @ down * alpha / R is the dense delta bit for bit."""
    r = d.rank
    up = torch.zeros(d.out_features, r, dtype=d.values.dtype)
    up[d.rows.cpu(), torch.arange(r)] = 1
    return up, d.values.cpu().contiguous(), torch.tensor(float(r))


@dataclass
class Delta:
    """What an erasure changes, in canonical LDM names, plus str -> str metadata and the fingerprint of the base
    weights it was made on ('' = unknown).

    sites:  row-sparse differences of cross-attention weights (attn2 to_q/to_k/to_v/to_out.0), by site name; saved as
            the exact rank-R LoRA (or a dense `.diff` where smaller), in the values' own dtype.
    params: dense differences of any UNet parameter, by LDM parameter name (`...ff.net.2.weight`, `...to_out.0.bias`),
            for methods whose changes are not row-sparse (unstructured masks, whole-layer edits); saved as `.diff`
            (weight) / `.diff_b` (bias) in float16, the form stock full-weight LoRAs take. A weight is in one of the two.
    """

    sites: dict[str, RowDelta]
    metadata: dict[str, str] = field(default_factory=dict)
    base_fingerprint: str = ""
    params: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        bad = [name for name in self.sites if not _SITE.fullmatch(name)]
        if bad:
            raise ValueError(
                f"not canonical site names (LDM paths like input_blocks.1.1.transformer_blocks.0.attn2.to_k): {bad[:3]}"
            )
        wrong = {
            k: type(v).__name__ for k, v in self.metadata.items() if not (isinstance(k, str) and isinstance(v, str))
        }
        if wrong:
            raise TypeError(f"metadata must map str to str (safetensors stores only strings); not str: {wrong}")
        reserved = {FORMAT_KEY, FINGERPRINT_KEY, DENSE_MODULES_KEY} & set(self.metadata)
        if reserved:
            raise ValueError(f"metadata keys {sorted(reserved)} are set by Delta itself")
        params = {}
        for name, diff in self.params.items():
            if not _PARAM.fullmatch(name):
                raise ValueError(
                    f"{name!r} is not an LDM UNet parameter name (like "
                    f"input_blocks.1.1.transformer_blocks.0.ff.net.2.weight or ...attn2.to_out.0.bias)"
                )
            if not isinstance(diff, torch.Tensor) or not diff.dtype.is_floating_point:
                raise ValueError(f"the difference of {name} must be a float tensor")
            diff = diff.detach()
            if not bool(torch.isfinite(diff).all()):
                raise ValueError(f"the difference of {name} is not all finite (NaN or inf): the run diverged")
            params[name] = diff.clone()  # own copy, as RowDelta keeps one
        both = [n for n in self.sites if f"{n}.weight" in params]
        if both:
            raise ValueError(f"{both[0]}.weight is both a row-sparse site and a dense parameter; give it once")
        mixed = [n for n in self.sites if f"{n}.bias" in params]
        if mixed:
            # AUTOMATIC1111 applies one module type per layer: a LoRA weight would drop the layer's .diff_b
            raise ValueError(f"{mixed[0]} has a row-sparse weight and a dense bias; put its weight in params too")
        self.params = params

    @classmethod
    def from_dense(
        cls, diffs: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None, base_fingerprint: str = ""
    ) -> Delta:
        """From dense (out x in) differences: keeps the rows that are not all zero; drops sites with none."""
        sites = {}
        for name, diff in diffs.items():
            rows = (diff.detach() != 0).any(dim=1).nonzero().squeeze(1)
            if rows.numel():
                sites[name] = RowDelta(rows, diff.detach()[rows], diff.shape[0])
        return cls(sites, dict(metadata or {}), base_fingerprint)

    def dense(self, site: str) -> torch.Tensor:
        """The site's full (out x in) difference."""
        return self.sites[site].dense()

    def diffs(self) -> dict[str, torch.Tensor]:
        """Every changed parameter's full difference, by LDM parameter name (sites as `<site>.weight`)."""
        out = {f"{name}.weight": d.dense() for name, d in self.sites.items()}
        out.update(self.params)
        return out

    def scaled(self, strength: float) -> Delta:
        """A new delta whose differences are multiplied by `strength`."""
        sites = {n: RowDelta(d.rows, d.values * strength, d.out_features) for n, d in self.sites.items()}
        params = {n: d * strength for n, d in self.params.items()}
        return Delta(sites, dict(self.metadata), self.base_fingerprint, params)

    def apply_to(self, weights: Mapping[str, torch.Tensor], strength: float = 1.0) -> dict[str, torch.Tensor]:
        """New tensors weight + strength * delta for the delta's sites (inputs untouched), in each weight's dtype
        and device; the sum is computed in at least float32 and rounded once."""
        missing = [n for n in self.sites if n not in weights]
        if missing:
            raise BaseMismatchError(
                f"this delta changes {len(missing)} sites this model does not have (e.g. {missing[0]}); "
                f"it was made for another architecture"
            )
        out = {}
        for name, d in self.sites.items():
            w = weights[name]
            if tuple(w.shape) != (d.out_features, d.in_features):
                raise BaseMismatchError(
                    f"site {name} is {tuple(w.shape)} in this model but {(d.out_features, d.in_features)} in the delta; "
                    f"it was made for another architecture"
                )
            compute = torch.promote_types(w.dtype, torch.float32)
            rows = d.rows.to(w.device)
            new = w.detach().clone()
            new[rows] = (w.detach()[rows].to(compute) + strength * d.values.to(w.device, compute)).to(w.dtype)
            out[name] = new
        return out

    def apply_to_params(self, params: Mapping[str, torch.Tensor], strength: float = 1.0) -> dict[str, torch.Tensor]:
        """New tensors parameter + strength * difference for every parameter the delta changes, sites included,
        keyed by LDM parameter name (`params` maps those names to the model's tensors; they are not touched)."""
        diffs = self.diffs()
        missing = [n for n in diffs if n not in params]
        if missing:
            raise BaseMismatchError(
                f"this delta changes {len(missing)} parameters this model does not have (e.g. {missing[0]}); "
                f"it was made for another architecture"
            )
        out = {}
        for name, diff in diffs.items():
            w = params[name].detach()
            if tuple(w.shape) != tuple(diff.shape):
                raise BaseMismatchError(
                    f"{name} is {tuple(w.shape)} in this model but {tuple(diff.shape)} in the delta; "
                    f"it was made for another architecture"
                )
            compute = torch.promote_types(w.dtype, torch.float32)
            out[name] = (w.to(compute) + strength * diff.to(w.device, compute)).to(w.dtype)
        return out

    def check_base(self, base_fingerprint: str) -> None:
        """Raise BaseMismatchError if this delta was made on other base weights (no-op if it records none)."""
        if self.base_fingerprint and base_fingerprint != self.base_fingerprint:
            raise BaseMismatchError(
                f"this delta was made for another base model: made for {self.base_fingerprint[:12]}, this model is "
                f"{base_fingerprint[:12]}; apply it to the model it was trained on, or retrain"
            )

    def dense_modules(self) -> list[str]:
        """LDM module names whose differences are written as `.diff` / `.diff_b` from `params`, sorted."""
        return sorted({_PARAM.fullmatch(n)["module"] for n in self.params})

    def to_lora(self, param_dtype: torch.dtype = PARAM_DTYPE) -> dict[str, torch.Tensor]:
        """The file's tensors. Per site with R changed rows: lora_up = one-hot row selector (out x R),
        lora_down = the rows (R x in), alpha = R, so up @ down * alpha / R is the dense delta exactly (each output
        element is one product 1 * x plus exact zeros). A dense `.diff` instead where R * (out + in) > out * in.
        Per dense parameter: `<key>.diff` (weight) or `<key>.diff_b` (bias) in `param_dtype` (float16 unless a host
        asks otherwise), which ComfyUI's `comfy.lora.load_lora` and AUTOMATIC1111's `network_full` read as weight +
        diff. AUTOMATIC1111 (v1.8) adds a .diff in the .diff's dtype: on a float32 model a float16 .diff rounds the whole
        layer to float16, even at strength 0, so its adapter writes float32 there."""
        tensors: dict[str, torch.Tensor] = {}
        for name, d in self.sites.items():
            key, r = lora_key(name), d.rank
            if r == 0:
                continue
            if r * (d.out_features + d.in_features) > d.out_features * d.in_features:
                tensors[f"{key}.diff"] = d.dense().cpu().contiguous()
                continue
            up, down, alpha = row_factors(d)
            tensors[f"{key}.lora_up.weight"] = up
            tensors[f"{key}.lora_down.weight"] = down
            tensors[f"{key}.alpha"] = alpha
        limit = torch.finfo(param_dtype).max
        for name, diff in self.params.items():
            m = _PARAM.fullmatch(name)
            if diff.numel() and float(diff.abs().max()) > limit:
                raise ValueError(f"the difference of {name} exceeds the {param_dtype} range (|d| > {limit:g})")
            suffix = "diff" if m["kind"] == "weight" else "diff_b"
            tensors[f"{lora_key(m['module'])}.{suffix}"] = diff.to("cpu", param_dtype).contiguous()
        # AUTOMATIC1111 builds a full-weight module only where a `.diff` exists: a bias-only change gets a zero .diff
        for module in self.dense_modules():
            key = lora_key(module)
            if f"{key}.diff_b" in tensors and f"{key}.diff" not in tensors:
                raise ValueError(
                    f"{module} has a bias difference but no weight difference; add its weight to params (zeros are "
                    f"fine) so that AUTOMATIC1111, which needs a .diff beside a .diff_b, applies it"
                )
        return tensors

    def file_metadata(self) -> dict[str, str]:
        """The safetensors metadata save writes: the delta's own plus format version, fingerprint, dense modules."""
        metadata = {**self.metadata, FORMAT_KEY: PARAMS_FORMAT_VERSION if self.params else FORMAT_VERSION}
        if self.base_fingerprint:
            metadata[FINGERPRINT_KEY] = self.base_fingerprint
        if self.params:
            metadata[DENSE_MODULES_KEY] = json.dumps(self.dense_modules())
        return metadata

    def save(self, path: str | os.PathLike[str], param_dtype: torch.dtype = PARAM_DTYPE) -> Path:
        """Write the LoRA safetensors file (atomically: a crash leaves no half-written file)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".partial")
        save_file(self.to_lora(param_dtype), str(tmp), metadata=self.file_metadata())
        os.replace(tmp, path)
        return path

    @classmethod
    def from_lora(cls, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> Delta:
        """Inverse of to_lora + the file metadata; raises DeltaFileError for anything to_lora would not write."""
        metadata = dict(metadata)
        version = metadata.pop(FORMAT_KEY, None)
        if version not in (FORMAT_VERSION, PARAMS_FORMAT_VERSION):
            raise DeltaFileError(
                f"not a TRuST delta (format {FORMAT_VERSION} or {PARAMS_FORMAT_VERSION}): its metadata has no "
                f"{FORMAT_KEY}. If it is an ordinary LoRA, load it with your host's LoRA loader"
            )
        fp = metadata.pop(FINGERPRINT_KEY, "")
        try:
            dense_modules = json.loads(metadata.pop(DENSE_MODULES_KEY, "[]"))
            if not isinstance(dense_modules, list) or not all(isinstance(m, str) for m in dense_modules):
                raise ValueError
        except ValueError:
            raise DeltaFileError(f"the file's {DENSE_MODULES_KEY} metadata is damaged (not a JSON list of names)") from None
        dense_keys = {lora_key(m): m for m in dense_modules}
        parts: dict[str, dict[str, torch.Tensor]] = {}
        params: dict[str, torch.Tensor] = {}
        for key, tensor in tensors.items():
            stem, _, suffix = key.partition(".")
            if stem in dense_keys and suffix in ("diff", "diff_b"):
                name = f"{dense_keys[stem]}.{'weight' if suffix == 'diff' else 'bias'}"
                if not _PARAM.fullmatch(name) or not tensor.dtype.is_floating_point:
                    raise DeltaFileError(f"tensor {key!r} is not a UNet parameter difference: the file is damaged")
                params[name] = tensor
                continue
            m = _LORA_KEY.fullmatch(key)
            if m is None:
                raise DeltaFileError(f"unexpected tensor {key!r}: the file is damaged or was not written by TRuST")
            parts.setdefault(_site_from_lora_key(m), {})[m["part"]] = tensor
        sites = {}
        for name, p in parts.items():
            try:
                sites[name] = _row_delta_from_parts(p)
            except ValueError as e:
                raise DeltaFileError(f"site {name} in the file is damaged: {e}") from None
        try:
            return cls({n: d for n, d in sites.items() if d.rank}, metadata, fp, params)
        except ValueError as e:
            raise DeltaFileError(f"the file's differences do not form a delta: {e}") from None

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Delta:
        """Read a delta file written by save (safetensors only; never unpickles anything)."""
        path = Path(path)
        if not path.is_file():
            raise DeltaFileError(f"no delta file at {path}")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                metadata = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for every kind of damage
            with open(path, "rb") as f:
                head = f.read(4)
            if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
                raise DeltaFileError(
                    f"{path} is a pickle / PyTorch checkpoint (.ckpt, .pt), not safetensors. TRuST never unpickles "
                    f"files (it can run code); use the .safetensors delta that TRuST wrote"
                ) from None
            raise DeltaFileError(
                f"{path} is not a readable safetensors file ({type(e).__name__}: {e}); it may be truncated or "
                f"corrupt: copy or download it again, or re-export the delta"
            ) from None
        return cls.from_lora(tensors, metadata)


def _row_delta_from_parts(p: dict[str, torch.Tensor]) -> RowDelta:
    if set(p) == {"diff"}:
        diff = p["diff"]
        if diff.dim() != 2:
            raise ValueError(f".diff must be 2-D, is {tuple(diff.shape)}")
        rows = (diff != 0).any(dim=1).nonzero().squeeze(1)
        return RowDelta(rows, diff[rows], diff.shape[0])
    if set(p) != {"lora_up.weight", "lora_down.weight", "alpha"}:
        raise ValueError(f"has parts {sorted(p)}, expected lora_up.weight, lora_down.weight, alpha (or diff)")
    up, down = p["lora_up.weight"], p["lora_down.weight"]
    if up.dim() != 2 or down.dim() != 2 or up.shape[1] != down.shape[0]:
        raise ValueError(f"lora_up {tuple(up.shape)} and lora_down {tuple(down.shape)} do not chain")
    r = down.shape[0]
    if float(p["alpha"]) != r:
        raise ValueError(f"alpha is {float(p['alpha'])}, expected the rank {r}")
    rows = up.argmax(dim=0)
    selector = torch.zeros_like(up)
    selector[rows, torch.arange(r)] = 1
    if not torch.equal(up, selector):
        raise ValueError("lora_up is not a one-hot row selector (not a TRuST row-sparse delta)")
    return RowDelta(rows, down, up.shape[0])
