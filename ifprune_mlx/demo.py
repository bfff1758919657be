"""The shipped demo model: examples/train_tiny/checkpoint, converted to a bundle on first use.

The bundle goes to .cache/demo-bundle in the repository and is converted again whenever the
checkpoint's files change (a fingerprint of their names and sizes sits beside it).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from .errors import BundleError

REPO = Path(__file__).resolve().parents[1]
DEMO_CHECKPOINT = REPO / "examples" / "train_tiny" / "checkpoint"
DEMO_BUNDLE = REPO / ".cache" / "demo-bundle"


def _fingerprint(folder: Path) -> str:
    h = hashlib.sha1()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(f"{path.relative_to(folder)}:{path.stat().st_size}\n".encode())
        if path.suffix == ".json":
            h.update(path.read_bytes())
    return h.hexdigest()


def demo_bundle(on_progress=None) -> Path:
    """The demo bundle's path, converting the shipped checkpoint first if needed.

    on_progress(done_bytes, total_bytes) is called while converting.
    """
    if not (DEMO_CHECKPOINT / "llm" / "config.json").is_file():
        raise BundleError(f"the demo checkpoint {DEMO_CHECKPOINT} is missing; run from a full clone of "
                          "ifprune-mlx, or pass a model: `ifprune chat PATH`")
    stamp = DEMO_BUNDLE.with_name(DEMO_BUNDLE.name + ".source")
    fingerprint = _fingerprint(DEMO_CHECKPOINT)
    if (DEMO_BUNDLE / "config.json").is_file() and stamp.is_file() and stamp.read_text() == fingerprint:
        return DEMO_BUNDLE
    from converters.layouts import detect
    from converters.write import convert

    convert(detect(DEMO_CHECKPOINT), DEMO_BUNDLE, force=True, on_progress=on_progress)
    stamp.write_text(fingerprint)
    return DEMO_BUNDLE
