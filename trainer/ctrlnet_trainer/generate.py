"""`ctrlnet generate`: images from a base + trained ControlNet with the stock diffusers pipeline of
the base's family (Family.pipeline: the builder validation uses too).

Everything the user typed is checked before the models load (seconds to minutes): the device,
the conditioning image, the output folder. Images never replace earlier ones: a name already
taken in the folder (another prompt, an earlier run) gets the next free number instead.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import torch
from PIL import Image

from ctrlnet.config.credentials import shown
from ctrlnet.errors import UserError, one_line
from ctrlnet_trainer.models.load import check_base_layout, family_at, load_parts, resolve_location

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def pick_device(device: str) -> str:
    """auto, cpu, cuda or cuda:N, checked against what this machine has."""
    if not _DEVICE.match(device):
        raise UserError(f"--device {device!r} is unknown: use auto, cpu, cuda or cuda:N")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {device} but no CUDA GPU is visible: use --device cpu")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise UserError(f"--device {device} but {torch.cuda.device_count()} GPU(s) are visible: use cuda:0 or auto")
    return device


def conditioning_image(image: str) -> Image.Image:
    """The conditioning image, decoded; one line for a missing file, a folder or a non-image."""
    import fsspec

    name = shown(image)
    if "://" not in image:
        if Path(image).is_dir():
            raise UserError(f"--image {name} is a folder: give a conditioning image file (PNG or JPEG)")
        if not Path(image).exists():
            raise UserError(f"--image {name} does not exist: give a conditioning image file")
    try:
        with fsspec.open(image, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise UserError(f"--image {name} does not exist: give a conditioning image file") from None
    except OSError as e:
        raise UserError(f"--image {name} could not be read ({type(e).__name__}): give a readable image file") from None
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):  # UnidentifiedImageError is an OSError
        raise UserError(f"--image {name} is not an image PIL can read: give a PNG or JPEG conditioning image") from None
    if min(img.size) < 8:
        raise UserError(f"--image {name} is {img.width}x{img.height} pixels: give one at least 8 pixels on each side")
    from ctrlnet_trainer.data.transforms import ANIMATED, to_rgb

    try:
        return to_rgb(img)
    except ValueError as e:
        if str(e) == ANIMATED:
            raise UserError(f"--image {name} is {ANIMATED}") from None
        raise UserError(f"--image {name} could not be converted to RGB ({one_line(e)}): give a PNG or JPEG") from None


def output_folder(out: str) -> Path:
    """--out as a folder: refused when it is a file (or lies under one), or cannot be written."""
    from ctrlnet_trainer.fs import check_writable

    check_writable(out, "--out", out)
    return Path(out)


def free_names(folder: Path, stems: list[str]) -> list[Path]:
    """`<stem>.png` for each stem; if any is taken, `<stem>-N.png` with the smallest N that frees
    them all, so one run's images share a suffix and no earlier image is replaced."""
    n = 0
    while True:
        suffix = f"-{n}" if n else ""
        paths = [folder / f"{stem}{suffix}.png" for stem in stems]
        if not any(p.exists() for p in paths):
            return paths
        n += 1


def check_control_mode(modes: int, control_mode: int | None) -> None:
    """A union ControlNet (`modes` condition types) needs --control-mode, one of its ids; another
    ControlNet takes none."""
    if modes and control_mode is None:
        raise UserError(
            f"--controlnet is a union ControlNet of {modes} condition types: give --control-mode, the id of "
            "--image's type (its index in the run's model.control_modes)"
        )
    if control_mode is not None and (not modes or control_mode >= modes):
        what = f"has {modes} condition types (ids 0..{modes - 1})" if modes else "is not a union ControlNet"
        raise UserError(f"--control-mode {control_mode}: --controlnet {what}")


def generate(
    base: str,
    controlnet: str,
    image: str,
    prompt: str,
    out: str,
    num_images: int = 1,
    steps: int = 20,
    seed: int = 0,
    device: str = "auto",
    height: int | None = None,
    control_mode: int | None = None,
) -> list[Path]:
    if seed < 0:
        raise UserError(f"--seed {seed} is negative: give a seed of 0 or more")
    device = pick_device(device)
    cond = conditioning_image(image)
    folder = output_folder(out)
    from ctrlnet_trainer.quiet import quiet_library_noise

    quiet_library_noise()
    base_path = resolve_location(base, "--base", None)
    family = family_at(base_path, "--base", base)
    # On a GPU in half precision: bf16 for the transformer families (fp16 overflows in Flux.1's and SD3's blocks).
    half = torch.bfloat16 if family.latent_control else torch.float16
    dtype = half if device.startswith("cuda") else torch.float32
    check_base_layout(base_path, "--base", base, family)
    cn_path = resolve_location(controlnet, "--controlnet", None)
    config = Path(cn_path) / "config.json"
    if config.is_file():  # before loading the models (Flux.1's are tens of GB): the condition type
        check_control_mode(json.loads(config.read_text()).get("num_mode") or 0, control_mode)
    try:
        cn = family.load_controlnet(cn_path, None, torch_dtype=dtype)
        parts = load_parts(base_path, family, dtype=dtype)
    except (OSError, ValueError) as e:
        raise UserError(
            f"could not load the models ({one_line(e)}): --base must be a diffusers folder or hub id of "
            "SD1.x/2.x, SDXL, SD3/SD3.5 or Flux.1, --controlnet a ControlNet folder of that family"
        ) from None
    if why := family.controlnet_mismatch(cn, parts.unet):
        raise UserError(f"--controlnet was trained for another base ({why}): give the base it was trained on")
    check_control_mode(getattr(cn.config, "num_mode", None) or 0, control_mode)
    pipe = family.pipeline({**parts.pipeline_parts(), "scheduler": family.sampler(parts.noise_scheduler.config)}, cn)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    multiple = family.pixel_multiple
    size = height or (cond.height // multiple * multiple)
    generator = torch.Generator(device=device).manual_seed(seed)
    images = pipe(
        prompt=[prompt] * num_images,
        **family.pipeline_inputs(parts, cond, control_mode),
        height=size,
        width=cond.width // multiple * multiple if not height else size,
        num_inference_steps=steps,
        generator=generator,
    ).images
    from ctrlnet_trainer.fs import one_line_errors

    with one_line_errors(out):
        folder.mkdir(parents=True, exist_ok=True)
        paths = free_names(folder, [f"{seed:04d}-{i:02d}" for i in range(len(images))])
        for img, path in zip(images, paths, strict=True):
            try:
                img.save(path)
            except BaseException:
                path.unlink(missing_ok=True)  # no torn PNG left behind
                raise
    return paths


def outline_adherence(paths: list[Path], outline: str) -> list[float]:
    """Each generated image's IoU of the circle it drew with the disk of `outline` (a white circle
    outline on black, as the synthetic data's conditioning images): adherence.py's metric."""
    from ctrlnet_trainer.adherence import adherence

    cond = conditioning_image(outline)
    scores = []
    for path in paths:
        with Image.open(path) as img:
            scores.append(adherence([img.convert("RGB")], [cond])["iou"])
    return scores


def fidelity_names(values: list[str] | None) -> list[str]:
    """--fidelity's annotators (repeated or comma-separated), checked, each once."""
    from ctrlnet_trainer.annotators import NAMES

    names = [n.strip() for v in values or [] for n in v.split(",") if n.strip()]
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        raise UserError(
            f"--fidelity {unknown[0]!r} is unknown: use {', '.join(NAMES)} (repeat it or separate by commas)"
        )
    return list(dict.fromkeys(names))


def condition_fidelity(
    paths: list[Path], image: str, names: list[str], device: str = "auto", seed: int = 0, cache_dir: str | None = None
) -> dict[str, tuple[list[float], list[float]]]:
    """Per annotator: each generated image re-annotated and scored against the --image condition
    (ctrlnet_trainer.fidelity's score), and against that condition flipped horizontally and
    vertically (the same kind of structure in other places): the chance level of a single
    condition. The annotators take `train.annotators`' default parameters."""
    from ctrlnet.config.prepare import AnnotatorsConfig
    from ctrlnet_trainer.annotators import build

    cond = conditioning_image(image)
    flipped = cond.transpose(Image.Transpose.ROTATE_180)  # both flips
    generated = []
    for path in paths:
        with Image.open(path) as img:
            generated.append(img.convert("RGB"))
    params = AnnotatorsConfig()
    device = pick_device(device)
    out = {}
    for name in names:
        annotator = build(name, params.params(name), device=device, cache_dir=cache_dir, seed=seed)
        try:
            made = annotator.structure(generated)
            own, other = annotator.condition_structure(cond), annotator.condition_structure(flipped)
            out[name] = ([annotator.score(m, own) for m in made], [annotator.score(m, other) for m in made])
        finally:
            annotator.close()
    return out
