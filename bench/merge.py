"""Merge time and peak memory on the default model, against the disk-speed floor of the same run.

    python bench/merge.py                          # every method, 4 inputs, 1 repeat
    python bench/merge.py --repeats 3 --methods umtam,ties --out bench/results/merge-umtam-ties.json

The inputs are SYNTHETIC task vectors, not trained experts: 4 checkpoints of
all-MiniLM-L6-v2 (22.7M parameters), each the base classifier exactly as
`umtam train` builds it (same seed, same base record) plus a seeded dense
Gaussian task vector (std 1e-3 by default) on every floating encoder tensor,
with random positive curvature statistics shaped like the tracker's
(exp_avg_sq_row/<name>, exp_avg_sq_col/<name> for matrices, exp_avg_sq/<name>
for vectors) and a training-like sidecar for rte, mrpc, cola and sst2. The
merge does the same work whatever the values, so time and memory are those of
real checkpoints; the merged weights mean nothing. The inputs are cached under
--work-dir and reused while their recipe is unchanged.

Every measurement runs in its own fresh process, which reports its own peak
RSS as VmHWM from /proc/self/status: ru_maxrss survives exec, so a child's
would include its parent's RSS at fork. Rows:

    import baseline   a process that only imports torch and umtam.merge
    disk floor        read the 4 inputs' model.safetensors in full (raw bytes, one
                      buffer reused) and write one file of the same size, fsynced
    safetensors floor the same through safetensors: load_file + copy each input, save_file one
    base rebuild      models.load_base_encoder alone (what methods needing W0 pay once)
    <method>          umtam.merge.merge_checkpoints(inputs, out, method=M), default options

Seconds time the measured call only, after the imports (a merge's own lazy
imports, e.g. transformers for the base, are included). With --repeats N the
minimum time and the maximum peak RSS are reported. Files are read warm from the
page cache, as a merge right after training would; ratios compare to the disk
floor of the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Only the standard library at module level: the parent process stays small, and
# each worker imports what it measures.

TASKS = ("rte", "mrpc", "cola", "sst2")
MiB = 2**20


# ----------------------------------------------------------------------------- workers (child processes)


def peak_rss() -> dict:
    """This process's peak RSS: VmHWM (its own address space) and ru_maxrss (for the record)."""
    import resource

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    record = {"ru_maxrss_bytes": maxrss if sys.platform == "darwin" else maxrss * 1024}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                record["vmhwm_bytes"] = int(line.split()[1]) * 1024
    except OSError:
        pass
    record["peak_rss_bytes"] = record.get("vmhwm_bytes", record["ru_maxrss_bytes"])
    return record


class RssSampler:
    """Samples RssAnon and RssFile every few ms in a thread: VmHWM is exact but does not split them.

    File-backed pages (the memory-mapped inputs a merge reads) count in RSS while
    mapped but are page cache, reclaimable and shared; anonymous pages are what
    the process really allocated. Sampling can miss a spike shorter than the interval.
    """

    def __init__(self, interval: float = 0.002):
        import threading

        self.interval, self.peak = interval, {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in self.peak:
                self.peak[key] = max(self.peak[key], int(value.split()[0]) * 1024)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self):
        if Path("/proc/self/status").exists():
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join()
            self._sample()

    def record(self) -> dict:
        return {"sampled_peak_anon_bytes": self.peak["RssAnon"], "sampled_peak_file_bytes": self.peak["RssFile"],
                "sampled_peak_rss_bytes": self.peak["VmRSS"]}


def worker_build(spec: dict) -> dict:
    """Write the synthetic input checkpoints (or keep cached ones built from the same recipe)."""
    import torch

    from umtam import __version__, checkpoint, models
    from umtam.base_model import base_record
    from umtam.heads import encoder_tensors
    from umtam.hf_interop import hf_files
    from umtam.tasks import get_task

    source = models.resolve_model(spec["model"])
    recipe = {"model": source.location, "init_seed": spec["init_seed"], "std": spec["std"],
              "density": spec["density"], "stats_seed": spec["stats_seed"]}
    paths = {task: Path(spec["work_dir"]) / "inputs" / task for task in spec["tasks"]}
    if all(_cached(path, {**recipe, "task_seed": 1000 + index}) for index, path in enumerate(paths.values())):
        return {"built": False, "inputs": [str(p) for p in paths.values()]}

    tokenizer = models.load_tokenizer(source)
    torch.manual_seed(spec["init_seed"])
    model = models.load_classifier(source, num_labels=2)
    state = {key: value.detach().clone() for key, value in model.state_dict().items()}
    base = base_record(source, encoder_tensors(state), init_seed=spec["init_seed"])
    parameters = dict(model.named_parameters())
    extra_files = hf_files(model, tokenizer)
    for index, (task, path) in enumerate(paths.items()):
        generator = torch.Generator().manual_seed(1000 + index)  # the task vector's seed
        tensors = {key: _perturbed(key, value, spec["std"], spec["density"], generator)
                   for key, value in state.items()}
        stats = _synthetic_stats(parameters, torch.Generator().manual_seed(spec["stats_seed"] + index))
        sidecar = {
            "kind": "train",
            "umtam_version": __version__,
            "tasks": {task: {"label_names": list(get_task(task).label_names), "is_regression": False,
                             "metrics": {}}},
            "base_model": base,
            "stats": {"beta2": 0.999, "bias_corrected": True, "tracked_steps": 0},
            "synthetic": {**recipe, "task_seed": 1000 + index,
                          "note": "bench/merge.py: base + seeded random task vector, random stats; not trained"},
        }
        checkpoint.write_checkpoint(path, tensors=tensors, stats=stats, sidecar=sidecar,
                                    extra_files=extra_files, force=True)
    return {"built": True, "inputs": [str(p) for p in paths.values()]}


def _cached(path: Path, recipe: dict) -> bool:
    from umtam.checkpoint import load_checkpoint
    from umtam.errors import UmtamError

    try:
        found = load_checkpoint(path, verify=True)
    except UmtamError:
        return False
    synthetic = dict(found.sidecar.as_json().get("synthetic", {}))
    synthetic.pop("note", None)
    return synthetic == recipe


def _perturbed(key, value, std, density, generator):
    """W0 + T for encoder floating tensors (T Gaussian, a `density` fraction nonzero); heads and buffers as is."""
    import torch

    from umtam.heads import is_head_key

    if is_head_key(key) or not value.is_floating_point():
        return value
    noise = torch.randn(value.shape, generator=generator) * std
    if density < 1.0:
        noise *= torch.rand(value.shape, generator=generator) < density
    return (value.float() + noise).to(value.dtype)


def _synthetic_stats(parameters, generator):
    """Positive log-normal values in the tracker's layout: row/col means for matrices, full for vectors."""
    import torch

    def positive(n):
        return torch.exp(torch.randn(n, generator=generator) - 16.0)  # ~1e-7, like squared gradients

    stats = {}
    for name, p in parameters.items():
        if p.dim() >= 2:
            m = p.shape[0]
            stats[f"exp_avg_sq_row/{name}"] = positive(m)
            stats[f"exp_avg_sq_col/{name}"] = positive(p.numel() // m)
        else:
            stats[f"exp_avg_sq/{name}"] = positive(p.numel()).reshape(p.shape)
    return stats


def worker_baseline(spec: dict) -> dict:
    start = time.perf_counter()
    import torch

    import umtam.merge  # noqa: F401

    seconds = time.perf_counter() - start
    cpu = {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    return {"seconds": seconds, **cpu}


def worker_disk_floor(spec: dict) -> dict:
    """Read every input's model.safetensors in full into one reused buffer, write one as large, fsync."""
    import torch  # noqa: F401  (same interpreter floor as the merges)

    import umtam.merge  # noqa: F401

    inputs = [Path(p) / "model.safetensors" for p in spec["inputs"]]
    output = Path(spec["output"])
    output.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    buffer = bytearray(max(p.stat().st_size for p in inputs))
    view = memoryview(buffer)
    read = 0
    for path in inputs:
        with open(path, "rb", buffering=0) as handle:
            size = path.stat().st_size
            done = 0
            while done < size:
                count = handle.readinto(view[done:size])
                if not count:
                    raise OSError(f"{path}: short read")
                done += count
            read += done
    read_seconds = time.perf_counter() - start
    target = output / "model.safetensors"
    with open(target, "wb", buffering=0) as handle:
        handle.write(view[:inputs[-1].stat().st_size])
        written = time.perf_counter()
        os.fsync(handle.fileno())
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "read_seconds": read_seconds, "write_seconds": written - start - read_seconds,
            "fsync_seconds": seconds - (written - start), "bytes_read": read, "bytes_written": target.stat().st_size}


def worker_safetensors_floor(spec: dict) -> dict:
    """safetensors.torch.load_file every input and copy each tensor out (one input held at a time), save_file the last.

    load_file's tensors are views of a memory map, so without the copy nothing
    but the saved input would ever be read.
    """
    from safetensors.torch import load_file, save_file

    import umtam.merge  # noqa: F401

    output = Path(spec["output"])
    output.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    tensors = None
    for path in spec["inputs"]:
        tensors = None  # drop the previous input before reading the next
        tensors = {key: value.clone() for key, value in load_file(str(Path(path) / "model.safetensors")).items()}
    read_seconds = time.perf_counter() - start
    target = output / "model.safetensors"
    save_file(tensors, str(target), metadata={"format": "pt"})
    written = time.perf_counter()
    with open(target, "rb") as handle:
        os.fsync(handle.fileno())
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "read_seconds": read_seconds, "write_seconds": written - start - read_seconds,
            "fsync_seconds": seconds - (written - start), "bytes_written": target.stat().st_size}


def worker_base_rebuild(spec: dict) -> dict:
    import torch  # noqa: F401

    import umtam.merge  # noqa: F401
    from umtam.base_model import load_base_encoder
    from umtam.checkpoint import load_checkpoint

    record = load_checkpoint(spec["inputs"][0], verify=False).sidecar.base_model
    start = time.perf_counter()
    base = load_base_encoder(record)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "base_bytes": sum(t.numel() * t.element_size() for t in base.values())}


def worker_merge(spec: dict) -> dict:
    import torch

    from umtam.merge import merge_checkpoints

    start = time.perf_counter()
    written, report = merge_checkpoints(spec["inputs"], spec["output"], method=spec["method"],
                                        options=spec.get("options"), force=True)
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "options": report.sidecar["lineage"]["options"],
        "estimated_peak_bytes": report.plan.estimated_peak_bytes,
        "passes": report.plan.passes,
        "needs_base": report.plan.needs_base,
        "output_bytes": (Path(written.path) / "model.safetensors").stat().st_size,
        "torch_threads": torch.get_num_threads(),
    }


WORKERS = {
    "build": worker_build,
    "baseline": worker_baseline,
    "disk-floor": worker_disk_floor,
    "safetensors-floor": worker_safetensors_floor,
    "base-rebuild": worker_base_rebuild,
    "merge": worker_merge,
}


def worker_main(kind: str, spec_json: str) -> int:
    with RssSampler() as sampler:
        result = WORKERS[kind](json.loads(spec_json))
    result.update(peak_rss())
    result.update(sampler.record())
    print("RESULT " + json.dumps(result), flush=True)
    return 0


# ----------------------------------------------------------------------------- orchestration (parent)


def run_worker(kind: str, spec: dict) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, json.dumps(spec)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"worker {kind} failed (exit {done.returncode})")
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    return {**json.loads(lines[-1][len("RESULT "):]), "process_seconds": wall}


def machine_info(work_dir: Path) -> dict:
    info = {"platform": platform.platform(), "machine": platform.machine(), "python": platform.python_version(),
            "cpu_count": os.cpu_count()}
    if hasattr(os, "sched_getaffinity"):
        info["cpus_usable"] = len(os.sched_getaffinity(0))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["memory_bytes"] = int(line.split()[1]) * 1024
        info["work_dir_filesystem"] = _filesystem(work_dir)
    except OSError:
        pass
    return info


def _filesystem(path: Path) -> str | None:
    best, fstype = "", None
    resolved = str(path.resolve())
    for line in Path("/proc/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 3 and (resolved == parts[1] or resolved.startswith(parts[1].rstrip("/") + "/")):
            if len(parts[1]) > len(best):
                best, fstype = parts[1], f"{parts[2]} on {parts[1]}"
    return fstype


def measure(label: str, kind: str, spec: dict, repeats: int, output: Path | None) -> dict:
    runs = []
    for _ in range(repeats):
        if output is not None and output.exists():
            shutil.rmtree(output)  # outside the timing: a merge would otherwise pay to retire the old one
        runs.append(run_worker(kind, spec))
        if output is not None and output.exists():
            shutil.rmtree(output)
    best = min(runs, key=lambda run: run["seconds"])
    row = {"label": label, "kind": kind, **best,
           "seconds": best["seconds"], "seconds_all": [run["seconds"] for run in runs],
           "peak_rss_bytes": max(run["peak_rss_bytes"] for run in runs),
           "peak_rss_all": [run["peak_rss_bytes"] for run in runs]}
    print(f"  {label}: {row['seconds']:.2f} s, peak RSS {row['peak_rss_bytes'] / MiB:.0f} MiB",
          file=sys.stderr, flush=True)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", help="comma list (default: every registered method)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per row; min time, max RSS reported")
    parser.add_argument("--model", help="model directory or id (default: all-MiniLM-L6-v2, found locally)")
    parser.add_argument("--std", type=float, default=1e-3, help="std of the synthetic task vectors")
    parser.add_argument("--density", type=float, default=1.0, help="fraction of task-vector entries nonzero")
    parser.add_argument("--seed", type=int, default=42, help="init seed of the base classifier (as `umtam train`)")
    parser.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "umtam-bench-merge"),
                        help="where inputs are cached (reused if present) and outputs written")
    parser.add_argument("--out", default="bench/results/merge.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.worker:
        return worker_main(args.worker, rest[0])
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if not 0 < args.density <= 1:
        parser.error("--density must be in (0, 1]")

    available = _available_methods()
    methods = args.methods.split(",") if args.methods else available
    unknown = [name for name in methods if name not in available]
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(available)}")

    work_dir = Path(args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    print(f"building or reusing synthetic inputs under {work_dir}", file=sys.stderr, flush=True)
    built = run_worker("build", {"model": args.model, "init_seed": args.seed, "std": args.std,
                                 "density": args.density, "stats_seed": 7, "tasks": list(TASKS),
                                 "work_dir": str(work_dir)})
    inputs = built["inputs"]
    model_bytes = Path(inputs[0], "model.safetensors").stat().st_size
    out_root = work_dir / "out"
    common = {"inputs": inputs}

    reference = [
        ("import baseline", "baseline", common, None),
        ("disk floor", "disk-floor", {**common, "output": str(out_root / "disk-floor")}, out_root / "disk-floor"),
        ("safetensors floor", "safetensors-floor", {**common, "output": str(out_root / "st-floor")},
         out_root / "st-floor"),
        ("base rebuild", "base-rebuild", common, None),
    ]
    print("measuring (each row in its own process)", file=sys.stderr, flush=True)
    rows = [measure(label, kind, spec, args.repeats, output) for label, kind, spec, output in reference]
    for method in methods:
        output = out_root / method
        rows.append(measure(method, "merge", {**common, "method": method, "output": str(output)},
                            args.repeats, output))

    baseline, floor = rows[0], rows[1]
    for row in rows:
        row["time_ratio"] = row["seconds"] / floor["seconds"]
        row["rss_over_model"] = row["peak_rss_bytes"] / model_bytes
        row["rss_above_baseline_over_model"] = (row["peak_rss_bytes"] - baseline["peak_rss_bytes"]) / model_bytes
        row["anon_above_baseline_over_model"] = (
            row["sampled_peak_anon_bytes"] - baseline["sampled_peak_anon_bytes"]) / model_bytes

    report = {
        "command": " ".join(["python", *sys.argv]),
        "machine": {**machine_info(work_dir), "torch": baseline.get("torch"),
                    "torch_threads": baseline.get("torch_threads")},
        "inputs": {"count": len(inputs), "tasks": list(TASKS), "paths": inputs, "built_this_run": built["built"],
                   "model_bytes": model_bytes, "synthetic": True, "task_vector_std": args.std,
                   "task_vector_density": args.density, "init_seed": args.seed},
        "repeats": args.repeats,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(markdown_table(report))
    return 0


def _available_methods() -> list[str]:
    """Asked of a child, so the parent never imports torch."""
    code = "from umtam.merge import available_methods; print(','.join(available_methods()))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return done.stdout.strip().split(",")


def markdown_table(report: dict) -> str:
    machine, inputs = report["machine"], report["inputs"]
    lines = [
        f"Merging {inputs['count']} checkpoints of all-MiniLM-L6-v2 ({inputs['model_bytes'] / MiB:.1f} MiB "
        f"model.safetensors each). SYNTHETIC inputs: base + seeded Gaussian task vector "
        f"(std {inputs['task_vector_std']:g}, density {inputs['task_vector_density']:g}) and random statistics; "
        "timing and memory do not depend on the values.",
        f"{machine.get('cpu', machine['machine'])}, {machine.get('cpus_usable', machine['cpu_count'])} CPUs, "
        f"torch {machine['torch']} ({machine['torch_threads']} threads), {machine.get('work_dir_filesystem')}; "
        f"warm page cache; min time / max RSS of {report['repeats']} run(s), each in its own process.",
        "",
        "| method | seconds | x floor | peak RSS MiB | RSS / model | (RSS - baseline) / model "
        "| (anon - baseline) / model |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        lines.append(
            f"| {row['label']} | {row['seconds']:.2f} | {row['time_ratio']:.1f} | "
            f"{row['peak_rss_bytes'] / MiB:.0f} | {row['rss_over_model']:.2f} | "
            f"{row['rss_above_baseline_over_model']:.2f} | {row['anon_above_baseline_over_model']:.2f} |")
    lines += ["", "import baseline: a process that only imports torch and umtam.merge (its seconds: the imports). "
              "disk floor: read the 4 inputs' model.safetensors in full and write one as large, fsynced. "
              "base rebuild: load_base_encoder alone, paid once by every method but average and fisher. "
              "peak RSS is VmHWM (exact) and counts the memory-mapped inputs' pages; anon is the sampled "
              "peak of RssAnon, what the process itself allocated."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
