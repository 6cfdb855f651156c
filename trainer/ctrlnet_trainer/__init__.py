"""ctrlnet's trainer: the ControlNet training loop on diffusers + accelerate.

Entry points: `python -m ctrlnet_trainer --config config.yaml` (under torchrun in a pod, through
`launch`) and `ctrlnet_trainer.run.train(TrainConfig)` (what `ctrlnet train` calls).

Where each stage lives (the loop itself reads like the algorithm in trainer.py):

    run.py / __main__.py / launch.py   entry points: in-process, one process, the pod's torchrun
    trainer.py     build -> loop (step, log, checkpoint, validate) -> finish
    models/        the model-family seam (family.py: what differs between SD1.x/2.x, SDXL,
                   SD3/SD3.5 and Flux.1), their objectives (objective.py: DDPM, flow matching),
                   loading bases and ControlNets (load.py), in-code and demo bases
    data/          sources.py (where rows come from) -> transforms.py (row -> example, with the
                   family's inputs) -> batches.py (resumable batch streams)
    step.py        one training step: the random draws, online encoding, the ControlNet loss
    loss.py        targets and Min-SNR weighting of the DDPM objective (models/objective.py uses it)
    cache/         the precompute cache: layout (format), encode, job (`ctrlnet precompute`),
                   reader (a run with data.cache)
    optim.py       optimizer and LR schedule     accel.py   the Accelerator (DDP / DeepSpeed)
    checkpoints.py the checkpoint protocol (save, commit, resume); uploader.py its uploads;
                   weights.py gathered, checked ControlNet weights; rundir.py who owns an output
    validation.py  sample grids and held-out loss; adherence.py the condition-adherence metric
    metrics.py     metrics.jsonl, tracker, progress lines, loss curve
    speed.py       compile / channels_last / FP8 switches     preemption.py  SIGTERM -> 143
    storage.py     every path a URL (fsspec)     seeds.py   every random stream's formula
    fs.py          filesystem errors as one line; outputs probed writable before heavy work
    generate.py    `ctrlnet generate`            hub.py     the optional hub push
    synthetic.py   the synthetic fill50k rows    selfcheck.py  the image's build-time check
Notes and warnings go through ctrlnet.log (rank-aware, -v / -q); progress and result lines that
`ctrlnet status` parses are printed as they are.
"""
