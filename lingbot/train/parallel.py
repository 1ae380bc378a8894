"""Parallelism applied to a plain `WorldModel` from outside (the model file knows nothing of it).

`apply_fsdp` shards the model with FSDP2 (`fully_shard`): every parameter becomes a DTensor split on
dim 0 over the processes. Each MoT layer is one communication unit (all-gathered just before its
forward and again before its backward, gradients reduce-scattered after), the root holds the rest
(embeddings, timestep MLPs, heads). Parameters, gradients and AdamW moments then take 1/N of the
memory each process would need under DDP.

The checkpoint format does not depend on the layout: `full_state` gathers the full tensors (on rank 0,
on CPU, one tensor at a time) in exactly the layout a single process writes (`model.state_dict()`,
`optimizer.state_dict()` with parameters numbered), and `load_full_state` sets such full tensors back
into a sharded or plain model. So a checkpoint written under FSDP resumes in one process or under DDP,
and the other way round.
"""

from __future__ import annotations

import torch

PARALLEL = ("ddp", "fsdp")  # TrainConfig.parallel: how the model is spread over torchrun's processes


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def apply_fsdp(model, device: torch.device) -> None:
    """Shard each MoT layer, then the root, over all processes of the default process group (in place)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    # On GPUs the all-gathered weights are bf16 (half the traffic, the dtype autocast computes in anyway)
    # while the sharded master weights, the optimizer and the gradient reduction stay fp32. CPUs compute
    # in fp32 (the loop does not autocast there), so nothing is cast.
    if device.type == "cuda":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        mp = MixedPrecisionPolicy()
    layers = list(model.layers)
    for i, layer in enumerate(layers):
        # Backward starts with the last layer: re-gathering it right after the forward would be wasted.
        fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=i < len(layers) - 1)
    # The root's own weights are small (embeddings and heads); the heads are the first used in backward.
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False)


def clip_grad_norm_(model, max_norm: float) -> torch.Tensor:
    """Clip all gradients to a global L2 norm of `max_norm`; returns the norm before clipping (a 0-d
    tensor on the gradients' device: reading it is the caller's host synchronisation, not this one's).

    Under FSDP each process holds a shard of every gradient: the norm of the shards is a partial
    result, made whole (summed over processes) before it scales the gradients.
    """
    from torch.distributed.tensor import DTensor

    params = [p for p in model.parameters() if p.grad is not None]
    total = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


def _param_names(model, optimizer) -> list[str]:
    """Parameter names in the order `optimizer.state_dict()` numbers them (group by group)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_state(model, optimizer, ema: dict[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    """(model state dict, optimizer state dict, EMA) with full tensors, as one process would have them.

    Under FSDP this is a collective (every process must call it) and only rank 0 gets the tensors, on
    CPU; the other ranks get empty dicts. A plain (or DDP-wrapped inner) model returns its own dicts.
    """
    if not is_sharded(model):
        return model.state_dict(), optimizer.state_dict(), ema
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    optim_state = get_optimizer_state_dict(model, optimizer, options=options)
    rank0 = torch.distributed.get_rank() == 0
    full_ema = {}
    for name, value in ema.items():
        value = value.full_tensor()  # collective: every rank gathers, one tensor at a time
        if rank0:
            full_ema[name] = value.cpu()
    if not rank0:
        return {}, {}, {}
    # torch's own layout numbers the parameters; the distributed one names them.
    number = {name: i for i, name in enumerate(_param_names(model, optimizer))}
    optim_state = {
        "state": {number[name]: st for name, st in optim_state["state"].items()},
        "param_groups": [{**g, "params": [number[name] for name in g["params"]]} for g in optim_state["param_groups"]],
    }
    return model_state, optim_state, full_ema


def load_full_state(model, optimizer, ema: dict[str, torch.Tensor], model_state: dict, optim_state: dict,
                    ema_state: dict) -> None:
    """Set full tensors (a single process's layout, see `full_state`) into a plain or sharded model,
    its optimizer and its EMA. Under FSDP every process passes the same full dicts and keeps its shard."""
    if not is_sharded(model):
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optim_state)
        for name, value in ema_state.items():
            ema[name] = value.to(ema[name].device)
        return
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    from torch.distributed.tensor import distribute_tensor

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    names = _param_names(model, optimizer)
    optim_state = {
        "state": {names[int(i)]: st for i, st in optim_state["state"].items()},
        "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in optim_state["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, optim_state, options=options)
    for name, value in ema_state.items():
        like = ema[name]
        # Every rank holds the same full tensor (read from the same file): each keeps its own shard, no traffic.
        ema[name] = distribute_tensor(value.to(like.device), like.device_mesh, like.placements, src_data_rank=None)
