"""What a phase cost: the `cost` block of every manifest.json, with the same fields in every phase.

- `forward_sample_passes`: rows sent through the model's image tower, counted where the forward happens (a
  batch of B rows is B, a padded chunk counts its padding, a row forwarded under three transforms is three).
  Text-tower passes of captions and class prompts are not counted, except in scoring's caption_disagreement,
  whose per-row model work is its caption's text feature (one per row: an upper bound, as repeated captions are
  encoded once). Each phase's docstring or its caller says what its count covers.
- `backward_sample_passes`: rows whose loss (or saliency) was back-propagated through the image tower.
- `wall_time_s`: the phase's wall time, as in its manifest.
- `reserved_cpus`, `reserved_gpus`: the Ray CPUs and GPUs the phase holds while it runs: its actors' or
  workers' reservations; for phases of plain Ray Data tasks (prepare, poison, select) the cluster's CPUs, which
  those tasks may take; for a phase that runs in the driver's process (evaluate) its torch threads and device.
- `reserved_cpu_seconds`, `reserved_gpu_seconds`: reservations times wall time ("reserved", not measured
  use: an idle reserved CPU counts). A composite phase (defend, compare, sweep) sums its parts' instead.
- `devices`: the reservation in words, e.g. "2 actors x 1 CPU".

Passes of work that a failure throws away (a retried batch, steps redone after a restart from a checkpoint) are
not counted; the passes of a training run resumed from a checkpoint include those before it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

FIELDS = ("forward_sample_passes", "backward_sample_passes", "wall_time_s", "reserved_cpus", "reserved_gpus",
          "reserved_cpu_seconds", "reserved_gpu_seconds", "devices")


@dataclass
class Usage:
    """What a phase used besides time: its sample-passes and its reservation. A composite phase gives its parts'
    summed `cpu_seconds` / `gpu_seconds` instead of multiplying its reservation by its wall time."""
    forward: int = 0
    backward: int = 0
    cpus: float = 0.0
    gpus: float = 0.0
    devices: str = ""
    cpu_seconds: float | None = None
    gpu_seconds: float | None = None


def cost_block(usage: Usage, wall_time_s: float) -> dict:
    """The manifest's `cost` block of a phase that used `usage` for `wall_time_s` seconds."""
    cpu_s = usage.cpus * wall_time_s if usage.cpu_seconds is None else usage.cpu_seconds
    gpu_s = usage.gpus * wall_time_s if usage.gpu_seconds is None else usage.gpu_seconds
    return {"forward_sample_passes": int(usage.forward), "backward_sample_passes": int(usage.backward),
            "wall_time_s": round(float(wall_time_s), 3), "reserved_cpus": usage.cpus, "reserved_gpus": usage.gpus,
            "reserved_cpu_seconds": round(float(cpu_s), 1), "reserved_gpu_seconds": round(float(gpu_s), 1),
            "devices": usage.devices}


def empty_cost() -> dict:
    """The cost block of nothing run (e.g. a result written before costs were recorded)."""
    return cost_block(Usage(devices="none"), 0.0)


def summed(blocks: Iterable[dict | None], **over) -> Usage:
    """The Usage of a composite phase made of the phases whose cost `blocks` are given (None: counted as
    nothing): passes and reserved seconds summed, the largest reservation of a part, the parts' devices."""
    blocks = [b for b in blocks if b]
    devices = list(dict.fromkeys(b["devices"] for b in blocks if b.get("devices") and b["devices"] != "none"))
    usage = Usage(forward=sum(int(b["forward_sample_passes"]) for b in blocks),
                  backward=sum(int(b["backward_sample_passes"]) for b in blocks),
                  cpus=max((b["reserved_cpus"] for b in blocks), default=0.0),
                  gpus=max((b["reserved_gpus"] for b in blocks), default=0.0),
                  devices="; ".join(devices) or "none",
                  cpu_seconds=sum(float(b["reserved_cpu_seconds"]) for b in blocks),
                  gpu_seconds=sum(float(b["reserved_gpu_seconds"]) for b in blocks))
    for name, value in over.items():
        setattr(usage, name, value)
    return usage


def sum_costs(blocks: Iterable[dict | None]) -> dict:
    """The cost block of the phases whose `blocks` are given, run one after another (wall times summed)."""
    blocks = [b for b in blocks if b]
    return cost_block(summed(blocks), sum(float(b["wall_time_s"]) for b in blocks))


def cluster_cpu_usage(what: str = "Ray Data tasks") -> Usage:
    """The reservation of a phase of plain Ray Data tasks, which may take any CPU of the cluster: all of them."""
    import ray
    cpus = float(ray.cluster_resources().get("CPU", 0)) if ray.is_initialized() else 0.0
    return Usage(cpus=cpus, devices=f"{what} on the cluster's {cpus:g} CPUs")


def devices_text(count: int, what: str, cpus_each: float, gpus_each: float) -> str:
    """E.g. "2 actors x 1 CPU" or "8 workers x 1 GPU + 4 CPUs"."""
    parts = ([f"{gpus_each:g} GPU"] if gpus_each else []) + ([f"{cpus_each:g} CPU{'s' if cpus_each != 1 else ''}"]
                                                            if cpus_each else [])
    return f"{count} {what}{'s' if count != 1 else ''} x " + " + ".join(parts or ["nothing"])
