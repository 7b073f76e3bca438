"""Results say what they ran on: the CPU's model and torch's kernels, or the GPU's name."""

from __future__ import annotations

import torch

from umtam.machine import cpu_model, machine_name


def test_the_cpu_model_is_the_first_model_name_in_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9R14\n\n"
                       "processor\t: 1\nmodel name\t: AMD EPYC 9R14\n")
    assert cpu_model(cpuinfo) == "AMD EPYC 9R14"


def test_without_cpuinfo_the_platform_names_the_cpu(tmp_path, monkeypatch):
    import platform

    monkeypatch.setattr(platform, "processor", lambda: "arm")
    assert cpu_model(tmp_path / "absent") == "arm"
    monkeypatch.setattr(platform, "processor", lambda: "")  # Linux often leaves it empty
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert cpu_model(tmp_path / "absent") == "aarch64"


def test_a_cpu_run_names_the_kernels_torch_picked(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    name = machine_name()
    assert name.startswith("cpu: ") and name.endswith(f"({torch.backends.cpu.get_cpu_capability()})")
