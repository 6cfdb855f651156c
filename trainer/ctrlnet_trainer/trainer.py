"""The Trainer: `__init__` builds everything, `train()` is the loop.

    build   models, data, optimizer + LR schedule, accelerate state, checkpointer, meter, validator
    loop    train_step -> meter.log -> checkpointer.maybe_save -> validator.maybe_run
    finish  final ControlNet (diffusers format), last validation, loss curve, hub push

Each stage's details live in a named component (models, data, step, optim, checkpoints, metrics,
validation); this file shows how they fit together.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from ctrlnet.config.contract import FINAL_MODEL_DIR, METRICS_FILE
from ctrlnet.config.train import TrainConfig
from ctrlnet.errors import IntegrityError, UserError
from ctrlnet.log import ALL_RANKS, get_logger
from ctrlnet_trainer import accel, data, optim, rundir, speed, weights
from ctrlnet_trainer.cache.reader import CachedRun
from ctrlnet_trainer.checkpoints import Checkpointer, ResumePoint, step_dir_name
from ctrlnet_trainer.metrics import Meter
from ctrlnet_trainer.models import load as model_lib
from ctrlnet_trainer.preemption import Preempted, StopFlag
from ctrlnet_trainer.step import OnlineEncoder, controlnet_loss, draw
from ctrlnet_trainer.storage import Prefix
from ctrlnet_trainer.validation import Validator

log = get_logger(__name__)


class Diverged(IntegrityError):
    """The loss or gradient norm became non-finite: nothing from that step was logged or committed."""


@dataclass
class RunResult:
    controlnet: str
    samples: str | None
    loss_curve: str | None
    metrics: str
    steps: int
    hub_repo: str | None = None
    adherence: dict[int, dict[str, float]] | None = None  # step -> scores (synthetic data)
    fidelity: dict[int, dict[str, float]] | None = None  # step -> fidelity_<annotator>[_chance] (validation.fidelity)


class Trainer:
    def __init__(self, cfg: TrainConfig, accelerator, output: Prefix, stop: StopFlag, resume: ResumePoint | None):
        """`resume`: the checkpoint to continue (ResumePoint.find, run before the Accelerator);
        `cfg` already carries the gradient accumulation it asks for."""
        self.cfg, self.acc, self.output, self.stop = cfg, accelerator, output, stop
        self.device = accelerator.device
        self.ranks = accel.process_ranks()
        self.weight_dtype = accel.DTYPES[cfg.loop.mixed_precision]
        deepspeed = cfg.distributed.strategy == "deepspeed"
        self.sharded = deepspeed and cfg.distributed.zero_stage == 3  # each rank holds a shard of the weights

        # --- the run: which output, which checkpoint to continue, which seed
        previous = rundir.check_owner(output, cfg, resume)  # every rank reads before anyone writes
        accelerator.wait_for_everyone()
        self.checkpointer = Checkpointer(output, accelerator, self.ranks, cfg.checkpoint, self.sharded)
        self.seed = self._agree_on_seed(resume, previous)

        # --- models (the same ControlNet init on every rank)
        from accelerate.utils import set_seed

        set_seed(self.seed)
        self.models = model_lib.load_models(cfg, self.seed)
        # data.cache: the rows come encoded, checked against this config here (before anything
        # trains or the output is claimed); the encoders never reach the device (cache/reader.py).
        self.cached = (
            CachedRun.open(cfg, self.seed, self.models, self.weight_dtype, self.ranks, accelerator)
            if cfg.data.cache
            else None
        )
        model_lib.prepare_for_training(self.models, cfg, self.device, self.weight_dtype)
        speed_lines = speed.apply_speed_settings(self.models, cfg, self.device)  # compile, channels_last, fp8
        for line in speed_lines:
            log.info(f"speed: {line}")
        needed = speed.GradientCheck.needed(cfg, self.device)  # compiled gradients == eager ones, once
        self.grad_check = speed.GradientCheck(self.models.controlnet, self.ranks.is_main) if needed else None
        if cfg.loop.allow_tf32 and self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if self.cached:
            self.encoder = self.cached.encoder(self.weight_dtype, self.device)
        else:
            self.encoder = OnlineEncoder(self.models, self.weight_dtype, self.device)

        # --- data
        if self.cached:  # the same rows, indices and per-epoch caption choice, already encoded
            self.source, self.examples = self.cached.source, self.cached.examples
        else:
            source = data.open_source(cfg.data, cfg.model.cache_dir, self.seed)
            data.check_columns(source, cfg.data)
            self.source = data.subset(source, cfg.data.max_train_samples, self.seed)
            self.examples = data.Examples.of(self.source, cfg.data, self.models, self.seed)

        # --- optimizer, LR schedule, accelerate state
        accum = cfg.loop.gradient_accumulation_steps
        self.total_steps = cfg.loop.max_steps or self._steps_for_epochs(len(self.examples))
        lr = optim.scaled_lr(cfg.optim, cfg.loop.batch_size, accum, self.ranks.world)
        optimizer = optim.build_optimizer(self.models.controlnet.parameters(), cfg.optim, lr, self.device)
        self.lr_scheduler = optim.build_lr_scheduler(optimizer, cfg.optim, self.total_steps)
        self.controlnet, self.optimizer = accelerator.prepare(self.models.controlnet, optimizer)
        accelerator.register_for_checkpointing(self.lr_scheduler)
        self.max_grad_norm = cfg.optim.max_grad_norm or math.inf
        self.grad_norm: torch.Tensor | None = None
        self.num_train_timesteps = self.models.noise_scheduler.config.num_train_timesteps

        # --- where the loop starts: step 0, or exactly where the checkpoint left off
        self.checkpointer.track(self.controlnet, self.state_dict)
        self.step, position = 0, data.Position()
        if resume is not None:
            state = self.checkpointer.restore(resume)
            self.step, position = int(state["step"]), data.Position(**state["position"])
        self.batches = self._batches(position)
        self.batch_iter = iter(self.batches)

        self.validator = Validator(
            cfg,
            self.models,
            self.controlnet,
            output,
            accelerator,
            weight_dtype=self.weight_dtype,
            seed=self.seed,
            is_main=self.ranks.is_main,
            sharded=self.sharded,
            prompts=self.cached.prompts if self.cached else None,
            rank=self.ranks.rank,
            world=self.ranks.world,
        )

        # --- inputs checked, about to train: the output is taken from here on (rundir)
        rundir.claim(
            output, cfg, self.seed, previous, start=self.step, total=self.total_steps, is_main=self.ranks.is_main
        )

        # --- reporting
        if self.ranks.is_main and accelerator.log_with:
            accelerator.init_trackers(cfg.logging.tracker_project_name, config=_flat_hparams(cfg))
        self.meter = Meter(
            output,
            accelerator,
            every=cfg.logging.every_steps,
            total_steps=self.total_steps,
            start_step=self.step,
            samples_per_step=cfg.loop.batch_size * accum * self.ranks.world,
            is_main=self.ranks.is_main,
            is_local_main=self.ranks.is_local_main,
            device=self.device,
            logging_dir=cfg.logging.logging_dir,
            count_skipped=cfg.data.skip_bad_rows,
        )

    # ------------------------------------------------------------ the loop
    def train(self) -> RunResult:
        if self.cfg.validation.at_start and self.step == 0:
            with speed.eager():
                self._validate(0)  # the zero ControlNet: the baseline the trained one is measured against
        while self.step < self.total_steps:
            loss = self.train_step()
            self.step += 1
            self._check_finite(loss)  # before anything is logged or checkpointed from this step
            self.meter.add(loss)
            self.meter.log(
                self.step,
                lr=self.lr_scheduler.get_last_lr()[0],
                grad_norm=self.grad_norm,
                epoch=self.batches.position.epoch,
            )
            stop = self.stop.agreed(self.device)
            # samples/s measures training, not checkpoints or validation; validation runs uncompiled
            with self.meter.paused(), speed.eager():
                checkpoint = self.checkpointer.maybe_save(self.step, stop)
                if checkpoint is not None:
                    self.meter.checkpointed(checkpoint.step, checkpoint.url)
                if stop:
                    self.meter.progress.close()
                    raise Preempted(self.step, checkpoint.url if checkpoint else None, self.stop.signum)
                self._validate(self.step)
        return self.finish()

    def _check_finite(self, loss: torch.Tensor) -> None:
        """Stop the run, on every rank together, when this step's loss or gradient norm is not
        finite (a diverged run; fp16's skipped overflow steps aside): one line naming the step and
        the last committed checkpoint, before a non-finite value reaches metrics or a checkpoint."""
        from ctrlnet_trainer.accel import all_reduce

        if self.acc.optimizer_step_was_skipped:  # fp16 loss scaling found an overflow and skipped the step
            return
        values = [loss.detach().float().reshape(())]
        if isinstance(self.grad_norm, torch.Tensor):
            values.append(self.grad_norm.detach().float().reshape(()).to(loss.device))
        elif self.grad_norm is not None:
            values.append(torch.tensor(float(self.grad_norm), device=loss.device))
        bad = (~torch.isfinite(torch.stack(values))).float().sum().reshape(1)
        if all_reduce(bad).item() == 0:
            return
        self.meter.progress.close()
        what = f"loss {float(values[0]):g}" + (f", gradient norm {float(values[1]):g}" if len(values) > 1 else "")
        committed = self.checkpointer.committed_steps()
        if committed:
            last = self.checkpointer.store.url_of(step_dir_name(committed[-1]))
            then = (
                f"the last good checkpoint is {last}: continue from it with a lower train.optim.learning_rate "
                f"(--resume {last})"
            )
        else:
            then = "no checkpoint was committed: start again with a lower train.optim.learning_rate"
        raise Diverged(
            f"training diverged at step {self.step}: its loss or gradient norm is not finite ({what} on this "
            f"process or another); nothing was written from it and the run stopped; {then}"
        )

    def _validate(self, step: int, last: bool = False) -> None:
        scores = self.validator.maybe_run(step, last)
        if scores:
            self.meter.record(step, scores)

    def train_step(self) -> torch.Tensor:
        """One optimizer step over `gradient_accumulation_steps` micro-batches; the mean loss."""
        cfg, acc = self.cfg, self.acc
        accum = cfg.loop.gradient_accumulation_steps
        total = torch.zeros((), device=self.device)
        for _ in range(accum):
            with self.meter.waiting():  # data_wait_s: time the step is blocked on the loader
                batch = next(self.batch_iter)
            batch = self._readable(batch)
            draws = draw(
                batch["sample_id"],
                self.seed,
                self.encoder.latent_shape(batch),
                self.num_train_timesteps,
                cfg.data.proportion_empty_prompts,
                models=self.models,
            ).to(self.device)
            with acc.accumulate(self.controlnet):
                latents, text, cond = self.encoder.encode(batch, draws)
                if self.grad_check is not None and not self.grad_check.done:  # the unwrapped ControlNet: no all-reduce
                    args = (self.models, self.models.controlnet, latents, text, cond, draws, cfg.loop.snr_gamma)
                    self.grad_check.run(controlnet_loss, *args)
                loss = controlnet_loss(self.models, self.controlnet, latents, text, cond, draws, cfg.loop.snr_gamma)
                acc.backward(loss)
                if acc.sync_gradients:
                    self.grad_norm = acc.clip_grad_norm_(self.controlnet.parameters(), self.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=cfg.optim.set_grads_to_none)
            total += loss.detach() / accum
        if not acc.optimizer_step_was_skipped:  # fp16 overflow skips the step; keep the schedule aligned
            self.lr_scheduler.step()
        return total

    def state_dict(self) -> dict:
        """The loop's own state, saved with every checkpoint as trainer_state.json."""
        return {
            "step": self.step,
            "position": self.batches.position.as_dict(),
            "seed": self.seed,
            "total_steps": self.total_steps,
            "world_size": self.ranks.world,
            "batch_size": self.cfg.loop.batch_size,
            "gradient_accumulation_steps": self.cfg.loop.gradient_accumulation_steps,
        }

    def _readable(self, batch: dict) -> dict:
        """The batch without its unreadable rows (data.skip_bad_rows), or one line naming one."""
        bad = batch.pop(data.BAD_ROWS, None)
        if not bad:
            return batch
        if not self.cfg.data.skip_bad_rows:
            raise UserError(f"{bad[0]}: fix or remove it, or set train.data.skip_bad_rows=true to skip unreadable rows")
        for row in bad:
            log.warning(f"skipped {row}", extra=ALL_RANKS)  # each rank reads its own rows
        self.meter.skipped(len(bad))
        if "conditioning_pixel_values" not in batch:  # online and cached batches both carry it
            raise UserError(
                f"every row of a batch is unreadable ({bad[0]}, ...): check data.dataset and its image columns"
            )
        return batch

    # ------------------------------------------------------------ the end
    def finish(self) -> RunResult:
        acc, output = self.acc, self.output
        last = self.checkpointer.flush()  # the last checkpoint's upload, before the run can be called done
        if last is not None:
            self.meter.checkpointed(last.step, last.url)
        acc.wait_for_everyone()
        # Collective; a copy equal to the live model and finite, or IntegrityError (nothing published).
        state_dict = weights.gather(acc, self.controlnet, is_main=self.ranks.is_main, sharded=self.sharded)
        repo = None
        if self.ranks.is_main:
            final = output.local(FINAL_MODEL_DIR)
            weights.write(acc.unwrap_model(self.controlnet), final, state_dict, dtype=self.cfg.checkpoint.final_dtype)
            output.publish(FINAL_MODEL_DIR)
        with speed.eager():
            self._validate(self.step, last=True)
        curve = self.meter.close()
        self.meter.done(self.step, output.url_of(FINAL_MODEL_DIR))
        acc.wait_for_everyone()
        if self.ranks.is_main:
            rundir.write_finished(output, self.step, output.url_of(FINAL_MODEL_DIR))  # last: the run is complete
        if self.ranks.is_main and self.cfg.hub.push:
            # After the last barrier: a failed upload ends this process alone, the others are done.
            from ctrlnet_trainer.hub import push_controlnet

            repo = push_controlnet(output.local(FINAL_MODEL_DIR), self.cfg.hub, Path(output.root).name)
        return RunResult(
            controlnet=output.url_of(FINAL_MODEL_DIR),
            samples=self.validator.last_samples,
            loss_curve=curve,
            metrics=output.url_of(METRICS_FILE),
            steps=self.step,
            hub_repo=repo,
            adherence=self.validator.adherence or None,
            fidelity=self.validator.fidelity or None,
        )

    # ------------------------------------------------------------ helpers
    def _agree_on_seed(self, resume: ResumePoint | None, previous: dict | None) -> int:
        """A resumed run keeps its seed (data order, noise, in-code base); else config, else drawn."""
        if resume is not None:
            if self.cfg.loop.seed is not None and self.cfg.loop.seed != resume.seed:
                log.info(
                    f"note: loop.seed={self.cfg.loop.seed} ignored; resuming keeps the checkpoint's seed {resume.seed}"
                )
            return resume.seed
        if previous is not None:
            return int(previous["seed"])
        if self.cfg.loop.seed is not None:
            return self.cfg.loop.seed
        drawn = [random.SystemRandom().randrange(2**31)]
        if self.ranks.world > 1:
            import torch.distributed as dist

            dist.broadcast_object_list(drawn, src=0)  # every rank must train from the same seed
        return int(drawn[0])

    def _steps_for_epochs(self, rows: int) -> int:
        loop = self.cfg.loop
        global_batch = self.ranks.world * loop.batch_size * loop.gradient_accumulation_steps
        return max(1, loop.num_epochs * (rows // global_batch))

    def _batches(self, position: data.Position):
        cfg, ranks = self.cfg, self.ranks
        if self.source.streaming:
            return data.StreamingBatches(
                self.source,
                self.examples,
                cfg.loop.batch_size,
                ranks.rank,
                ranks.world,
                self.seed,
                cfg.data.shuffle_buffer,
                position,
                num_workers=cfg.data.num_workers,
            )
        return data.MapBatches(
            self.examples,
            cfg.loop.batch_size,
            cfg.loop.gradient_accumulation_steps,
            ranks.rank,
            ranks.world,
            self.seed,
            cfg.data.num_workers,
            position,
            pin_memory=self.device.type == "cuda",
        )


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
