"""Tier 2 in a real AUTOMATIC1111 (see conftest.py)."""
