"""The pure core and the publication relay load without the model stack: checked in a fresh interpreter."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL_STACK = ("torch", "diffusers", "transformers", "huggingface_hub", "accelerate", "safetensors")
PURE_ENTRY_POINTS = ("streams.publication", "processors.requests", "processors.events", "processors.render_settings",
                     "processors.address_guard", "schemas.serde", "schemas.container")


def modules_loaded_by(module: str) -> set[str]:
    script = f"import json, sys, {module}; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.splitlines()[-1]))


def test_pure_modules_and_the_relay_import_no_model_stack():
    for module in PURE_ENTRY_POINTS:
        loaded = modules_loaded_by(module)
        assert module in loaded
        leaked = sorted(name for name in loaded if name.split(".")[0] in MODEL_STACK)
        assert not leaked, f"import {module} loads {leaked[:5]}"

