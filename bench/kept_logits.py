"""Response-only batches: a training step with logits at the labelled positions only, against every position's.

    python bench/kept_logits.py                                  # SmolLM2-135M's shape, 8 rows of 160 tokens
    python bench/kept_logits.py --config runs/models/smollm2-135m-instruct --rows 8 --length 320 --repeats 5

``sft`` and ``choice`` label an answer after a long prompt; umtam's training
loss (umtam.objectives.language.train_loss) then projects onto the vocabulary
only the positions some row has a target at. This times one forward and
backward both ways, interleaved on the same batch (so load from anything else on
the machine falls on both alike), and prints the median of each and their ratio.
The model is built from its config with random weights: the time does not
depend on the values. bf16 autocast, as the decoder experts train.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# SmolLM2-135M's shape (its config.json), so the bench runs without the model downloaded.
SMOLLM2_SHAPE = {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                 "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
                 "max_position_embeddings": 8192, "tie_word_embeddings": True, "rms_norm_eps": 1e-5}


def build(config_path: str | None):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if config_path:
        config = AutoConfig.from_pretrained(config_path)
    else:
        fields = dict(SMOLLM2_SHAPE)
        config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).train()


def response_only_batch(vocab: int, rows: int, length: int, answer: int):
    """``rows`` prompts of ``length`` tokens, the last ``answer`` of each labelled (no padding)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (rows, length), generator=generator)
    labels = torch.full_like(ids, -100)
    labels[:, -answer:] = ids[:, -answer:]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def step_seconds(model, batch, loss_of) -> float:
    import torch

    model.zero_grad(set_to_none=True)
    started = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_of(model, dict(batch))
    loss.backward()
    return time.perf_counter() - started


def main() -> int:
    import torch

    from umtam.objectives.language import train_loss

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a model folder or config.json (default: SmolLM2-135M's shape)")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--length", type=int, default=160)
    parser.add_argument("--answer", type=int, default=2, help="labelled tokens at the end of each row")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps each way, after one warm-up each")
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args()
    model = build(args.config)
    batch = response_only_batch(model.config.vocab_size, args.rows, args.length, args.answer)
    ways = {"every position": lambda m, b: m(**b).loss, "labelled positions": train_loss}
    times: dict[str, list[float]] = {name: [] for name in ways}
    for repeat in range(args.repeats + 1):
        for name, loss_of in ways.items():
            seconds = step_seconds(model, batch, loss_of)
            if repeat:  # the first of each is a warm-up
                times[name].append(seconds)
    medians = {name: statistics.median(values) for name, values in times.items()}
    result = {"rows": args.rows, "length": args.length, "answer": args.answer, "vocab": model.config.vocab_size,
              "threads": torch.get_num_threads(), "seconds": times, "median_seconds": medians,
              "ratio": medians["labelled positions"] / medians["every position"]}
    for name, median in medians.items():
        print(f"{name}: median {median:.3f} s per forward + backward over {args.repeats} steps")
    print(f"labelled positions / every position: {result['ratio']:.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
