"""The one list of a request's parameters (models/params.py) and the one registry of samplers, and what is
derived from them: the request body, the stored JSON, the command line, the batch key, the sampler facts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import MISSING, replace

import pytest

from models.names import DEFAULT_STYLES, SAMPLERS
from models.params import BATCHED, PARAMETERS, LoraRef, OutpaintParams
from models.sampling.registry import SAMPLER_SPECS, Noise
from server.http.schemas import EXTENSION, SegBeyondRequest
from server.jobs.contract import JobParams
from tests import sampling_reference as R
from tests.helpers import ROOT, smooth_image

# The request body's fields that are not engine parameters.
BODY_ONLY = {"input_image", "base64", "output_format", "output_quality", "webhook_url"}
# What the engine's batched denoise gives each row of its own (models/pipeline.py: per-part prompts,
# noise, seeds, canvas and mask; models/engine.py: each job's own paste-back); everything else a batch
# shares.
PER_ROW = {
    *("prompt", "negative_prompt", "samples", "styles", "seed", "left", "right", "top", "bottom"),
    *("seam_width", "color_match"),
}

# A job's parameters as the first release stored them (its JobParams.to_json), key order included.
FIRST_RELEASE_JSON = (
    '{"prompt": "a quiet beach", "negative_prompt": "", "steps": 30, "samples": 2, "styles": ["V2", "Sharp"],'
    ' "seed": 42, "guidance_scale": 4.0, "scheduler": "karras", "sampler": "dpmpp_2m_sde_gpu", "left": 64,'
    ' "right": 0, "top": 8, "bottom": 0}'
)


def test_every_engine_parameter_is_one_body_field_with_its_default_and_range() -> None:
    body = SegBeyondRequest.model_fields
    assert set(body) == set(PARAMETERS) | BODY_ONLY
    # The hosted API's order: the image, the engine's parameters, then the rest.
    assert list(body)[: len(PARAMETERS) + 1] == ["input_image", *PARAMETERS]
    for name, (_, default, info) in PARAMETERS.items():
        field = body[name]
        limits = {type(m).__name__: m for m in field.metadata}
        bounds = (
            getattr(limits.get(kind), attr, None)
            for kind, attr in (("Ge", "ge"), ("Le", "le"), ("MaxLen", "max_length"))
        )
        assert tuple(bounds) == (info.ge, info.le, info.max_items), name
        if name == "styles":  # the hosted API's form: one comma-separated string
            assert field.default == DEFAULT_STYLES == ",".join(default)
            continue
        assert field.description == (EXTENSION if info.extension else "") + info.description, name
        if default is MISSING:
            assert field.is_required(), name
        elif name == "negative_prompt":  # the hosted API's form: null or absent for none
            assert field.default is None and default == ""
        else:
            assert getattr(field.default, "value", field.default) == default, name


def test_a_validated_body_gives_the_engine_its_parameters() -> None:
    from models.styles import default_registry

    body = SegBeyondRequest.model_validate(
        {"input_image": "x", "prompt": "p", "guidance_scale": 7, "sampler": "euler", "styles": "V2,Sharp", "top": 8}
    )
    params = body.job_params(default_registry(), seed=5)
    assert params == OutpaintParams(
        prompt="p", styles=("V2", "Sharp"), seed=5, guidance_scale=7.0, sampler="euler", top=8
    )
    assert type(params.guidance_scale) is float and type(params.sampler) is str  # plain values, no enum
    defaults = SegBeyondRequest.model_validate({"input_image": "x", "prompt": "p"}).job_params(default_registry(), 1)
    assert defaults == OutpaintParams(prompt="p", seed=1)


def test_the_stored_json_of_the_first_release_reads_and_is_written_the_same() -> None:
    params = JobParams.from_json(json.loads(FIRST_RELEASE_JSON))
    assert params == OutpaintParams(prompt="a quiet beach", samples=2, styles=("V2", "Sharp"), seed=42, left=64, top=8)
    assert json.dumps(params.to_json()) == FIRST_RELEASE_JSON
    # Keys it does not know (a later release's) are dropped; those it lacks take their default.
    assert JobParams.from_json({"prompt": "x", "sharpness": 3}) == OutpaintParams(prompt="x")


def test_a_parameter_beyond_the_hosted_api_is_left_out_of_the_json_at_its_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from models import params as module

    # As if steps were such a parameter: a job that keeps the default stores (and echoes) no key for it.
    monkeypatch.setattr(module, "_EXTENSION_DEFAULTS", {"steps": 30})
    assert "steps" not in OutpaintParams(prompt="x").to_json()
    assert OutpaintParams(prompt="x", steps=40).to_json()["steps"] == 40
    assert OutpaintParams.from_json(OutpaintParams(prompt="x").to_json()) == OutpaintParams(prompt="x")


def another_value(name: str) -> object:
    """A valid value of the parameter other than its default."""
    kind, default, info = PARAMETERS[name]
    if info.choices:
        return next(choice for choice in info.choices if choice != default)
    if kind is bool:
        return not default
    if kind in (int, float):
        return kind(info.le if default != info.le else info.ge)
    if kind is str:
        return f"{default} and more"
    if kind == tuple[LoraRef, ...]:
        return (*default, LoraRef("a-style"))
    return default[:-1] if default else ("Sharp",)


def test_the_batch_key_holds_every_parameter_not_marked_per_job() -> None:
    assert {name for name, (_, _, info) in PARAMETERS.items() if info.per_job} == PER_ROW
    assert set(BATCHED) == set(PARAMETERS) - PER_ROW
    base = OutpaintParams(prompt="p", seed=1)
    for name in PARAMETERS:
        other = replace(base, **{name: another_value(name)})
        assert other != base, name
        assert (other.batch_values() == base.batch_values()) is (name in PER_ROW), name


def test_the_worker_hands_the_engine_the_jobs_parameters_whole() -> None:
    from server.jobs.engine_process import engine_request

    params = OutpaintParams(prompt="p", negative_prompt="n", steps=25, samples=3, styles=("Sharp",), seed=9, left=4)
    image = smooth_image(16, 16)
    request = engine_request(image, params)
    assert request.image is image and request.values() == params.values()
    assert OutpaintParams.from_json(params.to_json()) == params


def test_the_command_line_has_an_option_for_every_parameter_with_its_default() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "server.commands.cli", "outpaint", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "300"},
    )
    assert result.returncode == 0, result.stderr
    # Each option's block of the help: its line, and the next when argparse wraps the help text there.
    blocks = {}
    for line in result.stdout.splitlines():
        if line.startswith("  -"):
            option = line.split()[0]
            blocks[option] = line
        elif line.startswith("   ") and blocks:
            blocks[option] += line
    for name, (_, default, info) in PARAMETERS.items():
        text = " ".join(blocks[f"--{name.replace('_', '-')}"].split())
        assert info.description in text, name
        if default not in (MISSING, ""):
            shown = ",".join(default) if isinstance(default, tuple) else str(default)
            assert f"(default {shown}" in text, (name, text)


def test_every_sampler_has_one_registry_entry_that_agrees_with_the_references() -> None:
    assert SAMPLERS == tuple(SAMPLER_SPECS) == tuple(R.SAMPLERS)
    gaussian = {name for name, spec in SAMPLER_SPECS.items() if spec.noise is Noise.GAUSSIAN}
    brownian = {name for name, spec in SAMPLER_SPECS.items() if spec.noise.value.startswith("brownian")}
    assert (gaussian, brownian) == (R.GAUSSIAN_NOISE, R.BROWNIAN_NOISE)
    on_device = {name for name, spec in SAMPLER_SPECS.items() if spec.noise is Noise.BROWNIAN_ON_DEVICE}
    assert on_device == {name for name in SAMPLERS if name.endswith("_gpu")}
    discarding = {name for name, spec in SAMPLER_SPECS.items() if spec.discard_penultimate_sigma}
    assert discarding == R.DROPS_PENULTIMATE
    # Only an adaptive sampler's items depend on each other (its step sizes come from the whole batch).
    assert {n for n, s in SAMPLER_SPECS.items() if not s.batchable} == {
        n for n, s in SAMPLER_SPECS.items() if s.adaptive
    }
    assert {n for n, s in SAMPLER_SPECS.items() if s.adaptive} == {"dpm_adaptive"}


@pytest.mark.parametrize("sampler", ["dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m_sde_gpu", "euler"])
def test_the_scheduler_built_keeps_its_brownian_tree_where_the_registry_says(sampler: str) -> None:
    from models.architectures import SCHEDULER
    from models.sampling import build_scheduler

    scheduler = build_scheduler(sampler, "karras", SCHEDULER, 4, seeds=[1])
    assert getattr(scheduler, "brownian_on_device", False) is (SAMPLER_SPECS[sampler].noise is Noise.BROWNIAN_ON_DEVICE)
