"""Test-only shim: let accelerate drive FSDP2 on CPU processes (gloo), which it refuses to do on its own.

accelerate (1.15) enables FSDP only when the process group runs on an accelerator (`MULTI_GPU`, `MULTI_NPU`, ...); on
CPU the same launch becomes `MULTI_CPU`, i.e. plain DDP, while `ACCELERATE_USE_FSDP=true` and an FSDP2 plugin are
set (docs/distributed.md, "FSDP2 on CPU"). `install()` wraps `AcceleratorState.__init__` so that, in exactly that
situation, the state takes the branch accelerate takes on GPUs: `distributed_type = FSDP` with the plugin it was
given. Everything downstream is accelerate's and transformers' own FSDP2 code (`fsdp2_prepare_model` →
`torch.distributed.fsdp.fully_shard` over the gloo group, DTensor parameters, FSDP2 gradient clipping, the
full-state-dict gather); only the device-type check is bypassed. Not used by the package.
"""

from __future__ import annotations

import functools
import os


ENV = "TRL_SAFETY_TEST_FSDP_ON_CPU"


def install() -> None:
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__
    if getattr(original, "_trl_safety_fsdp_cpu", False):
        return

    @functools.wraps(original)
    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if (
            fsdp_plugin is not None
            and self.distributed_type == DistributedType.MULTI_CPU
            and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
        ):
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            # as accelerate does at the end of its own __init__, so that a later `AcceleratorState()` keeps FSDP
            PartialState._shared_state["distributed_type"] = self.distributed_type

    __init__._trl_safety_fsdp_cpu = True
    AcceleratorState.__init__ = __init__


if os.environ.get(ENV) == "1":
    install()
