"""Where a model runs: the device a user names, checked before any weight moves there.

The rest of the system stays on the host: the scheduler, block tables, trees, prompts and the
packed batch are built there, and a decoder moves its batch to its own device at the start of a
forward and hands its logits back on the host (acceptance and sampling run there, with each
request's CPU generator). So one process can run the target on a GPU and the drafter on the CPU.
"""

from __future__ import annotations

import torch


class DeviceError(ValueError):
    """A device that this process cannot run on; the message says what to use instead."""


def resolve_device(name: str | torch.device) -> torch.device:
    """``"cpu"``, ``"cuda"`` or ``"cuda:N"`` as a :class:`torch.device` this process can use."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise DeviceError(f"unknown device {str(name)!r}: use cpu, cuda or cuda:N") from e
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise DeviceError(f"device {str(name)!r} is not supported: use cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise DeviceError(
            f"device {str(name)!r} is not available: this torch ({torch.__version__}, {build}) sees "
            "no CUDA GPU; use --device cpu, or install a CUDA build of torch on a GPU machine"
        )
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise DeviceError(f"device {str(name)!r} does not exist: this machine has {count} CUDA GPU(s)")
    return torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
