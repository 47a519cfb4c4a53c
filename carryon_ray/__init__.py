"""carryon-ray core: configs, base access, bridge, carry-on model, adapters, train/eval, generation.

This package knows no cluster. `actors/` (inference side), `jobs/` (run orchestration) and
`serve/` (online inference) build on it.
"""

__version__ = "0.1.0"
