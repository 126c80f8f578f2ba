"""Tests of onnx_spectral.calibration.sources: every source, re-batching, validation errors,
preprocessing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from onnx_spectral.calibration.sources import (
    FeedDict,
    InputSpec,
    Preprocess,
    SampleStream,
    batching_problem,
    fixed_batch_size,
    model_input_specs,
    open_calibration,
    split_counts,
)
from onnx_spectral.errors import DataError, OptionsError

Shape = list[int | str | None]


def _model(*inputs: tuple[str, int, Shape]) -> onnx.ModelProto:
    """A graph that returns each input through Identity; one extra initializer-input 'w'."""
    values = [helper.make_tensor_value_info(name, kind, shape) for name, kind, shape in inputs]
    weight = helper.make_tensor("w", TensorProto.FLOAT, [1], [0.0])
    weight_input = helper.make_tensor_value_info("w", TensorProto.FLOAT, [1])
    nodes = [helper.make_node("Identity", [name], [f"{name}_out"]) for name, _, _ in inputs]
    outputs = [
        helper.make_tensor_value_info(f"{name}_out", kind, shape) for name, kind, shape in inputs
    ]
    graph = helper.make_graph(nodes, "g", [*values, weight_input], outputs, [weight])
    return helper.make_model(graph)


def _specs(*inputs: tuple[str, int, Shape]) -> tuple[InputSpec, ...]:
    return model_input_specs(_model(*inputs))


TWO_INPUTS = _specs(("x", TensorProto.FLOAT, ["N", 3, 2, 2]), ("ids", TensorProto.INT64, ["N", 4]))
ONE_INPUT = _specs(("x", TensorProto.FLOAT, ["N", 5]))


def _two_input_data(n: int, start: int = 0) -> FeedDict:
    x = np.arange(start * 12, (start + n) * 12, dtype=np.float32).reshape(n, 3, 2, 2)
    ids = np.arange(start * 4, (start + n) * 4, dtype=np.int64).reshape(n, 4)
    return {"x": x, "ids": ids}


def _save_npz(path: Path, data: FeedDict) -> None:
    np.savez(path, allow_pickle=False, **data)


def _concat(batches: list[FeedDict]) -> FeedDict:
    return {name: np.concatenate([b[name] for b in batches]) for name in batches[0]}


def _sizes(batches: list[FeedDict]) -> list[int]:
    return [len(next(iter(b.values()))) for b in batches]


def _assert_feeds_equal(got: FeedDict, expected: FeedDict) -> None:
    assert set(got) == set(expected)
    for name, array in expected.items():
        assert got[name].dtype == array.dtype
        np.testing.assert_array_equal(got[name], array)


# --------------------------------------------------------------------------------------------
# Specs


def test_model_input_specs_skips_initializers_and_marks_dynamic_dims() -> None:
    specs = _specs(("x", TensorProto.FLOAT, ["N", 3, None, 8]), ("m", TensorProto.INT32, [1, 4]))
    assert specs == (
        InputSpec("x", np.dtype(np.float32), (None, 3, None, 8)),
        InputSpec("m", np.dtype(np.int32), (1, 4)),
    )


def test_fixed_batch_size() -> None:
    assert fixed_batch_size(TWO_INPUTS) is None
    assert fixed_batch_size(_specs(("x", TensorProto.FLOAT, [1, 3]))) == 1
    mixed = _specs(("a", TensorProto.FLOAT, [1, 3]), ("b", TensorProto.FLOAT, [2, 3]))
    assert fixed_batch_size(mixed) is None  # no common batch: the model is fed runs
    assert batching_problem(mixed) == "the inputs' fixed axes 0 differ {'a': 1, 'b': 2}"


# --------------------------------------------------------------------------------------------
# Files


@pytest.mark.parametrize("batch_size", [1, 3, 7])
def test_npz_round_trip_rebatches(tmp_path: Path, batch_size: int) -> None:
    data = _two_input_data(10)
    _save_npz(tmp_path / "d.npz", data)
    stream = open_calibration(tmp_path / "d.npz", TWO_INPUTS)
    assert stream.known_length == 10
    batches = list(stream.take(10, batch_size))
    assert _sizes(batches) == [batch_size] * (10 // batch_size) + [10 % batch_size] * (
        10 % batch_size > 0
    )
    _assert_feeds_equal(_concat(batches), data)


def test_take_continues_where_the_previous_stopped(tmp_path: Path) -> None:
    data = _two_input_data(10)
    _save_npz(tmp_path / "d.npz", data)
    stream = open_calibration(str(tmp_path / "d.npz"), TWO_INPUTS)
    first = list(stream.take(4, 3))
    second = list(stream.take(100, 5))
    assert _sizes(first) == [3, 1]
    assert _sizes(second) == [5, 1]
    _assert_feeds_equal(_concat(first), _two_input_data(4))
    _assert_feeds_equal(_concat(second), _two_input_data(6, start=4))
    assert list(stream.take(5, 5)) == []


def test_take_rejects_bad_arguments() -> None:
    stream = open_calibration({"x": np.zeros((2, 5), np.float32)}, ONE_INPUT)
    with pytest.raises(OptionsError, match="batch_size"):
        stream.take(2, 0)


def test_folder_of_npz_is_read_in_name_order_one_file_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _save_npz(tmp_path / "b.npz", _two_input_data(6, start=4))
    _save_npz(tmp_path / "a.npz", _two_input_data(4))
    (tmp_path / "notes.txt").write_text("ignored")
    loads: list[str] = []
    real_load = np.load

    def counting_load(path: Path, **options: Any) -> Any:
        loads.append(Path(path).name)
        return real_load(path, **options)

    monkeypatch.setattr(np, "load", counting_load)
    stream = open_calibration(tmp_path, TWO_INPUTS)
    assert stream.known_length == 10
    assert loads == []
    first = list(stream.take(3, 3))
    assert loads == ["a.npz"]
    rest = list(stream.take(10, 4))
    assert loads == ["a.npz", "b.npz"]
    assert _sizes(rest) == [4, 3]
    _assert_feeds_equal(_concat(first + rest), _two_input_data(10))


def test_npy_file_and_folder_for_single_input(tmp_path: Path) -> None:
    x = np.arange(35, dtype=np.float32).reshape(7, 5)
    np.save(tmp_path / "x.npy", x)
    stream = open_calibration(tmp_path / "x.npy", ONE_INPUT)
    assert stream.known_length == 7
    _assert_feeds_equal(_concat(list(stream.take(7, 2))), {"x": x})
    folder = tmp_path / "batches"
    folder.mkdir()
    np.save(folder / "0.npy", x[:3])
    np.save(folder / "1.npy", x[3:])
    _assert_feeds_equal(_concat(list(open_calibration(folder, ONE_INPUT).take(9, 4))), {"x": x})


def test_npy_for_a_two_input_model_is_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((2, 3, 2, 2), np.float32))
    with pytest.raises(DataError, match=r"x\.npy.*single-input.*'x', 'ids'"):
        open_calibration(tmp_path / "x.npy", TWO_INPUTS)


def test_lossless_kind_casts(tmp_path: Path) -> None:
    data = _two_input_data(3)
    np.savez(tmp_path / "d.npz", x=data["x"].astype(np.float64), ids=data["ids"].astype(np.int32))
    batch = next(open_calibration(tmp_path / "d.npz", TWO_INPUTS).take(3, 3))
    _assert_feeds_equal(batch, data)


def test_integer_values_that_do_not_fit_are_refused() -> None:
    specs = _specs(("m", TensorProto.INT32, ["N", 1]))
    stream = open_calibration({"m": np.array([[2**40]], np.int64)}, specs)
    with pytest.raises(DataError, match="'m'.*int32"):
        list(stream.take(1, 1))


# --------------------------------------------------------------------------------------------
# In-memory sources


def _three_feeds() -> list[dict[str, np.ndarray]]:
    """Batches of 3, 1 (without its batch axis) and 2 samples: 6 samples in all."""
    data = _two_input_data(6)
    return [
        {name: a[:3] for name, a in data.items()},
        {name: a[3] for name, a in data.items()},
        {name: a[4:] for name, a in data.items()},
    ]


class _Reader:
    """onnxruntime.quantization.CalibrationDataReader look-alike."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._feeds = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def _generator() -> Iterator[dict[str, np.ndarray]]:
    yield from _three_feeds()


@pytest.mark.parametrize(
    ("source", "known"),
    [(_Reader(_three_feeds()), None), (_generator(), None), (_three_feeds(), 6)],
    ids=["reader", "generator", "list"],
)
def test_feed_dict_streams_rebatch(source: object, known: int | None) -> None:
    stream = open_calibration(source, TWO_INPUTS)  # type: ignore[arg-type]
    assert stream.known_length == known
    batches = list(stream.take(10, 4))
    assert _sizes(batches) == [4, 2]
    _assert_feeds_equal(_concat(batches), _two_input_data(6))


def test_dict_source() -> None:
    data = _two_input_data(5)
    stream = open_calibration(data, TWO_INPUTS)
    assert stream.known_length == 5
    _assert_feeds_equal(_concat(list(stream.take(5, 2))), data)


def test_generator_is_checked_on_first_feed_not_at_open() -> None:
    def bad() -> Iterator[dict[str, np.ndarray]]:
        yield {"x": np.zeros((2, 5), np.float32), "y": np.zeros((2, 5), np.float32)}

    stream = open_calibration(bad(), ONE_INPUT)
    with pytest.raises(DataError, match=r"feed dict 0: unknown name\(s\) \['y'\]"):
        next(stream.take(2, 2))


# --------------------------------------------------------------------------------------------
# Random


def test_random_is_deterministic_loud_and_shaped() -> None:
    with pytest.warns(UserWarning, match="MEANINGLESS"):
        stream = open_calibration("random", TWO_INPUTS, seed=3)
    assert stream.known_length is None
    batches = list(stream.take(150, 50))
    assert _sizes(batches) == [50, 50, 50]
    whole = _concat(batches)
    assert whole["x"].shape == (150, 3, 2, 2) and whole["x"].dtype == np.float32
    assert whole["ids"].shape == (150, 4) and not whole["ids"].any()
    assert 0.9 < whole["x"].std() < 1.1
    with pytest.warns(UserWarning):
        same = _concat(list(open_calibration("random", TWO_INPUTS, seed=3).take(150, 7)))
        other = next(open_calibration("random", TWO_INPUTS, seed=4).take(150, 150))
    _assert_feeds_equal(same, whole)
    assert not np.array_equal(other["x"], whole["x"])


def test_random_refuses_dynamic_non_batch_dims() -> None:
    specs = _specs(("tokens", TensorProto.FLOAT, ["N", "seq", 8]))
    with pytest.raises(DataError, match="'tokens' axis 1 is dynamic.*give real data"):
        open_calibration("random", specs)


# --------------------------------------------------------------------------------------------
# Validation errors


@pytest.mark.parametrize(
    ("data", "pattern"),
    [
        (
            {**_two_input_data(2), "extra": np.zeros(2)},
            r"unknown name\(s\) \['extra'\].*model's inputs are \['x', 'ids'\]",
        ),
        ({"x": _two_input_data(2)["x"]}, r"missing input\(s\) \['ids'\]"),
        (
            {**_two_input_data(2), "ids": np.zeros((2, 4), np.float32)},
            "input 'ids' has dtype float32, expected int64",
        ),
        (
            {**_two_input_data(2), "x": np.zeros((2, 3, 2, 5), np.float32)},
            "input 'x' axis 3 has size 5, expected 2",
        ),
        (
            {**_two_input_data(2), "ids": np.zeros((3, 4), np.int64)},
            r"different numbers of samples \{'x': 2, 'ids': 3\}",
        ),
    ],
    ids=["unknown", "missing", "dtype", "static-dim", "sample-count"],
)
def test_validation_errors_name_the_input(
    tmp_path: Path, data: dict[str, np.ndarray], pattern: str
) -> None:
    with pytest.raises(DataError, match=pattern):
        open_calibration(data, TWO_INPUTS)
    _save_npz(tmp_path / "bad.npz", data)
    with pytest.raises(DataError, match=rf"bad\.npz.*{pattern}"):
        open_calibration(tmp_path / "bad.npz", TWO_INPUTS)


def test_path_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.npz' does not exist; accepted: a \.npz"):
        open_calibration(tmp_path / "nope.npz", TWO_INPUTS)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="empty' holds no .npy/.npz or image files"):
        open_calibration(empty, TWO_INPUTS)
    (empty / "a.txt").write_text("x")
    with pytest.raises(DataError, match="empty' holds no"):
        open_calibration(empty, TWO_INPUTS)
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"cannot read '.*broken\.npz'"):
        open_calibration(tmp_path / "broken.npz", TWO_INPUTS)


def test_preprocess_is_refused_for_non_image_sources() -> None:
    with pytest.raises(OptionsError, match="image folders only"):
        open_calibration(_two_input_data(2), TWO_INPUTS, preprocess=Preprocess())


# --------------------------------------------------------------------------------------------
# split_counts


@pytest.mark.parametrize(
    ("length", "expected"),
    [(None, (512, 128)), (1000, (512, 128)), (640, (512, 128)), (100, (80, 20)), (3, (3, 0))],
)
def test_split_counts(length: int | None, expected: tuple[int, int]) -> None:
    assert split_counts(length, 512, 128) == expected


def test_split_counts_needs_a_calibration_sample() -> None:
    with pytest.raises(DataError, match="holds 0 samples"):
        split_counts(0, 512, 128)
    with pytest.raises(OptionsError):
        split_counts(10, 0, 5)


# --------------------------------------------------------------------------------------------
# Images


def _rgb_pixels(height: int, width: int) -> np.ndarray:
    """(H, W, 3) uint8 with distinct values per pixel and channel."""
    return (np.arange(height * width * 3).reshape(height, width, 3) * 7 % 256).astype(np.uint8)


def test_rgb_nchw_crop_scale_mean_std(tmp_path: Path) -> None:
    pixels = _rgb_pixels(6, 8)
    Image.fromarray(pixels).save(tmp_path / "b.png")
    Image.fromarray(pixels[::-1].copy()).save(tmp_path / "a.png")
    specs = _specs(("img", TensorProto.FLOAT, ["N", 3, 4, 4]))
    mean, std = np.array([0.5, 0.25, 0.1]), np.array([0.2, 0.4, 0.8])
    preprocess = Preprocess(resize=6, mean=tuple(mean), std=tuple(std), scale=0.01)
    stream = open_calibration(tmp_path, specs, preprocess=preprocess)
    assert stream.known_length == 2
    batch = next(stream.take(2, 2))["img"]
    assert batch.shape == (2, 3, 4, 4) and batch.dtype == np.float32
    expected = ((pixels[1:5, 2:6] * 0.01 - mean) / std).transpose(2, 0, 1)
    np.testing.assert_allclose(batch[1], expected, rtol=1e-6)
    np.testing.assert_allclose(
        batch[0], ((pixels[::-1][1:5, 2:6] * 0.01 - mean) / std).transpose(2, 0, 1), rtol=1e-6
    )


def test_gray_nhwc_default_preprocess(tmp_path: Path) -> None:
    pixels = _rgb_pixels(4, 4)[:, :, 0]
    Image.fromarray(pixels).save(tmp_path / "0.png")
    specs = _specs(("img", TensorProto.FLOAT, ["N", 4, 4, 1]))
    batch = next(open_calibration(tmp_path, specs).take(1, 1))["img"]
    np.testing.assert_allclose(batch, pixels[None, :, :, None] / 255, rtol=1e-6)


def test_bgr_nhwc_and_default_resize_covers_the_crop(tmp_path: Path) -> None:
    pixels = _rgb_pixels(8, 12)
    Image.fromarray(pixels).save(tmp_path / "0.png")
    specs = _specs(("img", TensorProto.FLOAT, ["N", 4, 4, 3]))
    batch = next(open_calibration(tmp_path, specs, preprocess=Preprocess(color="bgr")).take(1, 1))
    resized = np.asarray(Image.fromarray(pixels).resize((6, 4), Image.Resampling.BILINEAR))
    expected = resized[:, 1:5, ::-1] / 255
    np.testing.assert_allclose(batch["img"][0], expected, rtol=1e-6)


def test_uint8_image_input_gets_raw_pixels(tmp_path: Path) -> None:
    pixels = _rgb_pixels(4, 4)
    Image.fromarray(pixels).save(tmp_path / "0.png")
    specs = _specs(("img", TensorProto.UINT8, [1, 3, 4, 4]))
    batch = next(open_calibration(tmp_path, specs).take(1, 1))["img"]
    assert batch.dtype == np.uint8
    np.testing.assert_array_equal(batch[0], pixels.transpose(2, 0, 1))


def test_image_errors(tmp_path: Path) -> None:
    Image.fromarray(_rgb_pixels(4, 4)).save(tmp_path / "0.png")
    four_channels = _specs(("img", TensorProto.FLOAT, ["N", 4, 8, 8]))
    with pytest.raises(DataError, match="'img'.*4 channels"):
        open_calibration(tmp_path, four_channels)
    dynamic = _specs(("img", TensorProto.FLOAT, ["N", 3, "H", "W"]))
    with pytest.raises(DataError, match="'img'.*give preprocess crop"):
        open_calibration(tmp_path, dynamic)
    small = _specs(("img", TensorProto.FLOAT, ["N", 3, 8, 8]))
    stream = open_calibration(tmp_path, small, preprocess=Preprocess(resize=4))
    with pytest.raises(DataError, match=r"0\.png' is .* smaller than the crop"):
        next(stream.take(1, 1))


# --------------------------------------------------------------------------------------------
# Preprocess.parse


def test_preprocess_parse_reads_every_key() -> None:
    text = (
        "resize=256,crop=224x200,mean=0.485:0.456:0.406,std=0.5,scale=1/255,layout=NHWC,color=bgr"
    )
    assert Preprocess.parse(text) == Preprocess(
        resize=256,
        crop=(224, 200),
        mean=(0.485, 0.456, 0.406),
        std=(0.5,),
        scale=1 / 255,
        layout="nhwc",
        color="bgr",
    )
    assert Preprocess.parse("crop=32") == Preprocess(crop=(32, 32))
    assert Preprocess.parse("") == Preprocess()


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("size=3", "unknown preprocess key 'size'; accepted keys: resize, crop, mean"),
        ("resize", "'resize' is not key=value"),
        ("resize=abc", "resize='abc' cannot be read; expected a positive integer"),
        ("resize=0", "resize=0 is invalid"),
        ("crop=1x2x3", "crop=.* is invalid"),
        ("std=1:0:1", "std=.* is invalid"),
        ("layout=nhcw", "layout='nhcw' is invalid; expected nchw or nhwc"),
        ("color=cmyk", "color='cmyk' is invalid"),
        ("scale=1/0", "scale='1/0' cannot be read"),
        ("resize=1,resize=2", "'resize' is given twice"),
    ],
)
def test_preprocess_parse_errors(text: str, pattern: str) -> None:
    with pytest.raises(OptionsError, match=pattern):
        Preprocess.parse(text)


def test_stream_from_chunks_directly() -> None:
    stream = SampleStream([{"x": np.ones((2, 5), np.float64)}], ONE_INPUT, 2)
    batch = next(stream.take(2, 2))
    assert batch["x"].dtype == np.float32 and batch["x"].shape == (2, 5)
