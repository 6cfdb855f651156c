"""Commands that run on this machine: train, data synth-fill, model init, generate."""

import importlib
from importlib import resources
from typing import Annotated

import typer

from ctrlnet.commands.options import ConfigFile, Overrides
from ctrlnet.config.bounds import MAX_CONTROL_MODES, MAX_IMAGES, MAX_INFERENCE_STEPS, MAX_RESOLUTION, MAX_ROWS
from ctrlnet.config.train import DEMO_BASE
from ctrlnet.errors import UserError
from ctrlnet.extras import check_installed, needs
from ctrlnet.log import get_logger

log = get_logger(__name__)

# `ctrlnet train` shortcut flags -> config keys.
SHORTCUTS = {
    "base": "train.model.base",
    "data": "train.data.dataset",
    "output": "train.output",
    "max_steps": "train.loop.max_steps",
    "resolution": "train.data.resolution",
    "batch_size": "train.loop.batch_size",
    "checkpoint_every": "train.checkpoint.every_steps",
    "resume": "train.checkpoint.resume",
}


def _demo_preset() -> str:
    return str(resources.files("ctrlnet.presets").joinpath("demo.yaml"))


def _demo_notice(train) -> str | None:
    """What a run without -f takes from the embedded demo, or None when it takes nothing."""
    demo, synthetic = train.model.base == DEMO_BASE, train.data.dataset is None
    if train.model.base is None and train.model.family not in ("auto", "sd"):
        what = "" if synthetic else ", on your data"
        return (
            f"no -f or --base given with model.family {train.model.family}: training a tiny random-init base of that "
            f"family built in code{what} (give --base for a real one)"
        )
    if demo and synthetic:
        return "no -f given: training the embedded demo (a tiny 64 px base shipped pretrained, synthetic circle data)"
    if demo:
        return "no -f or --base given: starting from the demo's tiny pretrained base (give --base for a real one)"
    if synthetic:
        return "no -f or --data given: training on the demo's synthetic circle data (give --data for yours)"
    return None


def _adherence_line(scores: dict[int, dict[str, float]] | None) -> str | None:
    """The condition adherence of the first and last validation (synthetic data), as one line."""
    if not scores:
        return None
    first, last = scores[min(scores)], scores[max(scores)]
    if min(scores) == max(scores):
        return f"adherence:   IoU {last['adherence_iou']:.2f} with the outlines (chance {last['adherence_chance']:.2f})"
    return (
        f"adherence:   IoU {first['adherence_iou']:.2f} at step {min(scores)} -> {last['adherence_iou']:.2f} at step "
        f"{max(scores)} with the outlines (chance {first['adherence_chance']:.2f} -> {last['adherence_chance']:.2f})"
    )


def _fidelity_line(scores: dict[int, dict[str, float]] | None) -> str | None:
    """The control fidelity of the first and last validation, per annotator, as one line."""
    if not scores:
        return None
    first, last = min(scores), max(scores)
    names = [k.removeprefix("fidelity_") for k in scores[last] if not k.endswith("_chance")]

    def chance(step: int, name: str) -> str:
        value = scores[step].get(f"fidelity_{name}_chance")
        return "none" if value is None or value != value else f"{value:.2f}"  # NaN: no chance level

    parts = []
    for name in names:
        a, b = scores[first].get(f"fidelity_{name}"), scores[last][f"fidelity_{name}"]
        if first == last or a is None:
            parts.append(f"{name} {b:.2f} (chance {chance(last, name)})")
        else:
            parts.append(
                f"{name} {a:.2f} at step {first} -> {b:.2f} at step {last} "
                f"(chance {chance(first, name)} -> {chance(last, name)})"
            )
    return "fidelity:    " + "; ".join(parts)


TRAIN_PACKAGES = ("torch", "diffusers", "transformers", "datasets")


def train_extra(*preload: str) -> None:
    """What a command that runs the trainer does first, inside `with needs("train")`: check that
    the extra is installed without importing it (a typo in the input should still fail in a
    second, not ten), then import `preload` (the trainer's modules may import those only when they
    run) and, with torch, quiet the libraries' import-time noise."""
    check_installed("train", *TRAIN_PACKAGES)
    for package in preload:
        importlib.import_module(package)
    if "torch" in preload:
        from ctrlnet_trainer.quiet import quiet_library_noise

        quiet_library_noise()


def train(
    file: ConfigFile = None,
    set_: Overrides = None,
    base: Annotated[str | None, typer.Option(help="Base model folder, URL or hub id.")] = None,
    data: Annotated[str | None, typer.Option(help="Dataset: hub name, path or URL.")] = None,
    output: Annotated[str | None, typer.Option(help="Run output folder or URL.")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Optimizer steps to train.")] = None,
    resolution: Annotated[int | None, typer.Option(help="Training resolution (multiple of 8).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Batch size per process.")] = None,
    checkpoint_every: Annotated[int | None, typer.Option(help="Checkpoint every N steps.")] = None,
    resume: Annotated[str | None, typer.Option(help="`latest` or a checkpoint path to resume from.")] = None,
    nproc: Annotated[
        int, typer.Option("--nproc", min=1, help="Processes on this machine (one per GPU), under torchrun.")
    ] = 1,
) -> None:
    """Train a ControlNet on this machine. With no -f: the embedded demo (tiny base, synthetic data)."""
    from ctrlnet.config import load_job_config

    values = dict(
        base=base,
        data=data,
        output=output,
        max_steps=max_steps,
        resolution=resolution,
        batch_size=batch_size,
        checkpoint_every=checkpoint_every,
        resume=resume,
    )
    overrides = [f"{SHORTCUTS[k]}={v}" for k, v in values.items() if v is not None]
    cfg = load_job_config(file or _demo_preset(), [*overrides, *(set_ or [])])
    if file is None and cfg.train.model.base == DEMO_BASE and cfg.train.model.family not in ("auto", "sd"):
        # The demo's pretrained base is SD-shaped: a run asking for another family without a
        # base gets that family's tiny base built in code instead of a layout error.
        cfg = cfg.model_copy(
            update={"train": cfg.train.model_copy(update={"model": cfg.train.model.model_copy(update={"base": None})})}
        )
    if file is None:
        # After loading (a bad flag is one error line, with no notice before it), and about
        # what actually runs: --base/--data (or --set) replace parts of the demo.
        if notice := _demo_notice(cfg.train):
            log.info(notice)

    # DeepSpeed needs the process group torchrun sets up, even for one process.
    if nproc > 1 or cfg.train.distributed.strategy == "deepspeed":
        from ctrlnet.local_launch import train_processes

        code, result = train_processes(cfg.train, nproc)
        if code:
            raise typer.Exit(code)
    else:
        with needs("train"):
            train_extra("torch", "diffusers")
            from ctrlnet_trainer.preemption import Preempted
            from ctrlnet_trainer.run import train as train_here

        try:
            result = train_here(cfg.train)
        except Preempted as p:  # SIGTERM / Ctrl-C: the step finished and was checkpointed
            saved = f" (checkpoint {p.checkpoint})" if p.checkpoint else ""
            typer.echo(f"stopped at step {p.step}{saved}; continue with --resume latest", err=True)
            raise typer.Exit(p.exit_code) from None
    typer.echo(f"controlnet:  {result.controlnet}")
    if result.samples:
        typer.echo(f"samples:     {result.samples}")
    if result.loss_curve:
        typer.echo(f"loss curve:  {result.loss_curve}")
    typer.echo(f"metrics:     {result.metrics}")
    if line := _adherence_line(getattr(result, "adherence", None)):
        typer.echo(line)
    if line := _fidelity_line(getattr(result, "fidelity", None)):
        typer.echo(line)


data_app = typer.Typer(help="Datasets for offline runs and benchmarks.", no_args_is_help=True)


@data_app.command("synth-fill")
def synth_fill(
    out: Annotated[str, typer.Option(help="Folder to write train.parquet into.")],
    rows: Annotated[int, typer.Option(min=1, max=MAX_ROWS, help="Number of examples.")] = 1000,
    resolution: Annotated[int, typer.Option(min=8, max=MAX_RESOLUTION, help="Image size in pixels.")] = 512,
    seed: Annotated[int, typer.Option(help="Seed of colours and circles.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing train.parquet in --out.")] = False,
) -> None:
    """Write a synthetic fill50k look-alike as parquet (image, conditioning_image, text)."""
    with needs("train"):
        train_extra("datasets")
        from ctrlnet_trainer.synthetic import write_fill_parquet

    path = write_fill_parquet(out, rows=rows, resolution=resolution, seed=seed, overwrite=overwrite)
    typer.echo(f"wrote {rows} rows to {path}")


model_app = typer.Typer(help="Base models for offline runs and benchmarks.", no_args_is_help=True)


@model_app.command("init")
def model_init(
    out: Annotated[str, typer.Option(help="Folder to write the diffusers layout into.")],
    arch: Annotated[
        str,
        typer.Option(
            help="tiny, tiny-sdxl, tiny-sd3, tiny-flux or tiny-flux-schnell (CPU tests); sd15, sdxl, "
            "sd3.5-medium or flux-dev (full-size shapes, for GPU benchmarks: flux-dev is ~17 B parameters, "
            "~68 GB in fp32)."
        ),
    ] = "tiny",
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace what --out already holds.")] = False,
) -> None:
    """Write a random-init SD1.5-, SDXL-, SD3/SD3.5- or Flux.1-shaped base in the diffusers layout.

    SDXL adds text_encoder_2/tokenizer_2; SD3 has a transformer/ and three text encoders (two CLIPs,
    T5), Flux.1 a transformer/, CLIP and T5. sd3.5-medium and flux-dev have the real models' shapes.
    """
    with needs("train"):
        train_extra()
        from ctrlnet_trainer.models import tiny  # imports torch/diffusers when it builds

    if arch not in tiny.all_archs():
        raise UserError(f"--arch {arch!r} is unknown: use one of {', '.join(tiny.all_archs())}")
    tiny.check_out(out, overwrite)
    with needs("train"):
        train_extra("torch", "diffusers")
    path = tiny.write_base(out, arch=arch, seed=seed, overwrite=overwrite)
    typer.echo(f"wrote {arch} base to {path}")


def generate(
    base: Annotated[str, typer.Option(help="Base model folder or hub id.")],
    controlnet: Annotated[str, typer.Option(help="Trained ControlNet folder (diffusers format).")],
    image: Annotated[str, typer.Option(help="Conditioning image file.")],
    prompt: Annotated[str, typer.Option(help="Text prompt.")],
    out: Annotated[
        str, typer.Option(help="Folder for the PNGs (a name already taken there gets the next free number).")
    ] = "generated",
    num_images: Annotated[int, typer.Option(min=1, max=MAX_IMAGES)] = 1,
    steps: Annotated[int, typer.Option(min=1, max=MAX_INFERENCE_STEPS, help="Denoising steps.")] = 20,
    seed: Annotated[int, typer.Option()] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    adherence: Annotated[
        bool,
        typer.Option(
            help="--image is a circle outline (the synthetic data's): report each image's IoU of the "
            "circle it drew with the outline's disk."
        ),
    ] = False,
    control_mode: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=MAX_CONTROL_MODES - 1,
            help="A union ControlNet (Flux.1): the condition type of --image, its id in the run's model.control_modes.",
        ),
    ] = None,
    fidelity: Annotated[
        list[str] | None,
        typer.Option(
            help="Control fidelity: re-annotate each image with this annotator (canny, depth or segmentation; "
            "repeat it or separate by commas; default train.annotators parameters) and report its score against "
            "--image, and a chance level: its score against --image flipped horizontally and vertically (the same "
            "kind of structure in other places)."
        ),
    ] = None,
) -> None:
    """Generate images with the base's ControlNet pipeline (SD1.x/2.x, SDXL, SD3/SD3.5 or Flux.1, read from the base)."""
    with needs("train"):
        train_extra("torch")  # diffusers once the inputs pass
        from ctrlnet_trainer.generate import condition_fidelity, fidelity_names, outline_adherence
        from ctrlnet_trainer.generate import generate as generate_images

    annotators = fidelity_names(fidelity)  # a wrong name fails before the models load

    paths = generate_images(
        base=base,
        controlnet=controlnet,
        image=image,
        prompt=prompt,
        out=out,
        num_images=num_images,
        steps=steps,
        seed=seed,
        device=device,
        control_mode=control_mode,
    )
    for path in paths:
        typer.echo(f"wrote {path}")
    if adherence:
        scores = outline_adherence(paths, image)
        shown = ", ".join(f"{s:.2f}" for s in scores)
        typer.echo(f"adherence:   IoU with the outline's disk {sum(scores) / len(scores):.2f} (per image: {shown})")
    if annotators:
        for name, (own, chance) in condition_fidelity(paths, image, annotators, device, seed).items():
            shown = ", ".join(f"{s:.2f}" for s in own)
            typer.echo(
                f"fidelity:    {name} {sum(own) / len(own):.2f} against the condition, chance "
                f"{sum(chance) / len(chance):.2f} against it flipped (per image: {shown})"
            )


def register(app: typer.Typer) -> None:
    app.command()(train)
    app.add_typer(data_app, name="data")
    app.add_typer(model_app, name="model")
    app.command()(generate)
