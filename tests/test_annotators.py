"""The annotator library (ctrlnet_trainer.annotators) and control fidelity (ctrlnet_trainer.fidelity):
canny on drawn shapes, depth and segmentation through tiny random transformers models built here
(no hub), and build()'s one-line refusals."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image, ImageDraw

from ctrlnet.config.prepare import CannyParams, DepthParams, SegmentationParams
from ctrlnet.errors import UserError
from ctrlnet_trainer.annotators import NAMES, ade20k, build
from ctrlnet_trainer.fidelity import fidelity
from testkit.annotator_models import tiny_depth_model, tiny_upernet

SIZE = 96


def shapes(seed: int, size: int = SIZE) -> tuple[Image.Image, np.ndarray]:
    """An image of filled rectangles and circles, one in each of three of its four quarters (apart:
    no two shapes touch), on a plain dark background, and its true boundary: the pixels whose colour
    differs from a 4-neighbour's."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 80, 3)))
    draw = ImageDraw.Draw(image)
    cell = size // 2
    for k, quarter in enumerate(rng.permutation(4)[:3]):
        w, h = (int(v) for v in rng.integers(cell // 3, cell - 10, 2))
        x0 = int(quarter % 2) * cell + int(rng.integers(4, cell - w - 4))
        y0 = int(quarter // 2) * cell + int(rng.integers(4, cell - h - 4))
        fill = tuple(int(v) for v in rng.integers(140, 256, 3))
        (draw.rectangle if k % 2 == 0 else draw.ellipse)([x0, y0, x0 + w, y0 + h], fill=fill)
    a = np.asarray(image).astype(int)
    differs = np.zeros(a.shape[:2], dtype=bool)
    dy, dx = (a[1:] != a[:-1]).any(-1), (a[:, 1:] != a[:, :-1]).any(-1)
    differs[1:] |= dy
    differs[:-1] |= dy
    differs[:, 1:] |= dx
    differs[:, :-1] |= dx
    return image, differs


def distance_to(mask: np.ndarray) -> np.ndarray:
    return cv2.distanceTransform(np.where(mask, 0, 255).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)


def shifted(image: Image.Image, px: int) -> Image.Image:
    return Image.fromarray(np.roll(np.asarray(image), px, axis=1))


# ---------------------------------------------------------------- canny
def test_canny_edges_lie_on_the_shapes_boundaries():
    canny = build("canny", CannyParams())
    assert (canny.name, canny.license) == ("canny", "Apache-2.0")
    for seed in range(4):
        image, boundary = shapes(seed)
        (out,) = canny.annotate([image])
        assert out.mode == "RGB" and out.size == image.size
        a = np.asarray(out)
        assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all() and set(np.unique(a)) == {0, 255}
        edges = a[..., 0] == 255
        assert distance_to(boundary)[edges].max() <= 2, "an edge away from every shape's boundary"
        found = (distance_to(edges)[boundary] <= 2).mean()
        assert found > 0.9, f"only {found:.0%} of the boundary found"


def test_canny_threshold_range_draws_per_row_whatever_the_batch():
    params = CannyParams(threshold_range=[50, 250])
    canny, other_seed = build("canny", params, seed=1), build("canny", params, seed=2)
    draws = [canny.thresholds(row) for row in range(20)]
    assert all(50 <= low < high <= 250 for low, high in draws)
    assert len(set(draws)) > 10, "the thresholds do not vary per row"
    assert draws != [other_seed.thresholds(row) for row in range(20)], "the seed plays no part"
    assert canny.identity() == {"name": "canny", "params": params.model_dump(mode="json"), "seed": 1}
    assert "seed" not in build("canny", CannyParams(), seed=1).identity()  # fixed thresholds: no draw
    assert canny.fidelity_thresholds() == (117, 183)  # the expected lower and higher of two draws
    images = [shapes(seed)[0] for seed in range(3)]
    batch = canny.annotate(images, rows=[5, 11, 17])
    alone = [canny.annotate([image], rows=[row])[0] for image, row in zip(images, [5, 11, 17], strict=True)]
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(batch, alone, strict=True))
    with pytest.raises(ValueError, match="one row index per image"):
        canny.annotate(images, rows=[1])


def test_canny_fidelity_ground_truth_near_one_and_chance_low():
    canny = build("canny", CannyParams(tolerance_px=2))
    images = [shapes(seed)[0] for seed in range(6)]
    conditions = canny.annotate(images)
    truth = fidelity(canny, images, conditions)
    assert truth["score"] > 0.95 and truth["chance"] < 0.5, truth
    near = fidelity(canny, [shifted(i, 1) for i in images], conditions)
    assert near["score"] > 0.95, near
    far = fidelity(canny, [shifted(i, 10) for i in images], conditions)
    assert far["score"] < 0.5, far
    print(f"canny F1: truth {truth}, 1 px shift {near['score']:.3f}, 10 px shift {far['score']:.3f}")


def test_edge_f1_edge_cases_and_resized_conditions():
    canny = build("canny", CannyParams(tolerance_px=0))
    empty, edges = np.zeros((8, 8), bool), np.eye(8, dtype=bool)
    assert canny.score(empty, empty) == 1.0 and canny.score(edges, empty) == 0.0 and canny.score(empty, edges) == 0.0
    assert canny.score(edges, edges) == 1.0
    assert canny.score(edges, np.roll(edges, 1, axis=1)) == 0.0  # no tolerance: a pixel off is wrong
    big = np.asarray(Image.fromarray(edges).resize((16, 16), Image.Resampling.NEAREST))
    assert canny.score(edges, big) == 1.0  # the condition is fit to the generated image's size


def test_fidelity_pairs_and_refusals():
    canny = build("canny", CannyParams())
    images = [shapes(seed)[0] for seed in range(2)]
    same = canny.annotate(images[:1])[0]
    assert np.isnan(fidelity(canny, images, [same, same])["chance"])  # one condition: no chance level
    with pytest.raises(ValueError, match="one conditioning image per generated image"):
        fidelity(canny, images, [same])
    with pytest.raises(ValueError, match="no images"):
        fidelity(canny, [], [])


# ---------------------------------------------------------------- depth
@pytest.fixture(scope="module")
def depth_dir(tmp_path_factory):
    return tiny_depth_model(tmp_path_factory.mktemp("annotators") / "depth")


def test_depth_annotator_draws_gray_full_range_maps(depth_dir):
    depth = build("depth", DepthParams(model=str(depth_dir), batch_size=2))
    assert depth.name == "depth" and depth.license.startswith("unknown")
    images = [shapes(seed)[0] for seed in range(3)] + [shapes(9, size=64)[0].resize((80, 48))]
    out = depth.annotate(images)
    for image, condition in zip(images, out, strict=True):
        a = np.asarray(condition)
        assert condition.mode == "RGB" and condition.size == image.size
        assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()
        assert (a.min(), a.max()) == (0, 255)
    # the condition reads back as the prediction, up to 8-bit rounding (a random model squeezes most
    # of its map into few gray levels: ties)
    truth = fidelity(depth, images, out)
    assert truth["score"] > 0.95 and truth["chance"] < 0.5, truth
    print(f"depth Spearman: truth {truth}")
    identity = depth.identity()
    assert identity["name"] == "depth" and identity["params"]["model"] == str(depth_dir)
    assert identity["model"].startswith("sha256:")
    depth.close()
    assert depth.model is None


def test_spearman():
    from ctrlnet_trainer.annotators.depth import ranks, spearman

    rng = np.random.default_rng(0)
    m = rng.normal(size=(16, 16))
    assert spearman(m, m) == pytest.approx(1.0)
    assert spearman(m, -m) == pytest.approx(-1.0)
    assert spearman(m, np.exp(3 * m) + 7) == pytest.approx(1.0)
    assert spearman(m, np.zeros_like(m)) == 0.0
    assert ranks(np.array([10.0, 20.0, 10.0, 30.0])).tolist() == [1.5, 3.0, 1.5, 4.0]  # ties: average ranks
    # 8-bit: the ties of a quantised map barely move it
    assert spearman(m, np.round((m - m.min()) / np.ptp(m) * 255)) > 0.999


# ---------------------------------------------------------------- segmentation
@pytest.fixture(scope="module")
def seg_dir(tmp_path_factory):
    return tiny_upernet(tmp_path_factory.mktemp("annotators") / "seg")


def test_segmentation_annotator_draws_the_class_map_in_the_palette(seg_dir):
    seg = build("segmentation", SegmentationParams(model=str(seg_dir)))
    images = [shapes(seed)[0] for seed in range(2)]
    out = seg.annotate(images)
    classes = seg.predict(images)
    palette = {tuple(c) for c in ade20k.PALETTE.tolist()}
    for image, condition, class_map in zip(images, out, classes, strict=True):
        assert condition.mode == "RGB" and condition.size == image.size
        assert {tuple(c) for c in np.asarray(condition).reshape(-1, 3).tolist()} <= palette
        assert len(np.unique(class_map)) > 1  # the random model draws several classes: a real check
        assert np.array_equal(seg.condition_structure(condition), ade20k.canonical(class_map))
    for made, condition in zip(seg.structure(images), out, strict=True):
        assert seg.score(made, seg.condition_structure(condition)) == 1.0
    assert fidelity(seg, images, out)["score"] == 1.0
    made, condition = seg.structure(images[:1])[0], seg.condition_structure(out[0])
    assert seg.score(made, np.kron(condition, np.ones((2, 2), dtype=np.int64))) == 1.0  # fit to the generated size
    assert seg.identity()["model"].startswith("sha256:")
    seg.close()


def test_mean_iou():
    from ctrlnet_trainer.annotators.segmentation import mean_iou

    a = np.array([[0, 0, 1, 1], [0, 0, 1, 1]])
    assert mean_iou(a, a) == 1.0
    b = np.array([[0, 0, 0, 1], [0, 0, 0, 1]])  # class 0: 4/6, class 1: 2/4
    assert mean_iou(a, b) == pytest.approx((4 / 6 + 2 / 4) / 2)
    assert mean_iou(a, np.full_like(a, 7)) == 0.0
    seg_score = mean_iou(a, np.kron(a, np.ones((2, 2), int))[::2, ::2])
    assert seg_score == 1.0


def test_palette_is_ade20ks():
    assert ade20k.PALETTE.shape == (150, 3)
    assert ade20k.PALETTE[:4].tolist() == [[120, 120, 120], [180, 120, 120], [6, 230, 230], [80, 50, 50]]
    assert ade20k.PALETTE[-2:].tolist() == [[102, 255, 0], [92, 0, 255]]
    # 149 distinct colours: road (6) and skyscraper (48) share [140, 140, 140] in the source
    assert len({tuple(c) for c in ade20k.PALETTE.tolist()}) == 149
    assert ade20k.PALETTE[48].tolist() == ade20k.PALETTE[6].tolist() == [140, 140, 140]
    assert ade20k.classes(ade20k.PALETTE[None]).tolist() == [[*range(48), 6, *range(49, 150)]]
    off = np.clip(ade20k.PALETTE.astype(int) + 3, 0, 255).astype(np.uint8)  # JPEG-ish drift
    assert ade20k.classes(off[None]).tolist() == ade20k.classes(ade20k.PALETTE[None]).tolist()


# ---------------------------------------------------------------- build()'s refusals
def test_build_refuses_unknown_and_missing(tmp_path, depth_dir, seg_dir):
    assert NAMES == ("canny", "depth", "segmentation")
    with pytest.raises(UserError, match="unknown annotator 'pose': give one of canny, depth, segmentation"):
        build("pose", CannyParams())
    with pytest.raises(UserError, match=r"train\.annotators\.depth\.model .* does not exist") as e:
        build("depth", DepthParams(model=str(tmp_path / "nope")))
    assert "\n" not in str(e.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="is not a transformers model") as e:
        build("depth", DepthParams(model=str(empty)))
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="is a UperNetForSemanticSegmentation model, not a depth-estimation model"):
        build("depth", DepthParams(model=str(seg_dir)))
    with pytest.raises(UserError, match=r"train\.annotators\.segmentation\.model .* not a semantic-segmentation"):
        build("segmentation", SegmentationParams(model=str(depth_dir)))
    few = tiny_upernet(tmp_path / "few", num_labels=10)
    with pytest.raises(UserError, match="predicts 10 classes, not ADE20K's 150") as e:
        build("segmentation", SegmentationParams(model=str(few)))
    assert "\n" not in str(e.value)


def test_a_hub_id_is_asked_once_and_quickly(tmp_path, monkeypatch):
    import time

    from huggingface_hub import HfApi

    from ctrlnet_trainer.models import hub_ids

    asked = []
    real = hub_ids.check_hub_id
    monkeypatch.setattr(hub_ids, "check_hub_id", lambda *a, **k: asked.append((a, k)) or real(*a, **k))

    def unreachable(*args, **kwargs):
        raise ConnectionError("Failed to resolve 'huggingface.co'\nmore lines")

    monkeypatch.setattr(HfApi, "repo_info", unreachable)
    start = time.monotonic()
    with pytest.raises(UserError) as e:
        build("depth", DepthParams(model="nobody/no-such-depth-model"), cache_dir=str(tmp_path))
    assert time.monotonic() - start < 5
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("train.annotators.depth.model 'nobody/no-such-depth-model': no folder")
    assert "the hub could not be reached" in message and "give an existing folder" in message
    assert asked and asked[0][0][:3] == ("nobody/no-such-depth-model", "train.annotators.depth.model", "model")
