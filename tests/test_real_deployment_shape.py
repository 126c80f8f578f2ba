"""A MAC budget at the shape a real model with symbolic spatial dims runs at.

The PP-OCR text-orientation classifier takes x [-1, 3, ?, ?] and runs on 48 x 192 crops; at
--flops 0.5 it keeps half of its MACs at that size, counted independently (`tests.mac_count`).
"""

from __future__ import annotations

import onnx
import pytest

from models import ppocr
from onnx_spectral import compress
from tests.mac_count import independent_macs

pytestmark = pytest.mark.real


def test_ppocr_classifier_keeps_half_of_its_macs_at_48_by_192() -> None:
    model = onnx.load(str(ppocr.cls_model()))
    crops, _ = ppocr.crop_batch(500, seed=0)
    compressed, report = compress(model, {"x": crops}, flops=0.5, calib_samples=400,
                                  verify_samples=100, provider="cpu")
    shape = {"x": (1, 3, ppocr.HEIGHT, ppocr.WIDTH)}
    before, after = independent_macs(model, shape), independent_macs(compressed, shape)
    print(f"PP-OCR cls --flops 0.5: {after:,} of {before:,} MACs at 48x192 "
          f"({after / before:.4f})")
    assert report.cost_before.input_shapes == shape
    assert report.cost_before.macs == before and report.cost_after.macs == after
    assert 0.48 <= after / before <= 0.5
