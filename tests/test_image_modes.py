"""Images whose mode is not RGB become the RGB they mean, or are refused in one line, the same in
training (data.open_image, which precompute uses too) and in `ctrlnet generate`: 16-bit grey is
scaled to 8 bits (not clipped to white), transparency is composited on black (what conditioning
images are drawn on), palettes and CMYK are converted, animated images are refused."""

import io

import numpy as np
import pytest
from PIL import Image


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=kw.pop("format", "PNG"), **kw)
    return buf.getvalue()


def _sixteen_bit_grey() -> Image.Image:
    arr = np.zeros((16, 16), dtype=np.uint16)
    arr[:, 8:] = 65535  # white right half, black left half
    arr[0, 0] = 32896  # mid grey: 128 in 8 bits
    return Image.fromarray(arr)  # mode I;16


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def test_sixteen_bit_grey_is_scaled_not_clipped():
    from ctrlnet_trainer.data import open_image

    data = _png(_sixteen_bit_grey())
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    rgb = np.asarray(open_image(data, None))
    assert rgb.shape == (16, 16, 3)
    assert rgb[1, 0].tolist() == [0, 0, 0] and rgb[0, 15].tolist() == [255, 255, 255]
    assert rgb[0, 0].tolist() == [128, 128, 128]


def test_alpha_is_composited_on_black():
    from ctrlnet_trainer.data import open_image

    rgba = Image.new("RGBA", (8, 8), (255, 255, 255, 0))  # transparent white: black
    rgba.putpixel((0, 0), (255, 255, 255, 255))
    rgb = np.asarray(open_image(_png(rgba), None))
    assert rgb[0, 0].tolist() == [255, 255, 255] and rgb[4, 4].tolist() == [0, 0, 0]
    la = Image.new("LA", (8, 8), (200, 0))
    assert np.asarray(open_image(_png(la), None))[1, 1].tolist() == [0, 0, 0]


def test_palette_and_cmyk_are_converted():
    from ctrlnet_trainer.data import open_image

    pal = Image.new("RGB", (8, 8), (255, 0, 0)).convert("P")
    assert np.asarray(open_image(_png(pal), None))[0, 0].tolist() == [255, 0, 0]
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # red
    out = np.asarray(open_image(_png(cmyk, format="JPEG"), None))[4, 4]
    assert out[0] > 200 and out[1] < 60 and out[2] < 60


def test_an_animated_image_is_refused_in_one_line():
    from ctrlnet_trainer.data import BadImage, open_image

    with pytest.raises(BadImage, match="animated image: give a single frame") as e:
        open_image(_animated_gif(), None)
    assert "\n" not in str(e.value)


def test_generate_reads_the_condition_the_same_way(tmp_path):
    from ctrlnet.errors import UserError
    from ctrlnet_trainer.generate import conditioning_image

    (tmp_path / "c16.png").write_bytes(_png(_sixteen_bit_grey()))
    assert np.asarray(conditioning_image(str(tmp_path / "c16.png")))[0, 0].tolist() == [128, 128, 128]
    (tmp_path / "anim.gif").write_bytes(_animated_gif())
    with pytest.raises(UserError, match=r"--image .*anim.gif.? is an animated image: give a single frame"):
        conditioning_image(str(tmp_path / "anim.gif"))


def test_generate_refuses_a_negative_seed(tmp_path):
    from ctrlnet.errors import UserError
    from ctrlnet_trainer.generate import generate

    Image.new("RGB", (32, 32)).save(tmp_path / "c.png")
    with pytest.raises(UserError, match="--seed -1 is negative"):
        generate(str(tmp_path), str(tmp_path), str(tmp_path / "c.png"), "p", str(tmp_path / "out"), seed=-1)
    assert not (tmp_path / "out").exists()
