"""Assemble docs/RESULTS.md from docs/results/_header.md and the per-area sections.

The sections are written by the people and benchmarks that measured them (the accuracy bench
rewrites its table block in docs/results/accuracy.md); RESULTS.md is their single reading copy.
Run: python scripts/assemble_results.py   (or `make results-doc`)
"""

from __future__ import annotations

import re
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"
ORDER = ["eval", "accuracy", "export", "runtime", "ngswin", "ngswin_accuracy", "beyond", "grids", "inputs",
         "gpu"]


def demote(text: str) -> str:
    """Make every section's top heading level 2 (and its sub-headings follow)."""
    levels = [len(m.group(1)) for m in re.finditer(r"^(#+) ", text, re.M)]
    shift = 2 - min(levels) if levels else 0
    return re.sub(r"^(#+) ", lambda m: "#" * (len(m.group(1)) + shift) + " ", text, flags=re.M)


def main() -> None:
    parts = [(DOCS / "results" / "_header.md").read_text().rstrip() + "\n"]
    for name in ORDER:
        p = DOCS / "results" / f"{name}.md"
        if p.exists():
            text = demote(p.read_text()).replace("](img/", "](results/img/")  # links from docs/
            parts.append(f"<!-- from docs/results/{name}.md -->\n" + text.rstrip() + "\n")
    out = DOCS / "RESULTS.md"
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text("\n\n".join(parts))
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
