"""Copy a BERT-family base with its pooler drawn afresh: the test of whether an untrained pooler holds experts back.

    python tools/reinit_pooler.py ../shared/models/all-MiniLM-L6-v2 runs/models/minilm-pooler02
    python bench/experts.py --model runs/models/minilm-pooler02 --tasks rte --lrs "umtam=5e-5;adamw=5e-5"

all-MiniLM-L6-v2 was trained as a mean-pooled sentence encoder, so its pooler
(the dense + tanh layer that BertForSequenceClassification puts between the
[CLS] vector and the classifier) never saw a gradient: its bias is exactly zero
and its weight's spread is 0.009, under half of BERT's initialisation (0.02).
This writes a copy whose pooler weight is N(0, initializer_range) from a fixed
seed and whose bias is zero, the rest unchanged, so every expert trained from
the copy shares one base and merges against it. The copy is a plain model
directory that ``transformers`` loads.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from umtam.atomic import check_output_dir, copy_regular_file, write_directory  # noqa: E402
from umtam.errors import UmtamError  # noqa: E402
from umtam.safetensors_io import load_tensors, save_tensors  # noqa: E402

WEIGHTS = "model.safetensors"
POOLER_WEIGHT = "pooler.dense.weight"


def pooler_names(tensors: dict) -> tuple[str, str]:
    """The pooler's weight and bias names: "pooler.dense.*" in a base, "bert.pooler.dense.*" in a classifier."""
    weights = [name for name in tensors if name.endswith(POOLER_WEIGHT)]
    if len(weights) != 1:
        raise UmtamError(f"the model has {len(weights)} tensors named *{POOLER_WEIGHT}, not one: "
                         "only BERT-family encoders have this pooler")
    bias = weights[0][: -len("weight")] + "bias"
    if bias not in tensors:
        raise UmtamError(f"the model has {weights[0]} but no {bias}")
    return weights[0], bias


def reinitialised(tensors: dict, std: float, seed: int) -> dict:
    """``tensors`` with the pooler weight drawn from N(0, std) by a generator seeded with ``seed``, its bias zero."""
    import torch

    weight_name, bias_name = pooler_names(tensors)
    weight = tensors[weight_name]
    generator = torch.Generator().manual_seed(seed)
    fresh = dict(tensors)
    fresh[weight_name] = (torch.randn(weight.shape, generator=generator) * std).to(weight.dtype)
    fresh[bias_name] = torch.zeros_like(tensors[bias_name])
    return fresh


def write_copy(source: Path, out: Path, *, seed: int, force: bool) -> None:
    """``source``'s files copied into ``out``, its single weights file rewritten with a fresh pooler."""
    if not (source / WEIGHTS).is_file():
        raise UmtamError(f"{source}: no {WEIGHTS} (a single-file safetensors model is expected)")
    check_output_dir(out, inputs=[source], force=force)  # before the weights are read: refusals are cheap
    config = json.loads((source / "config.json").read_text())
    tensors = reinitialised(load_tensors(source / WEIGHTS), float(config.get("initializer_range", 0.02)), seed)

    def fill(staging: Path) -> None:
        for path in sorted(source.iterdir()):
            if path.is_file() and path.name != WEIGHTS:
                copy_regular_file(path, staging / path.name)
        save_tensors(tensors, staging / WEIGHTS)

    write_directory(out, fill, what="model copy", replace=force)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="a model directory with config.json and model.safetensors")
    parser.add_argument("out", type=Path, help="the copy to write")
    parser.add_argument("--seed", type=int, default=0, help="seed of the pooler's draw")
    parser.add_argument("--force", action="store_true", help="replace an existing OUT")
    args = parser.parse_args()
    try:
        write_copy(args.source, args.out, seed=args.seed, force=args.force)
    except (UmtamError, OSError, ValueError) as exc:
        print(f"reinit_pooler: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
