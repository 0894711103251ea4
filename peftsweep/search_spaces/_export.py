"""Every method's result saved one way and loaded back one way.

`export_trained` writes the method's own export plus `peftsweep_method.json` (which method, how many trainable
parameters). `load_trained` is the one documented loader: plain `PeftModel.from_pretrained` for PEFT
adapters, the method's own `load` for results PEFT cannot load (full fine-tuning, BitFit, FineGates).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from peftsweep.search_spaces._lora import export_adapter
from peftsweep.search_spaces._registry import get_method

METADATA = "peftsweep_method.json"


def export_trained(method: str, model: Any, out_dir: Path, workdir: Path) -> dict[str, Any]:
    """Save `model` (trained with `method`) into `out_dir`; returns the metadata written beside it."""
    spec = get_method(method)
    (spec.export or export_adapter)(model, out_dir, workdir)
    files = [p for p in out_dir.rglob("*") if p.is_file()]
    meta = {
        "method": method,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "adapter_bytes": sum(p.stat().st_size for p in files),
    }
    (out_dir / METADATA).write_text(json.dumps(meta, indent=2))
    return meta


def load_trained(base_model: Any, out_dir: str | Path) -> Any:
    """Rebuild the trained model from `base_model` and an exported directory (see `export_trained`)."""
    out_dir = Path(out_dir)
    meta_path = out_dir / METADATA
    method = json.loads(meta_path.read_text())["method"] if meta_path.is_file() else None
    loader = get_method(method).load if method else None
    if loader is not None:
        return loader(base_model, out_dir)
    from peft import PeftModel

    return PeftModel.from_pretrained(base_model, str(out_dir))
