import numpy as np
import pytest
from PIL import Image

from anomalyvfm.data import load_dataset, load_rgb
from anomalyvfm.data.transforms import processed_size, to_tensor
from anomalyvfm.errors import ImageReadError, ImageTooLargeError, UserInputError
from helpers import bomb_png


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "I;16", "RGB"])
def test_every_mode_becomes_rgb_uint8(tmp_path, mode):
    rng = np.random.default_rng(0)
    if mode == "I;16":
        image = Image.fromarray((rng.integers(0, 65535, (20, 30))).astype(np.uint16))
    else:
        image = Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).convert(mode)
    path = tmp_path / "x.png"
    image.save(path)
    array = load_rgb(path)
    assert array.shape == (20, 30, 3) and array.dtype == np.uint8
    assert array.std() > 0


def test_sixteen_bit_uses_full_range(tmp_path):
    values = np.array([[0, 65535]], dtype=np.uint16).repeat(4, 0)
    Image.fromarray(values).save(tmp_path / "x.png")
    array = load_rgb(tmp_path / "x.png")
    assert array[0, 0, 0] == 0 and array[0, 1, 0] == 255


@pytest.mark.parametrize("content", [b"", b"not an image at all", None])
def test_bad_files_raise_naming_the_file(tmp_path, content):
    path = tmp_path / "bad.png"
    if content is None:  # truncated PNG
        Image.fromarray(np.zeros((50, 50, 3), np.uint8) + 7).save(path)
        path.write_bytes(path.read_bytes()[:60])
    else:
        path.write_bytes(content)
    with pytest.raises(ImageReadError, match="bad.png"):
        load_rgb(path)


def test_bytes_decode_like_files_and_respect_the_pixel_limit(tmp_path):
    path = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(path)
    np.testing.assert_array_equal(load_rgb(path.read_bytes()), load_rgb(path))
    with pytest.raises(ImageTooLargeError, match="600 pixels, over the limit of 599"):
        load_rgb(path.read_bytes(), max_pixels=599)
    with pytest.raises(ImageReadError, match="truncated"):
        load_rgb(path.read_bytes()[:100])


def test_decompression_bomb_is_an_image_read_error(tmp_path):

    (tmp_path / "bomb.png").write_bytes(bomb_png())
    with pytest.raises(ImageTooLargeError, match="bomb.png: .*decompression bomb"):
        load_rgb(tmp_path / "bomb.png")


def test_processed_size_keeps_aspect_and_patch_multiples():
    h, w = processed_size(1056, 4224, 448, 14)  # 4:1 sheet metal
    assert h % 14 == 0 and w % 14 == 0
    assert abs(w / h - 4.0) < 0.05
    assert abs(min(h, w) - 448) <= 7
    assert to_tensor(np.zeros((100, 400, 3), np.uint8), (112, 448)).shape == (3, 112, 448)


def test_mvtec_ad2_layout(data_root):
    ds = load_dataset(data_root, "demo", "mvtec_ad2")
    assert len(ds.split("train")) == 12 and len(ds.split("validation")) == 5
    test = ds.split("test_public")
    assert sum(s.label for s in test) == 8 and len(test) == 16
    assert all(s.mask_path is not None and s.mask_path.is_file() for s in test if s.label == 1)
    assert all(s.label is None for s in ds.split("test_private"))
    with pytest.raises(UserInputError, match="test_private_mixed"):
        ds.split("test_private_mixed")


def _write(folder, n, value=100):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((16, 16, 3), value, np.uint8)).save(folder / f"{i:03d}.png")


def test_mvtec_ad_layout_holds_out_validation(tmp_path):
    base = tmp_path / "bottle"
    _write(base / "train" / "good", 20)
    _write(base / "test" / "good", 2)
    _write(base / "test" / "broken", 3)
    _write(base / "ground_truth" / "broken", 0)
    for i in range(3):
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(base / "ground_truth" / "broken" / f"{i:03d}_mask.png")
    ds = load_dataset(tmp_path, "bottle", "mvtec_ad")
    train, val = ds.split("train"), ds.split("validation")
    assert len(train) == 18 and len(val) == 2 and not {s.path for s in train} & {s.path for s in val}
    assert [s.defect_type for s in ds.split("test")].count("broken") == 3
    assert all(s.mask_path for s in ds.split("test") if s.label == 1)


def test_folder_layout(tmp_path):
    _write(tmp_path / "good", 10)
    _write(tmp_path / "bad", 2, value=0)
    ds = load_dataset(tmp_path, None, "folder")
    assert len(ds.split("train")) == 9 and len(ds.split("validation")) == 1
    assert [s.label for s in ds.split("test")] == [1, 1]


def test_missing_and_empty_inputs_are_user_errors(tmp_path, data_root):
    with pytest.raises(UserInputError, match="unknown category 'nope'"):
        load_dataset(data_root, "nope")
    with pytest.raises(UserInputError, match="no such data folder"):
        load_dataset(tmp_path / "missing", "demo")
    (tmp_path / "empty" / "train" / "good").mkdir(parents=True)
    with pytest.raises(UserInputError, match="no images found"):
        load_dataset(tmp_path, "empty")
    with pytest.raises(UserInputError, match="layout"):
        load_dataset(tmp_path, "empty", "coco")
