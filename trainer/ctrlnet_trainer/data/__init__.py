"""Training data, in three steps: sources (where rows come from) -> transforms (a row becomes an
example: images resized, caption tokenized, the family's extra inputs) -> batches (resumable
batch streams). The names the trainer and the tools use are re-exported here."""

from ctrlnet_trainer.data.batches import (
    GlobalBatchSampler,
    MapBatches,
    Position,
    StreamingBatches,
    collate,
)
from ctrlnet_trainer.data.sources import (
    Source,
    SyntheticFillSource,
    check_columns,
    open_source,
    subset,
    synthetic_row,
    training_rows,
)
from ctrlnet_trainer.data.transforms import (
    BAD_ROWS,
    UNREADABLE,
    BadImage,
    BadRow,
    Crop,
    Examples,
    interpolation_of,
    open_image,
    resample_filter,
    resize_center_crop,
    resize_center_crop_at,
    to_rgb,
    to_tensor,
    unreadable_reason,
)

__all__ = [
    "BAD_ROWS",
    "UNREADABLE",
    "BadImage",
    "BadRow",
    "Crop",
    "Examples",
    "GlobalBatchSampler",
    "MapBatches",
    "Position",
    "Source",
    "StreamingBatches",
    "SyntheticFillSource",
    "check_columns",
    "collate",
    "interpolation_of",
    "open_image",
    "open_source",
    "resample_filter",
    "resize_center_crop",
    "resize_center_crop_at",
    "subset",
    "synthetic_row",
    "to_rgb",
    "to_tensor",
    "training_rows",
    "unreadable_reason",
]
