"""LLM-scale merging beside mergekit 0.1.5: wall time, peak RSS and the outputs' logits, on the same inputs.

    python bench/llm_merge.py --build                  # base + 6 synthetic ~0.9B bf16 Llama experts (~13 GB)
    python bench/llm_merge.py --mergekit /tmp/mkvenv/bin/mergekit-yaml --fresh
    python bench/llm_merge.py --report                 # the table from bench/results/llm_merge.json

The inputs are built with transformers from a config (Llama architecture:
hidden 2048, 18 layers, 32 heads with 4 key-value heads, feed-forward 5632,
vocabulary 32000, untied embeddings; 0.92B parameters, 1.85 GB in bf16): a
randomly initialised base and experts that add a small dense task vector to
every 2-D weight (Gaussian, 1% of that weight's standard deviation, seeded per
expert), saved with save_pretrained as plain Hugging Face directories (bf16).
The 1-D norms are left at the base's, so both tools' norm policies agree.

Each (method, tool) run is a subprocess, interleaved (umtam, mergekit,
umtam, ...) and repeated; its wall time is measured around the process and
its peak RSS is the kernel's ru_maxrss for it (os.wait4). umtam hashes every
file it reads (sha256 in the lineage, the base's fingerprint) and remembers
the digests of large files by their identity (umtam.digest_cache): its first
repeat runs with an emptied cache ("cold": every input and the base hashed,
about 7.4 GB for three experts), later repeats with the cache the earlier runs
left ("warm": only the output is hashed), the case of a user merging the same
experts again with other methods or options. mergekit hashes nothing. The methods are set
up to compute the same thing: ``task-arithmetic`` with lambda 1 against
mergekit's task_arithmetic with weight 1; umtam ``ties`` with keep 0.2, a
per-tensor trim (scope=tensor) and the disjoint mean against mergekit's ties
with density 0.2, weight 1 and normalize (its defaults). Both write bf16.
The logits of each pair of outputs are compared on one fixed batch of token
ids (float32 forward passes); trims tied at a threshold may keep different
entries, so ties can differ by a little where task arithmetic should not.
Memory scaling: umtam's ties with 3 and with 6 experts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path("bench/results/llm_merge.json")
CONFIG = {"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 18,
          "num_attention_heads": 32, "num_key_value_heads": 4, "max_position_embeddings": 2048,
          "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}
TASK_VECTOR_SCALE = 0.01  # of each weight's standard deviation
UMTAM_OPTIONS = {"task-arithmetic": ["--option", "lambda=1.0"],
                 "ties": ["--option", "keep=0.2", "--option", "scope=tensor", "--option", "lambda=1.0"]}


def main() -> None:
    args = parse_args()
    root = Path(args.root)
    if args.build:
        build(root, args.experts)
        return
    if args.report:
        print(report(json.loads(RESULTS.read_text())))
        return
    result = json.loads(RESULTS.read_text()) if RESULTS.exists() and not args.fresh else {"runs": []}
    result["inputs"] = describe_inputs(root)
    repeats = {"task-arithmetic": args.repeats, "ties": args.ties_repeats}
    for repeat in range(max(repeats.values())):
        for method in (method for method, count in repeats.items() if repeat < count):
            for tool in ("umtam", "mergekit"):
                if tool == "mergekit" and not args.mergekit:
                    continue
                result["runs"].append(run_once(tool, method, root, 3, repeat, args))
                save(result)
    result["runs"].append(run_once("umtam", "ties", root, 6, 0, args))
    save(result)
    if args.mergekit:
        result["logits"] = {method: compare_logits(root / "out" / f"umtam-{method}-3",
                                                   root / "out" / f"mergekit-{method}-3")
                            for method in ("task-arithmetic", "ties")}
        save(result)
    print(report(result))


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="runs/llm-merge")
    parser.add_argument("--build", action="store_true")
    parser.add_argument("--experts", type=int, default=6)
    parser.add_argument("--mergekit", help="mergekit-yaml from mergekit 0.1.5's own venv")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each tool's task arithmetic")
    parser.add_argument("--ties-repeats", type=int, default=2, help="runs of each tool's ties (minutes each)")
    parser.add_argument("--fresh", action="store_true", help="drop earlier runs from the result file")
    parser.add_argument("--report", action="store_true")
    return parser.parse_args()


# ----------------------------------------------------------------------------- inputs


def build(root: Path, experts: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG)).to(torch.bfloat16)
    base = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    if not (root / "base" / "config.json").exists():
        model.save_pretrained(root / "base", max_shard_size="100GB")
    for index in range(1, experts + 1):
        target = root / f"expert-{index}"
        if (target / "config.json").exists():
            continue
        generator = torch.Generator().manual_seed(index)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                start = base[name].to(torch.float32)
                if start.dim() >= 2:
                    noise = torch.randn(start.shape, generator=generator) * (TASK_VECTOR_SCALE * float(start.std()))
                    start = start + noise
                parameter.copy_(start.to(torch.bfloat16))
        model.save_pretrained(target, max_shard_size="100GB")
        print(f"built {target}", flush=True)


def describe_inputs(root: Path) -> dict:
    files = sorted((root / "base").glob("*.safetensors"))
    return {"config": CONFIG, "task_vector_scale": TASK_VECTOR_SCALE,
            "model_bytes": sum(path.stat().st_size for path in files)}


# ----------------------------------------------------------------------------- runs


def run_once(tool: str, method: str, root: Path, experts: int, repeat: int, args) -> dict:
    out = root / "out" / f"{tool}-{method}-{experts}"
    inputs = [root / f"expert-{i}" for i in range(1, experts + 1)]
    cache = root / "out" / "digest-cache"
    environment = {**os.environ, "UMTAM_CACHE_DIR": str(cache)}
    state = "-"
    if tool == "umtam":
        state = "cold" if repeat == 0 else "warm"
        if state == "cold":
            shutil.rmtree(cache, ignore_errors=True)
        command = [sys.executable, "-m", "umtam_cli", "merge", *map(str, inputs), "--base", str(root / "base"),
                   "--method", method, *UMTAM_OPTIONS[method], "--task-names",
                   ",".join(f"lm:expert{i}" for i in range(1, experts + 1)), "-o", str(out), "--force", "--quiet"]
    else:
        config = root / "out" / f"mergekit-{method}.yaml"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(mergekit_config(method, root, inputs))
        command = [args.mergekit, str(config), str(out), "--allow-crimes", "--out-shard-size", "100B"]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=environment)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    stderr = process.stderr.read()
    if status != 0:
        raise SystemExit(f"{' '.join(command)} failed: {stderr[-600:]}")
    record = {"tool": tool, "method": method, "experts": experts, "repeat": repeat, "digest_cache": state,
              "seconds": seconds,
              "peak_rss_bytes": usage.ru_maxrss * 1024, "command": " ".join(command)}
    print(json.dumps(record), flush=True)
    return record


def mergekit_config(method: str, root: Path, inputs: list[Path]) -> str:
    name = {"task-arithmetic": "task_arithmetic", "ties": "ties"}[method]
    parameters = "{weight: 1.0, density: 0.2}" if method == "ties" else "{weight: 1.0}"
    models = "\n".join(f"  - model: {path.resolve()}\n    parameters: {parameters}" for path in inputs)
    return f"merge_method: {name}\nbase_model: {(root / 'base').resolve()}\nmodels:\n{models}\ndtype: bfloat16\n"


def compare_logits(first: Path, second: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    ids = torch.randint(3, CONFIG["vocab_size"], (2, 64), generator=torch.Generator().manual_seed(0))
    logits = []
    for path in (first, second):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        with torch.inference_mode():
            logits.append(model(ids).logits)
        del model
    difference = (logits[0] - logits[1]).abs()
    return {"max_abs_difference": float(difference.max()), "mean_abs_difference": float(difference.mean()),
            "max_abs_logit": float(logits[0].abs().max())}


def save(result: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")


def report(result: dict) -> str:
    import statistics

    size = result["inputs"]["model_bytes"]
    rows = [f"one model: {size / 1e9:.2f} GB", "method            tool      experts  hashes  runs  wall s (mean, "
                                               "min-max)  peak RSS GB (max)  RSS / model"]
    keys = sorted({(r["method"], r["tool"], r["experts"], r.get("digest_cache", "-")) for r in result["runs"]})
    for method, tool, experts, state in keys:
        runs = [r for r in result["runs"]
                if (r["method"], r["tool"], r["experts"], r.get("digest_cache", "-")) == (method, tool, experts, state)]
        seconds = [r["seconds"] for r in runs]
        rss = max(r["peak_rss_bytes"] for r in runs)
        rows.append(f"{method:17} {tool:9} {experts:7}  {state:6}  {len(runs):4}  {statistics.mean(seconds):6.1f} "
                    f"({min(seconds):.1f}-{max(seconds):.1f})        {rss / 1e9:6.2f}          {rss / size:.2f}")
    for method, logits in result.get("logits", {}).items():
        rows.append(f"{method}: logits max |umtam - mergekit| {logits['max_abs_difference']:.3g} "
                    f"(mean {logits['mean_abs_difference']:.3g}; largest logit {logits['max_abs_logit']:.3g})")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
