"""ctrlnet's trainer: the ControlNet training loop on diffusers + accelerate.

Entry points: `python -m ctrlnet_trainer --config config.yaml` (under torchrun in a pod) and
`ctrlnet_trainer.run.train(TrainConfig)` (what `ctrlnet train` calls)."""
