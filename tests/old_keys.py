"""The TRuST config as cache keys held it before the fields added later existed (spelled out here, independently of
trust_engine.unlearn.LATER_FIELDS, so a test fails if a saved file's key would stop matching)."""

import dataclasses

LATER = ("mask_rows", "mask_source", "row_budget", "preserve_projection", "csr_probes", "csr_scale", "csr_data")
LATER_SALIENCY = ("source",)


def old_config(config) -> dict:
    values = dataclasses.asdict(config)
    for name in LATER:
        del values[name]
    for name in LATER_SALIENCY:
        del values["saliency"][name]
    return values
