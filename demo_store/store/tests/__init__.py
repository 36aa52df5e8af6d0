"""Tests of the store app, run with the demo's own settings (demo_store/pytest.ini)."""
