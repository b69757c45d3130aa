"""16-bit PNGs decode to the same 8-bit RGB pixels as their 8-bit twin: loaders and predict."""
import numpy as np
import pytest
import torch
from PIL import Image

from nla_fast.data import load_dataset
from nla_fast.data.decode import decode_images, open_rgb
from nla_fast.data.ferplus import FOLDERS
from nla_fast.data.fixtures import make_ferplus_folders, write_png16
from nla_fast.inference import read_image

SHAPES = {"grey": (30, 40), "grey+alpha": (30, 40, 2), "rgb": (30, 40, 3), "rgba": (30, 40, 4)}
PIL_MODES = {"grey": "L", "grey+alpha": "LA", "rgb": "RGB", "rgba": "RGBA"}


def _twins(folder, kind, seed=0):
    """(8-bit PNG, 16-bit PNG with every sample v * 257) of one random image."""
    pixels = np.random.default_rng(seed).integers(0, 256, SHAPES[kind], dtype=np.uint8)
    pixels[:5] = 3  # a dark band: a clipping decoder would turn it white
    eight, sixteen = folder / f"{kind}-8.png", folder / f"{kind}-16.png"
    Image.fromarray(pixels, mode=PIL_MODES[kind]).save(eight)
    write_png16(sixteen, pixels.astype(np.uint16) * 257)
    return eight, sixteen


@pytest.mark.parametrize("kind", list(SHAPES))
def test_16_bit_png_decodes_like_its_8_bit_twin(tmp_path, kind):
    eight, sixteen = _twins(tmp_path, kind)
    with Image.open(sixteen) as probe:  # the file really is 16-bit (Pillow's mode or the IHDR depth)
        assert probe.mode.startswith("I;16") or sixteen.read_bytes()[24] == 16
    expected = np.asarray(Image.open(eight).convert("RGB"))
    assert expected[:5].max() == 3
    assert np.array_equal(np.asarray(open_rgb(sixteen)), expected)
    both = decode_images([eight, sixteen], workers=1, verbose=False)
    assert np.array_equal(both[0], both[1])
    cropped = decode_images([eight, sixteen], boxes=[(2, 3, 20, 12)] * 2, size=(12, 20), workers=1, verbose=False)
    assert np.array_equal(cropped[1], expected[3:15, 2:22])
    assert torch.equal(read_image(sixteen), torch.from_numpy(expected.copy()))  # predict decodes the same way


def test_16_bit_grey_png_keeps_the_high_byte_of_any_value(tmp_path):
    values = np.array([[0, 255, 256, 1000, 32767, 32768, 65280, 65535]], dtype=np.uint16)
    write_png16(tmp_path / "ramp.png", values)
    assert np.asarray(open_rgb(tmp_path / "ramp.png"))[0, :, 0].tolist() == [0, 0, 1, 3, 127, 128, 255, 255]


def test_ferplus_folder_of_16_bit_pngs_loads_the_8_bit_pixels(tmp_path, monkeypatch):
    monkeypatch.setenv("NLA_FAST_CACHE", str(tmp_path / "cache"))
    votes = [[8, 1, 0, 0, 0, 0, 0, 0, 0, 1], [0, 9, 1, 0, 0, 0, 0, 0, 0, 0], [0, 0, 10, 0, 0, 0, 0, 0, 0, 0]]
    fx = make_ferplus_folders(tmp_path / "fer", {"train": votes})
    folder = tmp_path / "fer" / FOLDERS["train"]
    for k, grey in enumerate(fx["train"]):  # the same faces, now 16-bit grey PNGs
        write_png16(folder / f"fer{k:07d}.png", grey.astype(np.uint16) * 257)
    ds = load_dataset("ferplus", fx["root"], "train", verbose=False)
    assert torch.equal(ds.images, torch.from_numpy(np.repeat(fx["train"][..., None], 3, axis=-1)))
