"""The precompute cache: a run's training rows encoded once (VAE posteriors, text embeddings,
conditioning images), so the training step skips both encoders.

    layout.py   the format: names, fingerprint, shards written whole or not at all
    encode.py   rows -> a shard's tensors, exactly as online encoding computes them
    job.py      `ctrlnet precompute` / `python -m ctrlnet_trainer.precompute`: the restartable job
    reader.py   a run with data.cache: the cache checked against its config, rows read from it
"""
