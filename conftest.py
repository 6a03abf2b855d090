"""Collection rules for the doctests of the package (``pytest`` also collects ``normswap/``)."""

import importlib.util

# Integrations with optional packages: their modules import those packages at the top.
collect_ignore = [
    path for path, package in (
        ("normswap/regularizers/hf.py", "transformers"),
        ("normswap/regularizers/lightning.py", "lightning"),
    )
    if importlib.util.find_spec(package) is None
]
