"""`beyond outpaint`: one image through the engine in this process, no server, no HTTP.

The values are checked by the API's own request model (server.http.schemas.SegBeyondRequest), so the
defaults and ranges are the contract's. Torch is imported only once the command runs: `import
server.commands.cli` stays light for the API process.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import MISSING
from pathlib import Path
from typing import Any, NoReturn

from models.names import DEFAULT_MODEL
from models.params import PARAMETERS, LoraRef, parameters_of

PROG = "beyond outpaint"
# Output format by extension; the options are those the server uses for its JPEGs.
FORMATS: dict[str, tuple[str, dict[str, Any]]] = {
    ".jpg": ("JPEG", {"quality": 95}),
    ".jpeg": ("JPEG", {"quality": 95}),
    ".png": ("PNG", {}),
    ".webp": ("WEBP", {"quality": 95}),
}
# The metavar of an engine parameter's option, by its type (a parameter with choices: NAME).
METAVARS: dict[Any, str] = {
    int: "N",
    float: "X",
    str: "TEXT",
    bool: "BOOL",
    tuple[str, ...]: "LIST",
    tuple[LoraRef, ...]: "NAME:SCALE",
}
# Options with a spelling of their own besides the parameter's: `--lora NAME:SCALE`, once per LoRA.
ALIASES = {"loras": "--lora"}
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


class UsageError(Exception):
    """Bad input from the command line: one line for the user, exit status 2."""


def _parameter_help(name: str) -> str:
    """A parameter's help: what it is, its default and range, all from the engine's list."""
    kind, default, info = PARAMETERS[name]
    if kind == tuple[LoraRef, ...]:
        _, one, scale = parameters_of(LoraRef)["scale"]
        return (
            f"{info.description} (default none; once per LoRA: NAME, or NAME:SCALE with SCALE"
            f" {scale.ge:g}..{scale.le:g}, {one:g} if left out)"
        )
    if default is MISSING or default == "":
        return info.description
    shown = ",".join(default) if isinstance(default, tuple) else default
    limits = f", {info.ge}..{info.le}" if info.ge is not None and info.le is not None else ""
    return f"{info.description} (default {shown}{limits})"


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "outpaint",
        help="outpaint one image here, without a server",
        description="Pad INPUT by --left/--right/--top/--bottom pixels and fill the new area with the engine.",
    )
    # argparse's own errors (a missing option, say) as one line too, like every other bad input.
    parser.error = _usage_exit  # type: ignore[method-assign]
    parser.add_argument("input", metavar="INPUT", help="the image to extend (PNG, JPEG or WebP)")
    # One option per engine parameter (models/params.py), in the list's order.
    for name, (kind, default, info) in PARAMETERS.items():
        spellings = [f"--{name.replace('_', '-')}", *([ALIASES[name]] if name in ALIASES else [])]
        how: dict[str, Any] = {}
        if kind is bool:  # `--color-match` alone is true
            how = {"nargs": "?", "const": "true"}
        elif kind == tuple[LoraRef, ...]:
            how = {"action": "append"}
        parser.add_argument(
            *spellings,
            dest=name,
            required=default is MISSING,
            metavar="NAME" if info.choices else METAVARS[kind],
            help=_parameter_help(name),
            **how,
        )
    parser.add_argument(
        "--model", metavar="SPEC", help=f"model spec, as for serve (BEYOND_MODEL, default {DEFAULT_MODEL})"
    )
    parser.add_argument("--device", help="auto, cpu, cuda, cuda:N or mps (BEYOND_DEVICE, default auto)")
    parser.add_argument("--lora-dir", metavar="DIR", help="the folder of LoRA files --lora names (BEYOND_LORA_DIR)")
    parser.add_argument(
        "-o",
        "--output",
        metavar="OUT",
        help="where to write; .png, .jpg/.jpeg or .webp sets the format; several samples add -1, -2, ..."
        " (default: <INPUT stem>-outpainted.png beside INPUT)",
    )


def _usage_exit(message: str) -> NoReturn:
    print(f"{PROG}: {message}", file=sys.stderr)
    sys.exit(2)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def request_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The command line as request fields; only the options given, so the model's defaults apply."""
    fields: dict[str, Any] = {}
    for name, (kind, _, _) in PARAMETERS.items():
        text = getattr(args, name)
        if text is None:
            continue
        if kind is bool:
            fields[name] = _flag(name, text)
            continue
        if kind == tuple[LoraRef, ...]:
            fields[name] = [_lora(name, item) for item in text]
            continue
        if kind not in (int, float):
            fields[name] = text  # text, or a comma-separated list as in the request body
            continue
        try:
            fields[name] = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise UsageError(f"--{name.replace('_', '-')}: expected {what}, got {text!r}") from None
    return fields


def _flag(name: str, text: str) -> bool:
    if text.strip().lower() in _TRUE:
        return True
    if text.strip().lower() in _FALSE:
        return False
    raise UsageError(f"--{name.replace('_', '-')}: expected true or false, got {text!r}")


def _lora(name: str, text: str) -> dict[str, Any]:
    """`NAME` or `NAME:SCALE` as a request's LoRA object."""
    lora, colon, scale = text.rpartition(":")
    if not colon:
        return {"name": text}
    try:
        return {"name": lora, "scale": float(scale)}
    except ValueError:
        raise UsageError(f"{ALIASES[name]}: expected NAME or NAME:SCALE, got {text!r}") from None


def validate(fields: dict[str, Any], registry: Any, loras: Any = None) -> dict[str, Any]:
    """The engine's parameters, checked by the API's request model (same defaults, same ranges);
    `loras` is the LoRA folder (a models.lora_files.LoraLibrary), when there is one."""
    from pydantic import ValidationError

    from server.http.errors import describe_validation_error
    from server.http.schemas import SegBeyondRequest

    try:
        # input_image is the file here; the model wants some non-empty text for it.
        request = SegBeyondRequest.model_validate(
            {"input_image": "-", **fields}, context={"registry": registry, "loras": loras}
        )
    except ValidationError as exc:
        field, _, reason = describe_validation_error(list(exc.errors())).partition(": ")
        option = ALIASES.get(field.split(".")[0]) or f"--{field.replace('_', '-')}"
        raise UsageError(f"{option}: {_one_line(reason)}") from None
    # A seed of -1 stays -1: the engine draws it and prints it with the result.
    return request.job_params(registry, request.seed)


def output_paths(input_path: Path, output: str | None, samples: int) -> list[Path]:
    out = Path(output) if output else input_path.with_name(f"{input_path.stem}-outpainted.png")
    if out.suffix.lower() not in FORMATS:
        raise UsageError(f"-o {out}: the name must end in one of {', '.join(FORMATS)} (it sets the format)")
    if not out.parent.is_dir():
        raise UsageError(f"-o {out}: no such folder {out.parent}")
    if samples == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(1, samples + 1)]


def read_input(path: Path, limits: Any) -> Any:
    from server.guard.images import InputImageError, decode_image

    if not path.exists():
        raise UsageError(f"{path}: no such file")
    if not path.is_file():
        raise UsageError(f"{path}: not a file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    try:
        return decode_image(data, limits)
    except InputImageError as exc:
        raise UsageError(f"{path}: {_one_line(str(exc).removeprefix('input_image: '))}") from None


def model_problem(message: str) -> str:
    """A ModelSpecError's message on one line: what is wrong, without the list of accepted forms
    or of remedies that follows it (for a hub model not in the cache, `check_model` names the one)."""
    lines = []
    for line in message.strip().splitlines():
        if line.startswith(("Accepted model specs", "To fix this")):
            break
        lines.append(line.strip().removeprefix("- "))
    return " ".join([lines[0], "; ".join(lines[1:])]).strip()


def check_model(spec: str, tokenizer_dir: Path | None = None) -> None:
    from models.loading import ModelSpecError, check_spec

    try:
        check_spec(spec, tokenizer_dir=tokenizer_dir)
    except ModelSpecError as exc:
        problem = model_problem(str(exc))
        if "Hugging Face cache" in problem:
            problem += (
                f" Fetch it first with `beyond download {spec}`, or pass a diffusers folder or a .safetensors file."
            )
        raise UsageError(f"--model {spec}: {problem}") from None


def progress_callback() -> tuple[Callable[[int, int], None], Callable[[], None]]:
    """The engine's per-step callback drawing a tqdm bar on stderr, and a function to close it."""
    from tqdm import tqdm

    bar: list[tqdm] = []

    def on_step(step: int, total: int) -> None:
        if not bar:
            bar.append(tqdm(total=total, desc="outpainting", unit="step", file=sys.stderr, dynamic_ncols=True))
        bar[0].update(step - bar[0].n)

    def close() -> None:
        if bar:
            bar[0].close()

    return on_step, close


def outpaint(args: argparse.Namespace) -> int:
    try:
        return _outpaint(args)
    except UsageError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a failure of the engine itself: one line, not a traceback
        print(f"{PROG}: failed: {type(exc).__name__}: {_one_line(str(exc))}", file=sys.stderr)
        return 1


def _outpaint(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from models.styles import StyleFileError, default_registry
    from server.guard.images import ImageLimits, InputImageError, check_canvas
    from server.settings import Settings

    # The server's settings (BEYOND_* variables) for what the command line does not say.
    given = {"model": args.model, "device": args.device, "lora_dir": args.lora_dir}
    try:
        settings = Settings(**{k: v for k, v in given.items() if v})
    except ValidationError as exc:
        error = exc.errors()[0]
        field = str(error["loc"][0]) if error.get("loc") else ""
        reason = _one_line(str(error.get("msg")).removeprefix("Value error, "))
        if given.get(field):  # the command line's own value: name the option
            raise UsageError(f"--{field.replace('_', '-')} {given[field]}: {reason}") from None
        raise UsageError(f"invalid BEYOND_{field.upper()} setting: {reason}") from None
    try:
        registry = default_registry(settings.styles_dir)
    except StyleFileError as exc:
        raise UsageError(f"cannot load the styles: {_one_line(str(exc))}") from None
    fields = request_fields(args)
    loras = None
    if fields.get("loras"):
        from server.guard.loras import lora_library

        loras = lora_library(settings)
    params = validate(fields, registry, loras)
    limits = ImageLimits(
        max_bytes=settings.max_input_bytes,
        max_pixels=settings.max_input_pixels,
        max_canvas_pixels=settings.max_canvas_pixels,
    )
    input_path = Path(args.input)
    paths = output_paths(input_path, args.output, params.samples)
    image = read_input(input_path, limits)
    try:
        check_canvas(params.canvas_size(*image.size), limits)
    except InputImageError as exc:
        raise UsageError(_one_line(str(exc))) from None
    check_model(settings.model, settings.tokenizer_dir)

    engine = load_engine(settings)
    on_step, close_bar = progress_callback()
    from server.jobs.engine_process import engine_request

    try:
        result = engine.run(engine_request(image, params), on_step)
    finally:
        close_bar()
    for path, picture, seed in zip(paths, result.images, result.seeds, strict=True):
        fmt, options = FORMATS[path.suffix.lower()]
        picture.save(path, format=fmt, **options)
        print(f"{path}\tseed {seed}")
    return 0


def load_engine(settings: Any) -> Any:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import diffusers
    import torch
    import transformers

    from models.composer import build_composer
    from models.devices import resolve_device
    from models.engine import OutpaintEngine
    from models.loading import ModelSpecError
    from models.speed import SpeedOptions

    try:
        resolve_device(settings.device)
    except (ValueError, RuntimeError) as exc:  # torch.device("bogus") is a RuntimeError
        raise UsageError(f"--device {settings.device}: {_one_line(str(exc))}") from None
    # Their load-time notices are for developers; the progress bar and the result are for this user.
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    if settings.cpu_threads:
        torch.set_num_threads(settings.cpu_threads)
    knobs = (settings.channels_last, settings.fuse_qkv, settings.compile, settings.compile_sizes or "")
    speed = SpeedOptions.parse(*knobs)
    try:
        engine = OutpaintEngine.load(
            settings.model, settings.device, settings.dtype, speed, tokenizer_dir=settings.tokenizer_dir
        )
    except ModelSpecError as exc:
        raise UsageError(f"--model {settings.model}: {model_problem(str(exc))}") from None
    try:
        engine.composer = build_composer(settings.styles_dir, settings.expansion_model, device=engine.device)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot load the prompt expansion model: {_one_line(str(exc))}") from None
    engine.enable_loras(settings.lora_dir, settings.lora_cache)
    return engine
