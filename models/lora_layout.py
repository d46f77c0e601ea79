"""Where a LoRA's weights go: the layers of an SDXL model a LoRA may patch, and the names LoRA files give them.

Torch-free, so that the HTTP process can check a LoRA file against the served model before it queues
a job. The layers and their weight shapes follow from the model's configs alone, the way diffusers'
`UNet2DConditionModel` and transformers' CLIP text models build them (tests/test_loras.py compares
this table with the real modules of random:tiny and SDXL).

A layer's key here is `<part>.<module path>`: `unet.down_blocks.1.attentions.0.proj_in`,
`text_encoder.text_model.encoder.layers.0.self_attn.q_proj`, `text_encoder_2.text_model...`.

LoRA files name the layers in one of two ways:
- kohya / A1111 (as shared on model sites): `lora_unet_<path with _ for .>`, `lora_te1_...` and
  `lora_te2_...` for the two text encoders. SDXL files use the original (SGM) UNet's paths
  (`input_blocks_4_1_transformer_blocks_0_attn1_to_q`); some use diffusers' (`down_blocks_1_...`):
  both are known here.
- diffusers / PEFT: `unet.<module path>`, `text_encoder.<module path>`, `text_encoder_2.<module path>`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

Shape = tuple[int, ...]
PARTS = ("unet", "text_encoder", "text_encoder_2")
# kohya's prefix for each part.
KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
# Module names of the original (SGM) UNet's residual block, by diffusers' name.
_SGM_RESNET = {"conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "conv2": "out_layers.3"}
_SGM_RESNET_SHORTCUT = "skip_connection"


@dataclass(frozen=True)
class Layout:
    """The patchable layers of one model: their weight shapes, and the kohya names that lead to them."""

    shapes: dict[str, Shape]  # layer key -> weight shape (out, in) or (out, in, kh, kw)
    kohya: dict[str, str]  # kohya layer name (no dots) -> layer key

    def layer(self, name: str) -> str | None:
        """The layer a file's layer name means (kohya or diffusers/PEFT form), or None."""
        if name.startswith("lora_"):
            return self.kohya.get(name)
        if name.split(".", 1)[0] not in PARTS:
            name = "unet." + name  # a PEFT file of the UNet alone
        return name if name in self.shapes else None


def layout(unet: Mapping[str, Any], text_encoder: Mapping[str, Any], text_encoder_2: Mapping[str, Any]) -> Layout:
    """The layout of an SDXL model from its configs (diffusers' unet config, transformers' CLIP configs)."""
    shapes: dict[str, Shape] = {}
    kohya: dict[str, str] = {}
    for path, sgm, shape in _unet_layers(unet):
        key = "unet." + path
        shapes[key] = shape
        kohya["lora_unet_" + path.replace(".", "_")] = key
        if sgm is not None:
            kohya["lora_unet_" + sgm.replace(".", "_")] = key
    for part, config in (("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2)):
        for path, shape in _text_layers(config, projection=part == "text_encoder_2"):
            key = f"{part}.{path}"
            shapes[key] = shape
            kohya[KOHYA_PREFIXES[part] + path.replace(".", "_")] = key
    return Layout(shapes, kohya)


def _text_layers(config: Mapping[str, Any], projection: bool) -> Iterator[tuple[str, Shape]]:
    hidden, inner = config["hidden_size"], config["intermediate_size"]
    for i in range(config["num_hidden_layers"]):
        layer = f"text_model.encoder.layers.{i}"
        for name in ("k_proj", "v_proj", "q_proj", "out_proj"):
            yield f"{layer}.self_attn.{name}", (hidden, hidden)
        yield f"{layer}.mlp.fc1", (inner, hidden)
        yield f"{layer}.mlp.fc2", (hidden, inner)
    if projection:
        yield "text_projection", (config["projection_dim"], hidden)


def _per_block(value: Any, blocks: int) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else [value] * blocks


def _unet_layers(cfg: Mapping[str, Any]) -> Iterator[tuple[str, str | None, Shape]]:
    """(diffusers path, original SGM path, weight shape) of every Linear and Conv2d of the UNet."""
    channels = list(cfg["block_out_channels"])
    blocks = len(channels)
    layers = _per_block(cfg.get("layers_per_block", 2), blocks)
    depth = _per_block(cfg.get("transformer_layers_per_block", 1), blocks)
    cross = cfg["cross_attention_dim"]
    cross = _per_block(cross, blocks)
    linear_projection = cfg.get("use_linear_projection", False)
    temb = channels[0] * 4
    c0 = channels[0]

    yield "conv_in", "input_blocks.0.0", (c0, cfg["in_channels"], 3, 3)
    yield "time_embedding.linear_1", "time_embed.0", (temb, c0)
    yield "time_embedding.linear_2", "time_embed.2", (temb, temb)
    if cfg.get("addition_embed_type") == "text_time":
        yield "add_embedding.linear_1", "label_emb.0.0", (temb, cfg["projection_class_embeddings_input_dim"])
        yield "add_embedding.linear_2", "label_emb.0.2", (temb, temb)

    def resnet(path: str, sgm: str, cin: int, cout: int) -> Iterator[tuple[str, str | None, Shape]]:
        yield f"{path}.conv1", f"{sgm}.{_SGM_RESNET['conv1']}", (cout, cin, 3, 3)
        yield f"{path}.time_emb_proj", f"{sgm}.{_SGM_RESNET['time_emb_proj']}", (cout, temb)
        yield f"{path}.conv2", f"{sgm}.{_SGM_RESNET['conv2']}", (cout, cout, 3, 3)
        if cin != cout:
            yield f"{path}.conv_shortcut", f"{sgm}.{_SGM_RESNET_SHORTCUT}", (cout, cin, 1, 1)

    def transformer(path: str, sgm: str, c: int, layers: int, context: int) -> Iterator[tuple[str, str, Shape]]:
        projection = (c, c) if linear_projection else (c, c, 1, 1)
        yield f"{path}.proj_in", f"{sgm}.proj_in", projection
        for t in range(layers):
            block = f"transformer_blocks.{t}"
            for attn, kv in (("attn1", c), ("attn2", context)):
                for name, shape in (("to_q", (c, c)), ("to_k", (c, kv)), ("to_v", (c, kv)), ("to_out.0", (c, c))):
                    yield f"{path}.{block}.{attn}.{name}", f"{sgm}.{block}.{attn}.{name}", shape
            # GEGLU: one projection to twice the inner width (4 x), then back.
            yield f"{path}.{block}.ff.net.0.proj", f"{sgm}.{block}.ff.net.0.proj", (8 * c, c)
            yield f"{path}.{block}.ff.net.2", f"{sgm}.{block}.ff.net.2", (c, 4 * c)
        yield f"{path}.proj_out", f"{sgm}.proj_out", projection

    # Down: the original numbers its input blocks 1, 2, ... across the blocks, a downsampler taking one.
    sgm_index = 1
    cout = c0
    for b, kind in enumerate(cfg["down_block_types"]):
        cin, cout = cout, channels[b]
        for i in range(layers[b]):
            sgm = f"input_blocks.{sgm_index}"
            yield from resnet(f"down_blocks.{b}.resnets.{i}", f"{sgm}.0", cin if i == 0 else cout, cout)
            if kind.startswith("CrossAttn"):
                yield from transformer(f"down_blocks.{b}.attentions.{i}", f"{sgm}.1", cout, depth[b], cross[b])
            sgm_index += 1
        if b < blocks - 1:
            yield f"down_blocks.{b}.downsamplers.0.conv", f"input_blocks.{sgm_index}.0.op", (cout, cout, 3, 3)
            sgm_index += 1

    last = channels[-1]
    yield from resnet("mid_block.resnets.0", "middle_block.0", last, last)
    yield from transformer("mid_block.attentions.0", "middle_block.1", last, depth[-1], cross[-1])
    yield from resnet("mid_block.resnets.1", "middle_block.2", last, last)

    # Up: one more layer per block than down, each taking the matching down layer's output as a skip.
    up_channels, up_layers, up_depth, up_cross = channels[::-1], layers[::-1], depth[::-1], cross[::-1]
    sgm_index = 0
    cout = up_channels[0]
    for b, kind in enumerate(cfg["up_block_types"]):
        previous, cout = cout, up_channels[b]
        skip_in = up_channels[min(b + 1, blocks - 1)]
        attention = kind.startswith("CrossAttn")
        for i in range(up_layers[b] + 1):
            sgm = f"output_blocks.{sgm_index}"
            skip = skip_in if i == up_layers[b] else cout
            cin = (previous if i == 0 else cout) + skip
            yield from resnet(f"up_blocks.{b}.resnets.{i}", f"{sgm}.0", cin, cout)
            if attention:
                yield from transformer(f"up_blocks.{b}.attentions.{i}", f"{sgm}.1", cout, up_depth[b], up_cross[b])
            if i == up_layers[b] and b < blocks - 1:
                position = 2 if attention else 1
                yield f"up_blocks.{b}.upsamplers.0.conv", f"{sgm}.{position}.conv", (cout, cout, 3, 3)
            sgm_index += 1
    yield "conv_out", "out.2", (cfg["out_channels"], c0, 3, 3)
