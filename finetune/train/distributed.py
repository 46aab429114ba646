"""Several processes, several machines: what changes when the trained model is sharded (FSDP2).

Data-parallel (DDP) processes each hold the whole model; nothing here applies to them. Under FSDP2
(`torch.distributed.fsdp.fully_shard`, through accelerate's FullyShardedDataParallelPlugin) every trained
parameter is a DTensor holding 1/N of its rows, so anything that reads whole weights (checkpoints, the
in-sync check, the NaN guard, the export) must gather them, and every gather is a collective that ALL
processes enter: a gather inside `if is_main_process:` waits forever. The helpers below are called by every
process and hand the whole tensors to the main process only.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch

from finetune.errors import UserError


def promote_fsdp_on_cpu(acc) -> None:
    """accelerate 1.15 turns an FSDP launch on CPUs into plain data parallel (MULTI_CPU) without a word,
    although fully_shard works with the gloo backend; keep the sharding that was asked for."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if not asked or acc.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables accelerate launch set
    if acc.mixed_precision != "no":
        plugin.set_mixed_precision(acc.mixed_precision)
    acc.state.fsdp_plugin = plugin
    # in both shared states: every later AcceleratorState() (the optimizer wrapper makes one) copies the
    # PartialState's type back over its own
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    acc.state.distributed_type = DistributedType.FSDP


def is_sharded(acc) -> bool:
    from accelerate.utils import DistributedType

    return acc.distributed_type == DistributedType.FSDP


def describe(acc) -> str:
    """How the processes share the work, for the banner."""
    if acc.num_processes == 1:
        return "1 process"
    machines = int(os.environ.get("ACCELERATE_NUM_MACHINES", os.environ.get("GROUP_WORLD_SIZE", "1")) or 1)
    where = f" on {machines} machines" if machines > 1 else ""
    if is_sharded(acc):
        version = acc.state.fsdp_plugin.fsdp_version
        return f"{acc.num_processes} processes{where}, FSDP{version} (trained parameters sharded)"
    return f"{acc.num_processes} processes{where}, data parallel"


def check_sharding(acc, trained: list[str], ema: bool) -> None:
    """What FSDP through accelerate cannot do, said before any step."""
    if not is_sharded(acc):
        return
    if acc.state.fsdp_plugin.fsdp_version != 2:
        raise UserError("fsdp_config.fsdp_version: finetune supports FSDP2 only; set fsdp_version: 2 in the "
                        "accelerate config")
    if len(trained) > 1:
        raise UserError(f"FSDP shards one model, and this method trains {len(trained)} ({', '.join(trained)}); "
                        "train the text encoder off (method.train_text_encoder: false) or use data parallel "
                        "(recipes/accelerate/ddp_multi_gpu.yaml)")
    if acc.state.fsdp_plugin.activation_checkpointing:
        raise UserError("fsdp_config.fsdp_activation_checkpointing renames every block's parameters, which "
                        "checkpoints and exports are keyed on; turn it off and set train.gradient_checkpointing: true")
    if ema:
        raise UserError("train.ema.enabled: EMA is not supported under FSDP yet; turn it off or use data parallel")


def full_tensors(params: dict[str, torch.Tensor], main: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, whole tensor on the CPU) for every parameter, yielded on the main process only; every process
    must run the loop to the end, because each sharded tensor is gathered by all of them."""
    for name, p in params.items():
        p = p.detach()
        whole = p.full_tensor() if hasattr(p, "full_tensor") else p
        if main:
            yield name, whole.cpu()


def gather(params: dict[str, torch.Tensor], main: bool) -> dict[str, torch.Tensor]:
    return dict(full_tensors(params, main))


def load_into(p: torch.Tensor, whole: torch.Tensor) -> None:
    """Copy a whole tensor into a parameter that may be sharded: each process keeps its own shard."""
    with torch.no_grad():
        if hasattr(p, "device_mesh"):
            from torch.distributed.tensor import distribute_tensor

            whole = distribute_tensor(whole.to(p.device, p.dtype), p.device_mesh, p.placements)
            p.to_local().copy_(whole.to_local())
        else:
            p.copy_(whole.to(p.device, p.dtype))


def unshard_for_export(module: torch.nn.Module) -> None:
    """Gather every FSDP unit's parameters into the module for good (all processes take part), so the main
    process's export reads whole plain tensors. Nothing runs forward afterwards."""
    from torch.distributed.fsdp import FSDPModule

    for unit in [m for m in module.modules() if isinstance(m, FSDPModule)]:
        unit.unshard()
        # FSDP2 reshards before every state_dict() (a pre-hook); the export reads state dicts, so drop the
        # hook. torch keeps its handles on the unit's parameter group (private; checked against torch 2.13)
        group = unit._get_fsdp_state()._fsdp_param_group
        for handles in (group._module_to_pre_save_state_dict_hook_handle,
                        group._module_to_pre_load_state_dict_hook_handle) if group else ():
            for handle in handles.values():
                handle.remove()
            handles.clear()
            handles[None] = _Inert()  # non-empty: FSDP does not register the hooks again
        # fully_shard swapped the class for 'FSDP<name>'; diffusers writes the class name into the exported
        # configs, and stock loaders know only the original
        unit.__class__ = next(b for b in type(unit).__bases__ if not issubclass(b, FSDPModule))
    # the gathered parameters are views into FSDP's communication buffer, which safetensors cannot save:
    # give each its own storage
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None:
                m._parameters[name] = torch.nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)


class _Inert:
    def remove(self) -> None:
        pass


def peer_lost(error: BaseException) -> str | None:
    """One line for a collective that failed because another process died or stopped answering (gloo and
    NCCL raise RuntimeError with these phrases); None for any other error."""
    text = str(error)
    signs = ("Timed out", "timed out", "Connection closed by peer", "Connection reset by peer",
             "communicator was aborted", "Broken pipe")
    if not isinstance(error, RuntimeError) or not any(s in text for s in signs):
        return None
    detail = text.strip().splitlines()[0][-160:] if text.strip() else type(error).__name__
    return (f"lost contact with another process ({detail}); the error of the process that failed, if it "
            "raised one, is printed above; a process that hangs is given up on after train.barrier_timeout seconds")


def die_with_launcher() -> None:
    """A process started by `accelerate launch` / torchrun lives in its own session, so when the launcher is
    killed outright (SIGKILL, a lost machine, an OOM killer) nothing tells it, and it trains on, or waits
    at a collective, as an orphan. Ask Linux to SIGKILL this process when its parent dies."""
    if "TORCHELASTIC_RUN_ID" not in os.environ and "LOCAL_RANK" not in os.environ:
        return  # not launched: a plain `python -m finetune` has no launcher to outlive
    import ctypes
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the launcher died before the request took effect
        os._exit(1)
