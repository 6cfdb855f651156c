"""`train.prepare` (what `ctrlnet prepare` makes a ControlNet dataset from) and `train.annotators`
(how each condition type is drawn from an image: shared by `ctrlnet prepare` and by validation's
control-fidelity metric, so the generated images are re-annotated exactly as the data was)."""

from typing import Literal

from pydantic import Field, field_validator, model_validator

from ctrlnet.config.bounds import MAX_BATCH_SIZE, MAX_RESOLUTION, MAX_ROWS
from ctrlnet.config.section import Section

AnnotatorName = Literal["canny", "depth", "segmentation"]
"""The annotators ctrlnet ships (ctrlnet_trainer.annotators)."""

MAX_CANNY_THRESHOLD = 4096
"""OpenCV's Canny compares these with the L1 Sobel gradient magnitude of 8-bit images, at most
8 x 255 = 2040 for its 3x3 aperture: anything higher finds no edge."""
MAX_TOLERANCE_PX = 64


class CannyParams(Section):
    low_threshold: int = Field(default=100, ge=0, le=MAX_CANNY_THRESHOLD)
    """Hysteresis low threshold of OpenCV's Canny (the ControlNet canny models' 100)."""
    high_threshold: int = Field(default=200, ge=1, le=MAX_CANNY_THRESHOLD)
    """Hysteresis high threshold (the ControlNet canny models' 200)."""
    threshold_range: list[int] | None = None
    """[lowest, highest]: draw both thresholds per row uniformly in this range (low < high), as
    the ControlNet paper made its canny data ("random thresholds"); the draw depends on the row
    and the seed only, so a restarted prepare draws the same. Unset: the fixed thresholds above."""
    tolerance_px: int = Field(default=2, ge=0, le=MAX_TOLERANCE_PX)
    """Control fidelity: a condition edge counts as found when a generated image's edge lies within
    this many pixels of it (and a generated edge as right when a condition edge lies that near)."""

    @field_validator("threshold_range")
    @classmethod
    def _range(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (len(v) != 2 or not 0 <= v[0] < v[1] <= MAX_CANNY_THRESHOLD):
            raise ValueError(
                f"must be [lowest, highest] with 0 <= lowest < highest <= {MAX_CANNY_THRESHOLD}, e.g. [50, 250]"
            )
        return v

    @model_validator(mode="after")
    def _ordered(self) -> "CannyParams":
        if self.threshold_range is None and self.low_threshold >= self.high_threshold:
            raise ValueError(
                f"low_threshold {self.low_threshold} is not below high_threshold {self.high_threshold}: "
                "give low < high, e.g. 100 and 200"
            )
        return self


class ModelAnnotatorParams(Section):
    revision: str | None = None
    """Hub revision (branch, tag or commit) of `model`; a commit makes the dataset reproducible."""
    batch_size: int = Field(default=8, gt=0, le=MAX_BATCH_SIZE)
    """Images per forward pass of the annotator's model."""


class DepthParams(ModelAnnotatorParams):
    model: str = "depth-anything/Depth-Anything-V2-Small-hf"
    """A transformers depth-estimation model: hub id or local folder. The default, Depth-Anything-V2
    Small, is Apache-2.0 (its Base and Large checkpoints are CC-BY-NC-4.0: not for commercial use)."""


class SegmentationParams(ModelAnnotatorParams):
    model: str = "openmmlab/upernet-convnext-small"
    """A transformers semantic-segmentation model trained on ADE20K's 150 classes (the ControlNet
    seg models' palette): hub id or local folder. The default, UperNet with ConvNeXt-small, is MIT."""


class AnnotatorsConfig(Section):
    canny: CannyParams = Field(default_factory=CannyParams)
    depth: DepthParams = Field(default_factory=DepthParams)
    segmentation: SegmentationParams = Field(default_factory=SegmentationParams)

    def params(self, name: str) -> Section:
        return getattr(self, name)


class PrepareConfig(Section):
    source: str | None = None
    """The raw images (+ captions) `ctrlnet prepare` annotates: a folder of images with a
    metadata.jsonl (imagefolder), a parquet file or folder, a .jsonl file of rows, an fsspec URL
    (s3://) or a hub dataset id. It writes the prepared dataset to `train.data.dataset`."""
    config_name: str | None = None
    """The source dataset's config name, when it has several."""
    split: str = "train"
    """Split of the source dataset."""
    streaming: bool = False
    """Stream the source instead of downloading it whole (hub or remote data); every process reads
    the stream and decodes only the rows of its own shards."""
    image_column: str = "image"
    """Source column holding the image (an image, or a file path relative to the source)."""
    caption_column: str | None = "text"
    """Source column holding the caption (or list of captions); unset: no captions (every row's
    caption is empty)."""
    annotator: AnnotatorName = "canny"
    """What the condition is: `canny` edges (OpenCV), `depth` (a transformers depth-estimation
    model) or `segmentation` (an ADE20K semantic-segmentation model, drawn in its palette); each
    one's parameters are under `train.annotators`."""
    resolution: int | None = Field(default=None, gt=0, le=MAX_RESOLUTION)
    """Each image is resized (short side, aspect kept) to this before it is annotated and stored, so
    the condition is drawn at the scale the ControlNet sees; unset: `train.data.resolution`."""
    max_rows: int | None = Field(default=None, gt=0, le=MAX_ROWS)
    """Prepare only the source's first N rows (at most 100,000,000)."""
    shard_rows: int = Field(default=1000, gt=0, le=1_000_000)
    """Rows per output parquet shard: the unit of work, of restart and of parallelism."""
