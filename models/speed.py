"""Speed-ups of the engine's models, applied once when a pipeline is built, each one a knob.

Every knob is exact up to floating-point summation order, and each is off on a CPU unless forced:
there they gain little or nothing and only make the CPU tests slower or harder to compare.

- SDPA attention: diffusers already picks `AttnProcessor2_0` (torch's scaled_dot_product_attention,
  flash/memory-efficient kernels on CUDA) for every attention layer; this only checks it and
  replaces the slow classic processor should a loaded model carry it. Always on.
- channels_last: UNet and VAE conv weights in NHWC, the layout cuDNN's fp16/bf16 tensor-core
  convolutions want; without it each convolution pays a layout transpose. Auto: on for CUDA.
- fuse_qkv: one GEMM for the q/k/v projections of self-attention and one for k/v of
  cross-attention, instead of three or two smaller ones. Auto: on for CUDA.
- tf32: fp32 matrix products and convolutions on TF32 tensor cores (10-bit mantissa products,
  fp32 sums). Auto: on for CUDA when the compute dtype is fp16, whose VAE runs in fp32 (below);
  off for an fp32 engine, which asked for full precision. It is a process-wide torch setting.
- compile: `torch.compile` of the UNet's forward, one graph per working size (batch rows and prompt
  length dynamic). Off unless asked for. With it the engine works at a fixed set of sizes
  (`models.compile_sizes`: 9 for SDXL unless `compile_sizes` names others) and dynamo's recompile
  limit is raised to the set's size; the server's worker compiles them all before it reports
  ready (`OutpaintPipeline.warm_up`), so no request waits on a compile.
- The VAE runs in bf16 when the compute dtype is bf16 (bf16 has fp32's range, so the SDXL VAE does
  not overflow); only fp16 keeps it in fp32. `OutpaintPipeline` does that itself; it is reported here.

As text (`SpeedOptions.parse`, for a caller's settings): channels_last and fuse_qkv take auto | 1 | 0,
compile takes 0 | 1 | a torch.compile mode such as `max-autotune-no-cudagraphs`, compile_sizes
`WxH,WxH,...` or nothing (the default set).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import (
    Attention,
    AttnProcessor,
    AttnProcessor2_0,
    FusedAttnProcessor2_0,
)
from torch import nn

from models.compile_sizes import Size, parse_sizes
from models.components import Components
from models.errors import InvalidSpeedOption

log = logging.getLogger("beyond.speed")

DEFAULT_COMPILE_MODE = "max-autotune-no-cudagraphs"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


@dataclass(frozen=True)
class SpeedOptions:
    """None means auto: on for CUDA, off elsewhere."""

    channels_last: bool | None = None
    fuse_qkv: bool | None = None
    compile: bool = False
    compile_mode: str = DEFAULT_COMPILE_MODE
    compile_sizes: tuple[Size, ...] | None = None  # None: models.compile_sizes.default_sizes
    tf32: bool | None = None

    @classmethod
    def parse(
        cls, channels_last: str = "auto", fuse_qkv: str = "auto", compile: str = "0", compile_sizes: str = ""
    ) -> SpeedOptions:
        """From settings given as text; a knob that is none of auto, 1 or 0 raises `InvalidSpeedOption`."""
        compile_value = compile.strip()
        compile_on = compile_value.lower() not in _FALSE
        mode = compile_value if compile_on and compile_value.lower() not in _TRUE else DEFAULT_COMPILE_MODE
        return cls(
            channels_last=_tristate(channels_last, "channels_last"),
            fuse_qkv=_tristate(fuse_qkv, "fuse_qkv"),
            compile=compile_on,
            compile_mode=mode,
            compile_sizes=parse_sizes(compile_sizes),
        )


def _tristate(text: str, option: str) -> bool | None:
    value = text.strip().lower()
    if value == "auto":
        return None
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise InvalidSpeedOption(option, text)


@dataclass(frozen=True)
class AppliedSpeedups:
    """What `apply_speedups` actually did, for logs and benchmark tables."""

    sdpa: bool
    channels_last: bool
    fuse_qkv: bool
    compile: str | None
    vae_dtype: str
    tf32: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


def apply_speedups(
    components: Components,
    device: torch.device,
    dtype: torch.dtype,
    options: SpeedOptions | None = None,
    vae_dtype: torch.dtype | None = None,
    compile_sizes: tuple[Size, ...] = (),
) -> AppliedSpeedups:
    """Apply the knobs of `options` (all on auto when None) to models already on `device`.

    `compile_sizes`: the working sizes the compiled UNet will see (its recompile limit is raised to
    their number)."""
    options = SpeedOptions() if options is None else options
    cuda = device.type == "cuda"
    unet, vae = components.unet, components.vae
    vae_dtype = vae_dtype or next(vae.parameters()).dtype

    sdpa = _ensure_sdpa(unet) & _ensure_sdpa(vae)  # not `and`: the VAE must be checked even if the UNet fails
    channels_last = cuda if options.channels_last is None else options.channels_last
    if channels_last:
        unet.to(memory_format=torch.channels_last)
        vae.to(memory_format=torch.channels_last)
    fuse_qkv = cuda if options.fuse_qkv is None else options.fuse_qkv
    if fuse_qkv:
        _fuse_qkv(unet)
        _fuse_qkv(vae)
    compiled = None
    if options.compile:
        if cuda:
            # The inductor settings of diffusers' "accelerate inference of text-to-image diffusion
            # models" tutorial for SDXL: 1x1 convolutions as GEMMs, and tuned pointwise kernels. The
            # tuning (coordinate descent: many more kernel timings) only with a max-autotune mode:
            # mode `default` stays the quick compile it is meant to be.
            import torch._inductor.config as inductor

            inductor.conv_1x1_as_mm = True
            inductor.epilogue_fusion = False
            if "max-autotune" in options.compile_mode:
                inductor.coordinate_descent_tuning = True
                inductor.coordinate_descent_check_all_directions = True
        raise_recompile_limit(len(compile_sizes))
        # In place, so `unet.config` and the Components dataclass stay as they are. Static shapes: one
        # graph per working size, tuned for it; the pipeline marks batch rows and prompt length dynamic.
        unet.compile(mode=options.compile_mode, dynamic=False)
        compiled = options.compile_mode
    # The fp32 work of a half-precision engine is its VAE; an fp32 engine asked for full precision.
    auto_tf32 = cuda and vae_dtype == torch.float32 and dtype != torch.float32
    tf32 = auto_tf32 if options.tf32 is None else options.tf32
    if tf32:
        allow_tf32()
    applied = AppliedSpeedups(
        sdpa=sdpa,
        channels_last=channels_last,
        fuse_qkv=fuse_qkv,
        compile=compiled,
        vae_dtype=str(vae_dtype).removeprefix("torch."),
        tf32=tf32,
    )
    log.info("speed-ups on %s/%s: %s", device, str(dtype).removeprefix("torch."), applied.as_dict())
    return applied


def raise_recompile_limit(shapes: int) -> int:
    """Dynamo keeps at most `recompile_limit` graphs per function and runs any further shape eagerly,
    with only a log line; raised (never lowered) to `shapes`, so every compiled size keeps its graph."""
    import torch._dynamo

    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    limit = max(getattr(config, name), shapes)
    setattr(config, name, limit)
    return limit


def allow_tf32(on: bool = True) -> None:
    """TF32 (or full fp32 with on=False) for fp32 matrix products and convolutions on CUDA, process-wide."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        # torch 2.9+: mixing this with the older allow_tf32 flags is an error, so only this one is used.
        matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = "tf32" if on else "ieee"
    else:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = on


def _ensure_sdpa(model: nn.Module) -> bool:
    """True when every attention layer of `model` goes through scaled_dot_product_attention."""
    if not hasattr(F, "scaled_dot_product_attention"):
        return False
    sdpa = (AttnProcessor2_0, FusedAttnProcessor2_0)
    for module in model.modules():
        if isinstance(module, Attention) and type(module.processor) is AttnProcessor:
            # The quadratic-memory baseline; only an explicit set_attn_processor call puts it there.
            module.set_processor(AttnProcessor2_0())
    return all(isinstance(m.processor, sdpa) for m in model.modules() if isinstance(m, Attention))


def _fuse_qkv(model: nn.Module) -> None:
    if not any(isinstance(m, Attention) for m in model.modules()):
        return
    model.fuse_qkv_projections()
    # diffusers keeps the separate projections next to the fused one (about 1.3 GB in fp16 for
    # the SDXL UNet). Making them views into the fused weights frees that memory, while
    # unfuse_qkv_projections() and the state dict's keys keep working.
    for module in model.modules():
        if not isinstance(module, Attention):
            continue
        fused = getattr(module, "to_qkv", None)
        parts = [module.to_q, module.to_k, module.to_v]
        if fused is None:
            fused, parts = getattr(module, "to_kv", None), [module.to_k, module.to_v]
        if fused is not None:
            _share(fused, parts)


def _share(fused: nn.Linear, parts: list[nn.Linear]) -> None:
    start = 0
    for part in parts:
        rows = part.out_features
        part.weight = nn.Parameter(fused.weight.detach()[start : start + rows], requires_grad=False)
        if part.bias is not None and fused.bias is not None:
            part.bias = nn.Parameter(fused.bias.detach()[start : start + rows], requires_grad=False)
        start += rows
