"""What the GPU tests run in other processes (a task's side of a grant), and their models.

Spawned processes import this module by name, so it must import without Ray (the package's
``__init__`` sees to that) and hold everything they call.
"""

from __future__ import annotations

import os
import traceback

import torch
from torch import nn

from trims_ray._gpu_lease import GpuLease
from trims_ray._protocol import GpuGrant


class Stack(nn.Module):
    """A few wide layers: enough bytes for a real copy, with an embedding tied to the head."""

    def __init__(self, width: int = 1024, depth: int = 4, vocab: int = 512) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.layers = nn.Sequential(*(nn.Linear(width, width) for _ in range(depth)))
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.layers(self.embed(ids))))


def stack() -> Stack:
    torch.manual_seed(0)
    return Stack()


def example_ids() -> torch.Tensor:
    return torch.arange(64).reshape(2, 32) % 512


def use_grant(grant: GpuGrant, env: dict, results, write: bool = False) -> None:
    """A task: maps the grant, checks that every weight lies inside the holder's allocation,
    runs the model, optionally writes one weight in place (to show the memory is shared),
    and sends back what it saw."""
    try:
        os.environ.update(env)
        out: dict = {"visible": os.environ.get("CUDA_VISIBLE_DEVICES")}
        lease = GpuLease(grant, lambda: None)
        with lease as model:
            buffer = lease._buffer
            lo, hi = buffer.data_ptr(), buffer.data_ptr() + buffer.numel()
            # A model registered without a factory arrives as its state dict.
            tensors = list(model.values()) if isinstance(model, dict) else [*model.parameters(), *model.buffers()]
            out["inside"] = all(lo <= t.data_ptr() and t.data_ptr() + t.numel() * t.element_size() <= hi for t in tensors)
            out["device"] = buffer.device.index
            out["all_cuda"] = all(t.is_cuda for t in tensors)
            out["allocated_before_forward"] = torch.cuda.memory_allocated(buffer.device)
            if not isinstance(model, dict):
                with torch.inference_mode():
                    # As numpy, pickled by value: a tensor would go through torch's fd sharing,
                    # which needs this process alive until the parent has read it.
                    out["logits"] = model(example_ids().to(buffer.device)).cpu().numpy()
            if write:
                with torch.no_grad():
                    model.layers[0].bias[0] = 12345.0
                torch.cuda.synchronize(buffer.device)
        results.put(out)
    except BaseException:  # noqa: BLE001 - the parent reports it
        results.put({"error": traceback.format_exc()})
