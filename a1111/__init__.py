"""The AUTOMATIC1111 extension side of the pack: host adapter (host.py), the run shared by the tab and the API
(run.py), the TRuST tab (ui.py) and the API routes (api.py). scripts/trust_a1111.py loads it."""
