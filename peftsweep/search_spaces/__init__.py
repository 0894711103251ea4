"""Registry of PEFT methods: name → how to build the adapter + its default search space.

Importing this package must not import torch/peft/transformers (spec validation and the CLI import it):
method modules import those inside their functions. Every module here without a leading underscore is a
method that registers itself on import, so adding a method is one new module (plus one row in
tests/search_spaces/test_methods.py).
"""

from __future__ import annotations

import importlib
import pkgutil

from peftsweep.search_spaces._export import export_trained, load_trained
from peftsweep.search_spaces._lora import export_adapter
from peftsweep.search_spaces._registry import AdapterHParams, Method, get_method, method_names, register

__all__ = [
    "AdapterHParams",
    "Method",
    "export_adapter",
    "export_trained",
    "get_method",
    "load_trained",
    "method_names",
    "register",
]

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")
