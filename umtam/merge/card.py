"""The model card (README.md) written beside a merged model: what it was made from, by which method, how to load it.

Hugging Face shows a repository's README.md as its model card; mergekit writes
one beside every merge. This one is generated from the merge's sidecar alone
(method, paper, options, inputs with the sha256 of their weights and their
tasks, the base), so it can never disagree with what umtam.json records. It
names inputs by their directory names, so the same inputs give the same card.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from umtam import __version__


def model_card(sidecar: Mapping[str, Any], *, out_dtype: str | None = None) -> bytes:
    lineage = sidecar["lineage"]
    base = sidecar["base_model"]
    # names, not absolute paths: the same inputs give the same card wherever they lie (umtam.json has the paths)
    where = _name(base.get("location") or base.get("reference") or "(not recorded)")
    lines = [
        "---",
        "tags:",
        "- merge",
        "- umtam",
        "---",
        f"# Merged with umtam {__version__}: {lineage['method']}",
        "",
        f"Method: **{lineage['method']}** ({lineage.get('method_url', '')}).",
        f"Base model: `{where}` (fingerprint `{(base.get('fingerprint') or '')[:16]}`).",
        f"Stored dtype: {out_dtype or 'as the inputs store them'}; computed in float32.",
        "",
        "## Inputs",
        "",
        "| input | tasks | weights sha256 |",
        "|---|---|---|",
        *(f"| `{_name(item.get('path') or '')}` | {', '.join(item.get('tasks', []))} | `{(item.get('sha256') or '')[:16]}` |"
          for item in lineage["inputs"]),
        "",
        "## Options",
        "",
        "```json",
        json.dumps(lineage.get("options", {}), indent=2, sort_keys=True),
        "```",
        "",
        "umtam.json beside this card holds the full record (tasks, expert scores, thresholds).",
        "",
        "```python",
        "from transformers import AutoModel  # or the Auto class of the architecture in config.json",
        "model = AutoModel.from_pretrained(\"<this directory>\")",
        "```",
        "",
    ]
    return "\n".join(lines).encode()


def _name(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]
