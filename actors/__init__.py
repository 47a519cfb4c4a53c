"""Inference-side Ray actors: load a frozen base once, turn token batches into bridge codes."""
