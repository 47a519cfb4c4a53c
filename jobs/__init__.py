"""Orchestration of customization runs on Ray (entry point: python -m jobs.customize)."""
