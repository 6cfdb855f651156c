"""The training run: build -> batches -> step -> log/checkpoint/validate -> save.

`train(cfg)` is the whole algorithm; each stage lives in a named component (models, data,
step, optim, checkpoints, validation, metrics). Runs in one process or one per GPU under
torchrun (the Accelerator reads the distributed environment)."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ctrlnet.config.train import TrainConfig
from ctrlnet.errors import UserError
from ctrlnet_trainer import accel, data, models as model_lib, optim, rundir, validation
from ctrlnet_trainer.checkpoints import CheckpointStore
from ctrlnet_trainer.metrics import MetricsLog, Progress, gpu_memory_gib
from ctrlnet_trainer.preemption import Preempted, StopFlag
from ctrlnet_trainer.quiet import quiet_library_noise
from ctrlnet_trainer.step import OnlineEncoder, controlnet_loss, drop_prompt_mask
from ctrlnet_trainer.storage import Prefix

TRAINER_STATE = "trainer_state.json"


@dataclass
class RunResult:
    controlnet: str
    samples: str | None
    loss_curve: str | None
    metrics: str
    steps: int
    hub_repo: str | None = None


def train(cfg: TrainConfig) -> RunResult:
    quiet_library_noise()
    use_cuda = accel.check_device_options(cfg)
    if cfg.data.streaming and cfg.loop.max_steps is None:
        raise UserError("data.streaming needs loop.max_steps (a stream has no known length): set --max-steps N")
    if cfg.hub.push:
        from ctrlnet_trainer.hub import hub_token

        hub_token(cfg.hub)  # fail before training, not after
    output = Prefix(cfg.output)
    work_dir = Path(output.root) if not output.remote else remote_work_dir(output.url)
    accelerator = accel.build_accelerator(cfg, work_dir, use_cuda)
    stop = StopFlag().install()
    try:
        return Trainer(cfg, accelerator, output, work_dir, stop).run()
    finally:
        stop.uninstall()
        accelerator.end_training()
        _forget_accelerator_state()


def _forget_accelerator_state() -> None:
    """accelerate keeps process-wide singletons: without this, a second train() in the same
    process (a notebook, a test) with another mixed_precision fails, and inherits the last
    run's gradient-accumulation state. The process group (PartialState) is left alone."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()


def remote_work_dir(url: str) -> Path:
    """Node-local staging for a remote output; the same path for every rank on a node."""
    import hashlib

    base = os.environ.get("CTRLNET_WORK_DIR") or os.path.join(tempfile.gettempdir(), "ctrlnet-work")
    return Path(base) / hashlib.sha1(url.encode()).hexdigest()[:16]


class Trainer:
    def __init__(self, cfg: TrainConfig, accelerator, output: Prefix, work_dir: Path, stop: StopFlag):
        self.cfg, self.acc, self.output, self.work_dir, self.stop = cfg, accelerator, output, work_dir, stop
        self.store = CheckpointStore(output, work_dir)
        self.device = accelerator.device
        self.ranks = accel.process_ranks()
        self.weight_dtype = accel.DTYPES[cfg.loop.mixed_precision]
        self.is_deepspeed = cfg.distributed.strategy == "deepspeed"
        self.last_samples: Path | None = None

    # ------------------------------------------------------------ build
    def run(self) -> RunResult:
        cfg, acc = self.cfg, self.acc
        previous = rundir.check_owner(self.output, cfg)  # every rank reads before anyone writes
        acc.wait_for_everyone()
        self.resume_url = self.store.resolve(cfg.checkpoint.resume) if cfg.checkpoint.resume else None
        self.resume_state = json.loads(Prefix(self.resume_url).read_text(TRAINER_STATE)) if self.resume_url else None
        self.seed = self._agree_on_seed(previous)
        if self.ranks.is_main and previous is None:
            rundir.write_run(self.output, cfg, self.seed)

        from accelerate.utils import set_seed

        set_seed(self.seed)  # the same ControlNet init on every rank
        self.models = model_lib.load_models(cfg, self.seed)
        model_lib.prepare_for_training(self.models, cfg, self.device, self.weight_dtype)
        if cfg.loop.allow_tf32 and self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        source = data.open_source(cfg.data, cfg.model.cache_dir, self.seed)
        data.check_columns(source, cfg.data)
        source = data.subset(source, cfg.data.max_train_samples, self.seed)
        self.examples = data.Examples(source, cfg.data, self.models.tokenizer, self.seed)
        self.source = source

        accum, world = cfg.loop.gradient_accumulation_steps, self.ranks.world
        self.total_steps = cfg.loop.max_steps or self._steps_for_epochs(len(self.examples), world)
        lr = optim.scaled_lr(cfg.optim, cfg.loop.batch_size, accum, world)
        optimizer = optim.build_optimizer(self.models.controlnet.parameters(), cfg.optim, lr, self.device)
        self.lr_scheduler = optim.build_lr_scheduler(optimizer, cfg.optim, self.total_steps)
        self.controlnet, self.optimizer = acc.prepare(self.models.controlnet, optimizer)
        acc.register_for_checkpointing(self.lr_scheduler)
        self._register_checkpoint_format()
        # One noise stream per rank; its state is checkpointed so a resume draws the same noise.
        self.generator = torch.Generator(device=self.device).manual_seed(self.seed * 7919 + self.ranks.rank)

        self.step, position = self._resume()
        self.batches = self._batches(position)
        return self._loop()

    def _agree_on_seed(self, previous: dict | None) -> int:
        """A resumed run keeps its seed (data order, noise, in-code base); else config, else drawn."""
        if self.resume_state is not None:
            state = self.resume_state
            if self.cfg.loop.seed is not None and self.cfg.loop.seed != state["seed"] and self.ranks.is_main:
                print(f"note: loop.seed={self.cfg.loop.seed} ignored; resuming keeps the checkpoint's seed {state['seed']}",
                      flush=True)
            return int(state["seed"])
        if previous is not None:
            return int(previous["seed"])
        if self.cfg.loop.seed is not None:
            return self.cfg.loop.seed
        drawn = [random.SystemRandom().randrange(2**31)]
        if self.ranks.world > 1:
            import torch.distributed as dist

            dist.broadcast_object_list(drawn, src=0)  # every rank must train from the same seed
        return int(drawn[0])

    def _steps_for_epochs(self, rows: int, world: int) -> int:
        per_epoch = (rows // world) // self.cfg.loop.batch_size
        return max(1, self.cfg.loop.num_epochs * per_epoch // self.cfg.loop.gradient_accumulation_steps)

    def _batches(self, position: data.Position):
        cfg = self.cfg
        if self.source.streaming:
            return data.StreamingBatches(self.source, self.examples, cfg.loop.batch_size, self.ranks.rank,
                                         self.ranks.world, self.seed, cfg.data.shuffle_buffer, position)
        return data.MapBatches(self.examples, cfg.loop.batch_size, self.ranks.rank, self.ranks.world,
                               self.seed, cfg.data.num_workers, position, pin_memory=self.device.type == "cuda")

    # ------------------------------------------------------------ loop
    def _loop(self) -> RunResult:
        cfg, acc = self.cfg, self.acc
        encoder = OnlineEncoder(self.models, self.weight_dtype, self.device)
        metrics = None
        if self.ranks.is_main:
            if self.output.remote and self.step and self.output.exists("metrics.jsonl"):
                self.output.download(self.work_dir / "metrics.jsonl", "metrics.jsonl")  # keep the history
            metrics = MetricsLog(self.work_dir / "metrics.jsonl", self.step)
        if self.ranks.is_main and acc.log_with:
            acc.init_trackers(cfg.logging.tracker_project_name, config=_flat_hparams(cfg))
        pairs = validation.validation_pairs(cfg, self.seed) if self.ranks.is_main else []
        progress = Progress(self.total_steps, self.step, self.ranks.is_local_main)
        samples_per_step = cfg.loop.batch_size * cfg.loop.gradient_accumulation_steps * self.ranks.world
        batches = iter(self.batches)
        window_loss, window_steps, window_start = torch.zeros((), device=self.device), 0, time.perf_counter()
        max_norm = cfg.optim.max_grad_norm or math.inf
        grad_norm = None

        while self.step < self.total_steps:
            for _ in range(cfg.loop.gradient_accumulation_steps):
                batch = next(batches)
                with acc.accumulate(self.controlnet):
                    drop = drop_prompt_mask(batch["input_ids"].shape[0], cfg.data.proportion_empty_prompts,
                                            self.generator, self.device)
                    latents, text = encoder.encode(batch, drop, self.generator)
                    cond = batch["conditioning_pixel_values"].to(self.device, dtype=self.weight_dtype, non_blocking=True)
                    loss = controlnet_loss(self.models, self.controlnet, latents, text, cond, self.generator,
                                           cfg.loop.snr_gamma)
                    acc.backward(loss)
                    if acc.sync_gradients:
                        grad_norm = acc.clip_grad_norm_(self.controlnet.parameters(), max_norm)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=cfg.optim.set_grads_to_none)
                window_loss += loss.detach() / cfg.loop.gradient_accumulation_steps
            if not acc.optimizer_step_was_skipped:  # fp16 overflow skips the step; keep the schedule aligned
                self.lr_scheduler.step()
            self.step += 1
            window_steps += 1

            if self.step % cfg.logging.every_steps == 0 or self.step == self.total_steps:
                mean_loss = accel.all_reduce(window_loss, "mean").item() / window_steps
                elapsed = time.perf_counter() - window_start
                row = {"step": self.step, "loss": round(mean_loss, 6), "lr": self.lr_scheduler.get_last_lr()[0],
                       "grad_norm": None if grad_norm is None else round(float(grad_norm), 6),
                       "samples_per_s": round(samples_per_step * window_steps / elapsed, 3),
                       "epoch": self.batches.position.epoch}
                if (mem := gpu_memory_gib()) is not None:
                    row["gpu_mem_gib"] = mem
                if metrics:
                    metrics.write(row)
                if self.ranks.is_main and acc.log_with:
                    acc.log({k: v for k, v in row.items() if k != "step" and v is not None}, step=self.step)
                progress.update(loss=f"{mean_loss:.4f}")
                window_loss.zero_()
                window_steps, window_start = 0, time.perf_counter()
            elif progress.bar:
                progress.update()

            stop = self.stop.agreed(self.device)
            if self.step % cfg.checkpoint.every_steps == 0 or stop:
                checkpoint = self._save_checkpoint(metrics)
                if stop:
                    progress.close()
                    raise Preempted(self.step, checkpoint)
            if pairs and self.step % cfg.validation.every_steps == 0:
                self._validate(pairs)
            if window_steps == 0:
                window_start = time.perf_counter()  # samples/s measures training, not checkpoint or validation

        progress.close()
        return self._finish(metrics, pairs)

    # ------------------------------------------------------------ validate / save
    def _validate(self, pairs) -> None:
        if not self.ranks.is_main or (self.is_deepspeed and self.cfg.distributed.zero_stage == 3):
            return  # ZeRO-3 shards the weights; sampling them needs every rank (not done here)
        image = validation.render_samples(self.models, self.acc.unwrap_model(self.controlnet), pairs, self.cfg,
                                          self.weight_dtype, self.device, self.seed)
        self.last_samples = validation.save_grid(image, self.work_dir / "samples", self.step)
        self.output.upload(self.last_samples, "samples", self.last_samples.name)
        if self.cfg.logging.report_to == "tensorboard":
            import numpy as np

            self.acc.get_tracker("tensorboard").writer.add_image(
                "validation", np.asarray(image), self.step, dataformats="HWC")

    def _finish(self, metrics: MetricsLog | None, pairs) -> RunResult:
        acc = self.acc
        acc.wait_for_everyone()
        state_dict = acc.get_state_dict(self.controlnet) if self.is_deepspeed else None  # collective
        final = self.work_dir / "controlnet"
        repo = curve = None
        if self.ranks.is_main:
            acc.unwrap_model(self.controlnet).save_pretrained(final, state_dict=state_dict, safe_serialization=True)
            self.output.upload(final, "controlnet")
            if pairs and self.step % self.cfg.validation.every_steps != 0:
                self._validate(pairs)
            metrics.close()
            curve = metrics.plot_loss(self.work_dir / "loss.png")
            self._upload_logs(curve)
        acc.wait_for_everyone()
        if self.ranks.is_main and self.cfg.hub.push:
            # After the last barrier: a failed upload ends this process alone, the others are done.
            from ctrlnet_trainer.hub import push_controlnet

            repo = push_controlnet(final, self.cfg.hub, Path(self.output.root).name)
        return RunResult(
            controlnet=self.output.url_of("controlnet"),
            samples=self.output.url_of("samples", self.last_samples.name) if self.last_samples else None,
            loss_curve=self.output.url_of("loss.png") if curve else None,
            metrics=self.output.url_of("metrics.jsonl"), steps=self.step, hub_repo=repo,
        )

    def _upload_logs(self, curve: Path | None) -> None:
        if not self.output.remote:
            return
        self.output.upload(self.work_dir / "metrics.jsonl", "metrics.jsonl")
        if curve:
            self.output.upload(curve, "loss.png")
        logs = self.work_dir / self.cfg.logging.logging_dir
        if logs.exists():
            self.output.upload(logs, self.cfg.logging.logging_dir)

    # ------------------------------------------------------------ checkpoints
    def _register_checkpoint_format(self) -> None:
        """Checkpoints hold the ControlNet in diffusers format (controlnet/), not a raw state dict."""
        acc = self.acc

        def save_hook(models, weights, output_dir):
            if self.ranks.is_main:
                for model in models:
                    acc.unwrap_model(model).save_pretrained(Path(output_dir) / "controlnet", safe_serialization=True)
            weights.clear()  # saved above: accelerate must not write them again

        def load_hook(models, input_dir):
            from diffusers import ControlNetModel

            while models:
                model = models.pop()
                loaded = ControlNetModel.from_pretrained(Path(input_dir) / "controlnet")
                acc.unwrap_model(model).load_state_dict(loaded.state_dict())

        acc.register_save_state_pre_hook(save_hook)
        acc.register_load_state_pre_hook(load_hook)

    def _save_checkpoint(self, metrics: MetricsLog | None) -> str | None:
        acc, step = self.acc, self.step
        node_local = self.output.remote  # remote output: each node stages in its own temp folder
        if self.ranks.is_main or (node_local and self.ranks.is_local_main):
            self.store.clear_staging(step)
        acc.wait_for_everyone()
        folder = self.store.staging_dir(step)
        acc.save_state(str(folder))  # every rank: DeepSpeed saves shards collectively
        torch.save(self.generator.get_state(), folder / f"noise_rng_{self.ranks.rank}.pt")
        if self.is_deepspeed:
            state_dict = acc.get_state_dict(self.controlnet)
            if self.ranks.is_main:
                acc.unwrap_model(self.controlnet).save_pretrained(folder / "controlnet", state_dict=state_dict)
        if self.ranks.is_main:
            state = {"step": step, "position": self.batches.position.as_dict(), "seed": self.seed,
                     "total_steps": self.total_steps, "world_size": self.ranks.world,
                     "batch_size": self.cfg.loop.batch_size}
            (folder / TRAINER_STATE).write_text(json.dumps(state, indent=2) + "\n")
        acc.wait_for_everyone()
        if node_local and self.ranks.is_local_main:
            self.store.upload(step)
        acc.wait_for_everyone()
        url = None
        if self.ranks.is_main:
            url = self.store.commit(step, self.cfg.checkpoint.total_limit)
            self._upload_logs(None)
        acc.wait_for_everyone()
        return url

    def _resume(self) -> tuple[int, data.Position]:
        acc, cfg = self.acc, self.cfg
        url = self.resume_url
        if url is None:  # `latest` with nothing saved yet: a fresh start (first run of a restartable job)
            return 0, data.Position()
        state = self.resume_state
        # The data order is a function of (world size, batch size): another shape cannot continue
        # at "the same batch", so refuse rather than silently train on a different stream.
        saved = (state.get("world_size"), state.get("batch_size"))
        if saved != (self.ranks.world, cfg.loop.batch_size):
            raise UserError(
                f"checkpoint {url} was written with {saved[0]} processes x batch {saved[1]}; this run has "
                f"{self.ranks.world} x {cfg.loop.batch_size}: resume with the same processes and loop.batch_size"
            )
        checkpoint = Prefix(url)
        folder = Path(checkpoint.root)
        if checkpoint.remote:
            folder = self.work_dir / ".resume"  # one download per node, shared by its ranks
            if self.ranks.is_local_main:
                shutil.rmtree(folder, ignore_errors=True)
                checkpoint.download(folder)
        acc.wait_for_everyone()
        acc.load_state(str(folder))
        self.generator.set_state(torch.load(folder / f"noise_rng_{self.ranks.rank}.pt"))
        if self.ranks.is_main:
            print(f"resuming from {url} at step {state['step']}", flush=True)
        return int(state["step"]), data.Position(**state["position"])


def _flat_hparams(cfg: TrainConfig) -> dict:
    """TensorBoard hparams take scalars only."""
    flat = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            flat[prefix] = value if isinstance(value, (int, float, str, bool)) else str(value)

    walk("", cfg.model_dump(mode="json"))
    return flat
