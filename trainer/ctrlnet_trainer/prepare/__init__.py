"""`ctrlnet prepare`: a source of images (+ captions) annotated into a ControlNet dataset
(image, conditioning image, caption) that `train.data.dataset` reads as it is.

    rows.py     the source's rows, decoded at the prepare resolution
    layout.py   the output: parquet shards, records, fingerprint, manifest
    job.py      the sharded, restartable job (one process or torchrun's N, locally or in pods)
    __main__.py `python -m ctrlnet_trainer.prepare --config ...`: the pod contract (PREPARE_MODULE)

The annotators themselves are ctrlnet_trainer.annotators (shared with validation's fidelity)."""
