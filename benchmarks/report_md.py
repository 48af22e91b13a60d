"""The Markdown table row that every section of benchmarks/RESULTS.md is built from."""
from __future__ import annotations


def row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"
