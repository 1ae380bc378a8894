"""What the machine computes natively, and the precision a stage runs in because of it.

bf16 autocast is a win only where the hardware has bf16 arithmetic: CUDA GPUs that support it, and
x86 CPUs with AVX512-BF16 or AMX. Elsewhere oneDNN emulates it: on a CPU that runs torch's AVX2
kernels the VAE's training step took 37.6 s in bf16 against 0.85 s in fp32. So `auto` (every
stage's default) picks bf16 only where it is native and fp32 everywhere else; `bf16` forces it (with
one warning saying why it will be slow), `fp32` forbids it.

The CPU's answer follows what torch and oneDNN will really run: `ATEN_CPU_CAPABILITY=avx2` (torch's
kernels) or `ONEDNN_MAX_CPU_ISA=AVX2` (oneDNN's) make an AVX-512 machine answer as an AVX2 one does,
which is how such a CPU is rehearsed here.

`machine(device)` is what a stage records beside its outputs (the VAE's config, the checkpoints'
trainer state, `reports/*.timings.json`, every `lingbot bench` line): the precision, the CPU's kernel
ISA or the GPU's name, torch's version. Outputs are byte-identical on the same machine kind, ISA and
torch; two machines whose records differ here compute different floats.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from lingbot.errors import LingbotError

PRECISIONS = ("auto", "fp32", "bf16")

logger = logging.getLogger("lingbot.hardware")
_warned: set[tuple[str, str]] = set()


def cpu_isa() -> str:
    """The instruction set of torch's CPU kernels: AVX512, AVX2, DEFAULT (ARM without SVE), SVE256, ..."""
    return torch.backends.cpu.get_cpu_capability()


def native_bf16(device: torch.device | str) -> tuple[bool, str]:
    """(whether `device` computes bf16 natively, the reason in words)."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return True, f"{name} has bf16 tensor cores"
        return False, f"{name} has no native bf16"
    if device.type == "cpu":
        isa = cpu_isa()
        if not isa.startswith("AVX512"):
            return False, f"torch runs {isa} kernels on this CPU (bf16 needs AVX512-BF16 or AMX)"
        has_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        if not has_bf16:
            return False, "this CPU has AVX-512 but neither AVX512-BF16 nor AMX: bf16 would be emulated"
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False, "oneDNN is capped below bf16 on this CPU (ONEDNN_MAX_CPU_ISA)"
        return True, "this CPU has AVX512-BF16" + (" and AMX" if torch.cpu._is_amx_tile_supported() else "")
    return False, f"lingbot autocasts to bf16 only on CUDA and on CPUs with native bf16, not on {device.type}"


def resolve_precision(requested: str, device: torch.device | str, what: str, cpu_bf16: bool = True) -> str:
    """"fp32" or "bf16" for `what` (a stage, for messages) on `device`, from `auto`, `fp32` or `bf16`.

    `auto`: bf16 where it is native, else fp32; with `cpu_bf16` False, fp32 on every CPU (a stage whose
    CPU step bf16 does not speed up). `bf16` on a device that would emulate it is honoured with one
    warning per (what, device kind) saying why it will be slow."""
    if requested not in PRECISIONS:
        raise LingbotError(f"{what}: precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    if requested == "fp32":
        return "fp32"
    native, reason = native_bf16(device)
    if requested == "auto":
        return "bf16" if native and (cpu_bf16 or torch.device(device).type != "cpu") else "fp32"
    if not native and (what, torch.device(device).type) not in _warned:
        _warned.add((what, torch.device(device).type))
        logger.warning("%s: precision bf16 forced, but %s: expect it many times slower than fp32 "
                       "(precision auto picks fp32 here)", what, reason)
    return "bf16"


def autocast(device: torch.device | str, precision: str):
    """The autocast context of a resolved precision ("bf16": bf16 autocast; "fp32": none)."""
    device = torch.device(device)
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def torch_dtype(name: str) -> torch.dtype:
    """The weights' dtype of a policy from its name ("fp32", "bf16")."""
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    if name not in dtypes:
        raise LingbotError(f"dtype must be one of {', '.join(dtypes)}, got {name!r}")
    return dtypes[name]


def machine(device: torch.device | str) -> dict:
    """What decides a stage's floats besides its params and code: the device kind, the CPU kernels'
    ISA (or the GPU's name) and torch's version. Recorded with outputs; contains nothing that changes
    between two runs on one machine."""
    device = torch.device(device)
    record = {"device": device.type, "cpu_isa": cpu_isa(), "torch": torch.__version__.split("+")[0]}
    if device.type == "cuda":
        record["gpu"] = torch.cuda.get_device_name(device)
    return record


def run_record(device: torch.device | str, precision: str) -> dict:
    """`machine(device)` with the precision the run computed in."""
    return {"precision": precision, **machine(device)}
