"""Session fixtures shared by the whole suite (helpers live in tests/testkit, not here)."""

import pytest


@pytest.fixture(scope="session")
def make_cfg():
    """make_cfg(output, **sections) -> a validated TrainConfig based on testkit.training.SMALL."""
    from testkit.training import small_config

    return small_config


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory):
    """The tiny base as a diffusers folder, seed 0: the same weights a run with model.base unset
    and loop.seed 0 builds in code."""
    from ctrlnet_trainer.models.tiny import write_base

    return write_base(tmp_path_factory.mktemp("tiny-base") / "base", arch="tiny", seed=0)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 endpoint on loopback (moto), shared by the session; its credentials and endpoint
    are in os.environ (and `s3_server.env`, for pods)."""
    pytest.importorskip("moto")
    pytest.importorskip("s3fs")
    from testkit.s3 import start_moto

    server = start_moto()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    """The tiny SDXL base (`ctrlnet model init --arch tiny-sdxl`) as a diffusers folder, seed 0."""
    from ctrlnet_trainer.models.tiny import write_base

    return write_base(tmp_path_factory.mktemp("tiny-sdxl") / "base", arch="tiny-sdxl", seed=0)


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory):
    """The tiny SD3 base (`ctrlnet model init --arch tiny-sd3`) as a diffusers folder, seed 0."""
    from ctrlnet_trainer.models.tiny import write_base

    return write_base(tmp_path_factory.mktemp("tiny-sd3") / "base", arch="tiny-sd3", seed=0)


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory):
    """The tiny Flux.1-dev-shaped base (`ctrlnet model init --arch tiny-flux`), seed 0."""
    from ctrlnet_trainer.models.tiny import write_base

    return write_base(tmp_path_factory.mktemp("tiny-flux") / "base", arch="tiny-flux", seed=0)
