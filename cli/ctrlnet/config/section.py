"""Base class of every config section: unknown keys are errors, assignments are validated, no
number is inf or nan (`1e309` is inf) and no text is longer than MAX_TEXT characters."""

from pydantic import BaseModel, ConfigDict

from ctrlnet.config.bounds import MAX_TEXT


class Section(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        validate_assignment=True,
        use_attribute_docstrings=True,
        allow_inf_nan=False,
        str_max_length=MAX_TEXT,
    )
