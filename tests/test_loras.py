"""LoRAs per request (docs/extensions.md): files of BEYOND_LORA_DIR in kohya and diffusers/PEFT form, checked
against the served model before a job is queued, merged into the model per set, cached within a budget."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from models import architectures as arch
from models.engine import OutpaintEngine, OutpaintRequest
from models.errors import InvalidLoraName, LoraFileError, NoLoraFolder, UnknownLora
from models.lora_files import LoraLibrary
from models.lora_layout import layout
from models.lora_weights import LoraCache, LoraPatches, LoraWeights
from models.params import LoraRef
from models.pipeline import OutpaintPipeline
from models.random_models import build_random
from models.speed import SpeedOptions
from tests.helpers import ROOT, ServerProcess, b64, encode, noise_image, request_body
from tests.lora_helpers import SDXL_LAYOUT, TINY_LAYOUT, write_kohya, write_peft

STEPS = 4


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA folder: two good files (one per format) and the kinds of bad ones operators meet."""
    path = tmp_path_factory.mktemp("loras")
    write_kohya(path / "style.safetensors", conv=True)
    write_peft(path / "product.safetensors")
    write_kohya(path / "unet-only.safetensors", seed=3, text=False)
    # SD 1.x names (one text encoder, attention in the first down block): no layer of an SDXL model.
    tensors = {
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 32),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(37, 4),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4),
    }
    save_file(tensors, str(path / "sd15.safetensors"))
    # SDXL's own sizes: the layer exists in random:tiny, with other shapes.
    name = "lora_unet_down_blocks_1_attentions_0_proj_in"
    save_file(
        {f"{name}.lora_down.weight": torch.zeros(4, 640), f"{name}.lora_up.weight": torch.zeros(640, 4)},
        str(path / "full-size.safetensors"),
    )
    save_file({f"{name}.hada_w1_a": torch.zeros(4, 64)}, str(path / "loha.safetensors"))
    (path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    (path / "readme.txt").write_text("not a LoRA")
    return path


@pytest.fixture(scope="module")
def engine(folder: Path) -> OutpaintEngine:
    engine = OutpaintEngine(
        OutpaintPipeline(build_random("random:tiny"), torch.device("cpu"), torch.float32), "random:tiny"
    )
    engine.enable_loras(folder)
    return engine


def request(**fields: object) -> OutpaintRequest:
    base: dict = dict(
        image=noise_image(80, 48, seed=2), prompt="a harbour at dusk", seed=9, steps=STEPS, sampler="euler", left=40
    )
    return OutpaintRequest(**{**base, **fields})


def image(engine: OutpaintEngine, *loras: LoraRef, **fields: object) -> np.ndarray:
    return np.asarray(engine.run(request(loras=loras, **fields)).images[0])


# -- where the weights go ----------------------------------------------------------------------------


def real_layers(spec: dict) -> dict[str, tuple[int, ...]]:
    """The Linear and Conv2d layers of the model diffusers and transformers build from these configs."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    # On the meta device: SDXL's modules and shapes without allocating its 3.5 G parameters.
    with torch.device("meta"):
        parts = {
            "unet": UNet2DConditionModel(**spec["unet"]),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**{"vocab_size": 49408, **spec["text_encoder"]})),
            "text_encoder_2": CLIPTextModelWithProjection(
                CLIPTextConfig(**{"vocab_size": 49408, **spec["text_encoder_2"]})
            ),
        }
    found = {}
    for part, model in parts.items():
        for path, module in model.named_modules():
            if isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
                # Some transformers releases keep CLIPTextModel's layers at encoder.*, others at text_model.encoder.*.
                path = "text_model." + path if part != "unet" and path.startswith("encoder.") else path
                found[f"{part}.{path}"] = tuple(module.weight.shape)
    return found


TINY = {"unet": arch.TINY_UNET, "text_encoder": arch.TINY_TEXT_ENCODER, "text_encoder_2": arch.TINY_TEXT_ENCODER_2}
SDXL = {"unet": arch.SDXL_UNET, "text_encoder": arch.SDXL_TEXT_ENCODER, "text_encoder_2": arch.SDXL_TEXT_ENCODER_2}


@pytest.mark.parametrize("spec", [TINY, SDXL], ids=["tiny", "sdxl"])
def test_the_layout_read_from_configs_is_the_models_own_layers(spec: dict) -> None:
    assert layout(**spec).shapes == real_layers(spec)


# The original (SGM) UNet's module names, which kohya's SDXL LoRAs use.
ORIGINAL_UNET_NAMES = ("input_blocks", "middle_block", "output_blocks", "time_embed_", "label_emb", "lora_unet_out_")


@pytest.mark.parametrize("spec", [TINY, SDXL], ids=["tiny", "sdxl"])
def test_kohya_names_of_the_original_unet_lead_where_diffusers_converter_takes_them(spec: dict) -> None:
    from diffusers import StableDiffusionXLPipeline
    from diffusers.configuration_utils import FrozenDict

    model = layout(**spec)
    original = {
        name: key
        for name, key in model.kohya.items()
        if name.startswith("lora_unet_") and any(p in name for p in ORIGINAL_UNET_NAMES)
    }
    state = {}
    for name in original:
        state[f"{name}.lora_down.weight"] = torch.zeros(1, 1)
        state[f"{name}.lora_up.weight"] = torch.zeros(1, 1)
    converted, _ = StableDiffusionXLPipeline.lora_state_dict(state, unet_config=FrozenDict(spec["unet"]))
    # diffusers' older LoRA names: attention layers as <attn>.processor.to_q_lora, others as <layer>.lora.
    theirs = set()
    for key in converted:
        attention = re.fullmatch(r"(.*)\.processor\.to_(q|k|v|out)_lora\.down\.weight", key)
        if attention:
            theirs.add(f"{attention[1]}.to_{attention[2]}" + (".0" if attention[2] == "out" else ""))
        elif key.endswith(".lora.down.weight"):
            theirs.add(key.removesuffix(".lora.down.weight"))
    assert theirs == set(original.values())
    assert len(theirs) > 80


# -- the folder and its files ------------------------------------------------------------------------


def test_the_folder_lists_each_file_with_its_size_format_or_why_it_cannot_be_used(folder: Path) -> None:
    library = LoraLibrary(folder, TINY_LAYOUT)
    listed = {item["name"]: item for item in library.describe()}
    assert list(listed) == sorted(listed) and "readme" not in listed
    assert listed["style"]["format"] == "kohya" and listed["product"]["format"] == "diffusers"
    assert listed["style"]["parts"] == ["unet", "text_encoder", "text_encoder_2"]
    assert listed["unet-only"]["parts"] == ["unet"]
    assert listed["style"]["size"] == (folder / "style.safetensors").stat().st_size
    assert "another model" in listed["sd15"]["error"] and "lora_te_text_model" in listed["sd15"]["error"]
    assert "64x64 weight here" in listed["full-size"]["error"]
    assert "not a plain LoRA" in listed["loha"]["error"]
    assert "not a readable .safetensors file" in listed["broken"]["error"]
    assert all(listed[name]["format"] is None for name in ("sd15", "full-size", "loha", "broken"))
    # The same full-size file fits an SDXL model.
    LoraLibrary(folder, SDXL_LAYOUT).read("full-size")


def test_the_header_is_read_without_torch(folder: Path) -> None:
    code = (
        "import sys; from models.lora_files import LoraLibrary; from models.lora_layout import layout;"
        "from models import architectures as a;"
        "l = LoraLibrary(__import__('pathlib').Path(sys.argv[1]),"
        " layout(a.TINY_UNET, a.TINY_TEXT_ENCODER, a.TINY_TEXT_ENCODER_2));"
        "print(len(l.describe()), 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(folder)], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.split() == ["7", "False"], out.stderr


@pytest.mark.parametrize("name", ["../style", "sub/style", "..", ".", ".hidden", "", "a\\b", "x\x00y", " style"])
def test_a_name_that_is_a_path_is_refused(folder: Path, name: str) -> None:
    with pytest.raises(InvalidLoraName):
        LoraLibrary(folder, TINY_LAYOUT).read(name)


def test_unknown_names_and_a_server_without_a_folder(folder: Path) -> None:
    with pytest.raises(UnknownLora):
        LoraLibrary(folder, TINY_LAYOUT).read("nope")
    with pytest.raises(UnknownLora):
        LoraLibrary(folder, TINY_LAYOUT).read("readme")  # a file, but no .safetensors one
    with pytest.raises(NoLoraFolder):
        LoraLibrary(None, None).read("style")
    with pytest.raises(LoraFileError, match="named twice"):
        LoraLibrary(folder, TINY_LAYOUT).check([LoraRef("style"), LoraRef("style", 0.5)])


def test_a_jobs_loras_are_stored_as_a_list_of_objects_and_read_back() -> None:
    from models.params import OutpaintParams

    params = OutpaintParams(prompt="p", seed=1, loras=(LoraRef("style", 0.8), LoraRef("product")), seam_width=4)
    stored = json.loads(json.dumps(params.to_json()))
    assert stored["loras"] == [{"name": "style", "scale": 0.8}, {"name": "product", "scale": 1.0}]
    assert OutpaintParams.from_json(stored) == params
    assert "loras" not in OutpaintParams(prompt="p", loras=()).to_json()


# -- the engine --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["style", "product"])
def test_the_output_changes_with_the_scale_and_scale_zero_is_no_lora(engine: OutpaintEngine, name: str) -> None:
    plain = image(engine)
    half = image(engine, LoraRef(name, 0.5))
    full = image(engine, LoraRef(name, 1.0))
    inverted = image(engine, LoraRef(name, -1.0))
    assert len({plain.tobytes(), half.tobytes(), full.tobytes(), inverted.tobytes()}) == 4
    # Farther from the plain image the stronger the LoRA (in the new area).
    new = np.s_[:, :40]
    distance = [np.abs(x[new].astype(int) - plain[new]).mean() for x in (half, full)]
    assert 0 < distance[0] < distance[1]
    assert np.array_equal(image(engine, LoraRef(name, 0.0)), plain)
    # Back to no LoRA: the original weights, bit for bit.
    assert np.array_equal(image(engine), plain)
    assert engine.loras is not None and engine.loras.unet.patched == engine.loras.text.patched == 0


def test_two_sets_in_one_queue_give_each_job_the_image_it_gets_alone(engine: OutpaintEngine, folder: Path) -> None:
    sets = [
        (LoraRef("style", 0.8),),
        (LoraRef("product", 1.0), LoraRef("style", -0.5)),
        (),
        (LoraRef("unet-only", 1.5),),
    ]
    # As the worker does: each job prepared (prompts encoded under its set) while others wait, then
    # denoised in turn, each under its own set.
    jobs = [engine.prepare(request(loras=loras, seed=20 + i)) for i, loras in enumerate(sets)]
    assert len({job.batch_key for job in jobs}) == len(sets)  # different sets never share a batch
    queued = []
    for job in jobs:
        (latents,) = engine.denoise([job])
        queued.append(np.asarray(engine.finish(job, latents).images[0]))
    for i, loras in enumerate(sets):
        alone = OutpaintEngine(
            OutpaintPipeline(build_random("random:tiny"), torch.device("cpu"), torch.float32), "random:tiny"
        )
        alone.enable_loras(folder)  # nothing ran before on this model
        assert np.array_equal(queued[i], image(alone, *loras, seed=20 + i)), i
    # The prompt's set is the job's own: the same set in order (the product first) gives the same image.
    assert np.array_equal(queued[1], image(engine, LoraRef("style", -0.5), LoraRef("product", 1.0), seed=21))


def test_the_cache_evicts_the_least_recently_used_within_its_budget(folder: Path) -> None:
    library = LoraLibrary(folder, TINY_LAYOUT)
    size = {
        name: LoraWeights.load(library.read(name), torch.device("cpu"), torch.float32).nbytes
        for name in ("style", "product", "unet-only")
    }
    # The style LoRA has convolutions too; unet-only has no text encoder layers.
    assert size["unet-only"] < size["product"] < size["style"]
    cache = LoraCache(library, torch.device("cpu"), torch.float32, budget=size["style"] + size["product"])
    cache.get("style")
    cache.get("product")
    cache.get("style")  # used again: product is now the least recently used
    assert cache.names() == ["product", "style"] and cache.loads == 2
    cache.get("unet-only")
    assert cache.names() == ["style", "unet-only"] and cache.nbytes <= cache.budget
    cache.get("product")  # gone, so read again
    assert cache.loads == 4 and cache.names() == ["unet-only", "product"] and cache.nbytes <= cache.budget
    small = LoraCache(library, torch.device("cpu"), torch.float32, budget=size["style"] // 2)
    assert small.get("style").layers and small.names() == [] and small.nbytes == 0  # used, never kept


def test_a_changed_file_is_read_again(tmp_path: Path) -> None:
    write_kohya(tmp_path / "mine.safetensors", seed=1)
    cache = LoraCache(LoraLibrary(tmp_path, TINY_LAYOUT), torch.device("cpu"), torch.float32, budget=1 << 30)
    first = cache.get("mine")
    write_kohya(tmp_path / "mine.safetensors", seed=2, rank=8)
    os.utime(tmp_path / "mine.safetensors", ns=(time.time_ns(), time.time_ns() + 10**9))
    second = cache.get("mine")
    assert second is not first and next(iter(second.layers.values()))[0].shape[0] == 8


def test_enabling_loras_again_starts_from_the_original_model(engine: OutpaintEngine, folder: Path) -> None:
    plain = image(engine)
    image(engine, LoraRef("style"))  # the model is left patched with it
    engine.enable_loras(folder)  # new patches must not take the patched weights for the originals
    assert np.array_equal(image(engine), plain)


def test_a_file_replaced_while_its_set_is_active_is_applied_anew(tmp_path: Path) -> None:
    engine = OutpaintEngine(
        OutpaintPipeline(build_random("random:tiny"), torch.device("cpu"), torch.float32), "random:tiny"
    )
    engine.enable_loras(tmp_path)
    write_kohya(tmp_path / "mine.safetensors", seed=1)
    first = image(engine, LoraRef("mine"))
    write_kohya(tmp_path / "mine.safetensors", seed=2)
    os.utime(tmp_path / "mine.safetensors", ns=(time.time_ns(), time.time_ns() + 10**9))
    second = image(engine, LoraRef("mine"))
    assert not np.array_equal(first, second)
    assert engine.loras is not None and engine.loras.cache.names() == ["mine"]  # the old version is gone


def test_fused_qkv_projections_take_the_patch(engine: OutpaintEngine, folder: Path) -> None:
    # On CUDA q/k/v run as one fused layer whose parts are views of it: a patch must reach it.
    fused = OutpaintEngine(
        OutpaintPipeline(build_random("random:tiny"), torch.device("cpu"), torch.float32, SpeedOptions(fuse_qkv=True)),
        "random:tiny",
    )
    fused.enable_loras(folder)
    assert fused.pipeline.speedups.fuse_qkv
    with_lora = image(fused, LoraRef("style"))
    assert np.abs(with_lora.astype(int) - image(engine, LoraRef("style"))).max() <= 2
    assert np.abs(with_lora.astype(int) - image(fused)).mean() > 2


def test_switching_sets_changes_weights_in_place_so_a_compiled_model_is_not_recompiled(folder: Path) -> None:
    from torch._dynamo.testing import CompileCounter

    # A stand-in with the UNet's layer kinds (the UNet itself takes half a minute to trace here).
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 32, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(32 * 16, 8))
    key = {"unet.0": model[0], "unet.2": model[2]}
    generator = torch.Generator().manual_seed(0)

    def lora(scale: float) -> LoraWeights:
        layers = {
            "unet.0": (
                torch.randn(2, 4, 3, 3, generator=generator),
                torch.randn(32, 2, 1, 1, generator=generator),
                1.0,
            ),
            "unet.2": (torch.randn(2, 512, generator=generator), torch.randn(8, 2, generator=generator), scale),
        }
        return LoraWeights(file=None, layers=layers, nbytes=0)  # type: ignore[arg-type]

    patches = LoraPatches(key)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    x = torch.randn(1, 4, 4, 4, generator=generator)
    a, b = lora(1.0), lora(0.5)
    with torch.no_grad():
        plain = compiled(x)
        patches.apply((("a", 1.0, ("a", 0, 0)),), [a])
        first = compiled(x)
        patches.apply((("b", 2.0, ("b", 0, 0)),), [b])
        second = compiled(x)
        patches.apply((), [])
        back = compiled(x)
        eager = model(x)
    assert counter.frame_count == 1  # one graph for every set
    assert not torch.equal(plain, first) and not torch.equal(first, second)
    assert torch.equal(back, plain) and torch.equal(eager, plain)


# -- the API and the command line --------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_server(tmp_path_factory: pytest.TempPathFactory, folder: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path_factory.mktemp("lora-server"), env={"BEYOND_LORA_DIR": str(folder)}).start()
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


def test_get_v1_loras_lists_the_folder(lora_server: ServerProcess) -> None:
    response = httpx.get(f"{lora_server.url}/v1/loras", timeout=30)
    assert response.status_code == 200
    listed = {item["name"]: item for item in response.json()["loras"]}
    assert listed["style"]["format"] == "kohya" and listed["product"]["format"] == "diffusers"
    assert listed["style"]["error"] is None and listed["broken"]["format"] is None
    schema = httpx.get(f"{lora_server.url}/openapi.json", timeout=30).json()
    assert "/v1/loras" in schema["paths"]
    loras = schema["components"]["schemas"]["SegBeyondRequest"]["properties"]["loras"]
    assert loras["type"] == "array" and loras["maxItems"] == 4 and loras["default"] == []
    item = schema["components"]["schemas"][loras["items"]["$ref"].split("/")[-1]]
    assert item["required"] == ["name"] and (
        item["properties"]["scale"]["minimum"],
        item["properties"]["scale"]["maximum"],
    ) == (-2, 2)


@pytest.mark.parametrize(
    ("loras", "error"),
    [
        ([{"name": "nope"}], "loras: unknown LoRA 'nope'; GET /v1/loras lists the LoRAs of this server"),
        ([{"name": "../style"}], "loras: '../style' is not a LoRA name"),
        ([{"name": "\ud800"}], "loras: '\\ud800' is not a LoRA name"),  # escaped, as repr() writes it
        ([{"name": "sd15"}], "loras: LoRA 'sd15' cannot be used: made for another model"),
        ([{"name": "full-size"}], "loras: LoRA 'full-size' cannot be used: made for another model: layer"),
        ([{"name": "broken"}], "loras: LoRA 'broken' cannot be used: not a readable .safetensors file"),
        ([{"name": "style"}, {"name": "style", "scale": 0.5}], "loras: LoRA 'style' cannot be used: it is named twice"),
        ([{"name": "style", "scale": 2.5}], "loras.0.scale: Input should be less than or equal to 2"),
        ([{"name": "style", "weight": 1}], "loras.0.weight: Extra inputs are not permitted"),
        ([{"scale": 1}], "loras.0.name: Field required"),
        ([{"name": "style"}] * 5, "loras: List should have at most 4 items after validation, not 5"),
        ("style", "loras: Input should be a valid list"),
    ],
)
def test_a_lora_that_cannot_be_used_is_a_400_naming_it(lora_server: ServerProcess, loras: object, error: str) -> None:
    # As JSON escapes (a lone surrogate, which JSON can carry, has no UTF-8 form).
    body = json.dumps(request_body(loras=loras))
    response = httpx.post(
        f"{lora_server.url}/v2/seg-beyond", content=body, headers={"content-type": "application/json"}, timeout=30
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"].startswith(error), response.json()


def test_a_server_without_a_lora_folder_refuses_loras(server: ServerProcess) -> None:
    response = httpx.post(f"{server.url}/v2/seg-beyond", json=request_body(loras=[{"name": "style"}]), timeout=30)
    assert response.status_code == 400
    assert response.json()["error"] == "loras: this server has no LoRA folder (BEYOND_LORA_DIR), so it takes no LoRAs"
    assert httpx.get(f"{server.url}/v1/loras", timeout=30).json() == {"loras": []}


def run_v2(server: ServerProcess, bodies: list[dict]) -> list[tuple[bytes, dict]]:
    """Submit every body, then wait for all: their PNG output and their echoed parameters."""
    ids = [httpx.post(f"{server.url}/v2/seg-beyond", json=b, timeout=30).json()["request_id"] for b in bodies]
    out = []
    for request_id in ids:
        deadline = time.monotonic() + 180
        while (body := httpx.get(f"{server.url}/v2/requests/{request_id}", timeout=30).json())["status"] in (
            "QUEUED",
            "PROCESSING",
        ):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert body["status"] == "COMPLETED", body
        out.append((httpx.get(body["outputs"][0], timeout=30).content, body["parameters"]))
    return out


def test_jobs_with_different_sets_in_one_queue_each_get_their_image_alone(lora_server: ServerProcess) -> None:
    picture = b64(encode(noise_image(80, 48, seed=5)))
    sets = [[{"name": "style", "scale": 0.8}], [{"name": "product"}, {"name": "unet-only", "scale": -1}], None]
    bodies = []
    for i, loras in enumerate(sets):
        body = request_body(seed=40 + i, output_format="png", sampler="euler", styles="")
        body["input_image"] = picture
        if loras is not None:
            body["loras"] = loras
        bodies.append(body)
    queued = run_v2(lora_server, bodies)
    alone = [run_v2(lora_server, [body])[0] for body in bodies]
    assert [image for image, _ in queued] == [image for image, _ in alone]
    assert len({image for image, _ in queued}) == 3
    # Echoed as sent; a request without LoRAs has no `loras` key (nor seam_width, color_match) at all.
    assert queued[0][1]["loras"] == [{"name": "style", "scale": 0.8}]
    assert queued[1][1]["loras"] == [{"name": "product", "scale": 1.0}, {"name": "unet-only", "scale": -1.0}]
    assert not {"loras", "seam_width", "color_match"} & set(queued[2][1])


def test_outpaint_on_the_command_line_with_a_lora(engine: OutpaintEngine, folder: Path, tmp_path: Path) -> None:
    source = tmp_path / "in.png"
    source.write_bytes(encode(noise_image(80, 48, seed=2)))
    out = tmp_path / "out.png"
    env = {**os.environ, "BEYOND_CPU_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    args = [
        sys.executable,
        "-m",
        "server.commands.cli",
        "outpaint",
        str(source),
        "--model",
        "random:tiny",
        "--device",
        "cpu",
    ]
    args += ["--prompt", "a harbour at dusk", "--styles", "", "--seed", "9", "--steps", "20", "--sampler", "euler"]
    args += ["--left", "40", "--lora-dir", str(folder), "-o", str(out)]
    done = subprocess.run([*args, "--lora", "style:0.7", "--lora", "product"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    with Image.open(out) as written:
        result = np.asarray(written.convert("RGB"))
    # What the engine gives the same request in this process.
    loras = (LoraRef("style", 0.7), LoraRef("product", 1.0))
    expected = image(engine, *loras, steps=20, styles=(), image=Image.open(io.BytesIO(source.read_bytes())))
    assert np.array_equal(result, expected)
    refused = subprocess.run([*args, "--lora", "nope:1"], env=env, capture_output=True, text=True)
    assert refused.returncode == 2
    assert refused.stderr.strip() == (
        "beyond outpaint: --lora: unknown LoRA 'nope'; GET /v1/loras lists the LoRAs of this server"
    )


def test_the_command_lines_lora_option_reads_name_and_scale() -> None:
    from server.commands.outpaint import UsageError, _lora

    assert _lora("loras", "style") == {"name": "style"}
    assert _lora("loras", "style:0.7") == {"name": "style", "scale": 0.7}
    assert _lora("loras", "my:style:-1") == {"name": "my:style", "scale": -1.0}
    with pytest.raises(UsageError, match="--lora: expected NAME or NAME:SCALE, got 'style:strong'"):
        _lora("loras", "style:strong")


@pytest.fixture()
def page(tmp_path: Path) -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    from tests.test_playground import CHROMIUM, CHROMIUM_ARGS

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser.new_context(viewport={"width": 1280, "height": 1000}).new_page()
        finally:
            browser.close()


def test_the_playground_offers_the_loras_and_the_seam_controls(
    lora_server: ServerProcess, page, tmp_path: Path
) -> None:
    picture = tmp_path / "picture.png"
    picture.write_bytes(encode(noise_image(64, 48)))
    page.goto(f"{lora_server.url}/")
    page.wait_for_function("document.getElementById('loras-hint').textContent !== ''")
    assert page.text_content("#loras-hint") == "3 on this server"  # the usable ones
    assert page.input_value("#seam-width") == "16" and not page.is_checked("#color-match")
    page.set_input_files("#file", str(picture))
    page.wait_for_function("document.getElementById('canvas').dataset.frame")
    page.fill("#prompt", "a quiet beach")

    def submitted() -> dict:
        with page.expect_request(lambda r: r.method == "POST" and r.url.endswith("/v2/seg-beyond")) as sent:
            page.click("#submit")
        body = sent.value.post_data_json
        page.wait_for_selector("#submit:not([disabled])", timeout=60_000)  # done before the next one
        return body

    # Untouched, the form sends none of the extensions: the hosted API's body.
    assert not {"loras", "seam_width", "color_match"} & set(submitted())
    for _ in range(4):
        page.click("#add-lora")
    assert page.is_disabled("#add-lora")  # at most 4
    options = page.eval_on_selector("#loras select", "s => Array.from(s.options, o => o.value)")
    assert options == ["product", "style", "unet-only"]
    for _ in range(2):
        page.click("#loras .lora button")
    page.select_option("#loras .lora:nth-child(2) select", "unet-only")
    page.fill("#loras .lora:nth-child(2) input", "-0.5")
    page.fill("#seam-width", "32")
    page.check("#color-match")
    body = submitted()
    assert body["loras"] == [{"name": "product", "scale": 1}, {"name": "unet-only", "scale": -0.5}]
    assert body["seam_width"] == 32 and body["color_match"] is True
    assert page.locator("#error").is_hidden()
