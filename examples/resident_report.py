"""docs/RESIDENT.md from `ifprune bench default --resident kept --json docs/resident.json`.

    python examples/resident_report.py [docs/resident.json] [docs/RESIDENT.md]
"""

import json
import sys
from pathlib import Path

from ifprune_mlx.bench.resident import report

if __name__ == "__main__":
    source = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/resident.json")
    out = Path(sys.argv[2] if len(sys.argv) > 2 else "docs/RESIDENT.md")
    out.write_text(report(json.loads(source.read_text())))
    print(f"wrote {out}")
