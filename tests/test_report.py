"""The report (table, JSON, plots) on every kind of channel group, and the CLI's output
bookkeeping: a finished compression is never lost to reporting.

Kinds of group: a prunable Conv group, a derived Concat group (no producer of its own), the
pieces of a Split (no producer, no parts), a Concat of a conv and a graph input (an untracked
part), a group frozen by a barrier, a group frozen because it is a graph output.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnx_spectral import compress
from onnx_spectral.cli import main
from onnx_spectral.cost import ModelCost
from onnx_spectral.report import GroupReport, Report
from tests import graphs, graphs_coverage
from tests.graphs import GraphBuilder

FAST = {"calib_samples": 24, "verify_samples": 8, "provider": "cpu"}


def concat_with_input(seed: int = 0) -> onnx.ModelProto:
    """x [N,3,8,8] -> Conv 'conv1' (4) -> Concat 'cat' (with x itself) -> Conv 'conv2' (5) -> y

    The Concat group has an untracked part: the graph input's 3 channels.
    """
    b = GraphBuilder(seed)
    cat = b.node("Concat", [b.conv("x", "conv1", 3, 4), "x"], "cat", axis=1)
    b.conv(cat, "conv2", 7, 5)
    return b.model([("x", ["N", 3, 8, 8])], [("conv2", ["N", 5, 8, 8])])


def _group(id: int, producers: tuple[str, ...] = (), parts: tuple = (),
           frozen: tuple[str, ...] = (), spectrum: tuple[float, ...] = (),
           dof: float | None = None) -> GroupReport:
    return GroupReport(id=id, producers=producers, channels=6, kept=3 if not frozen else 6,
                       heldout_error=None, frozen=frozen, spectrum=spectrum, dof=dof,
                       parts=parts)


def test_origin_and_status_of_every_kind_of_group() -> None:
    assert _group(0, ("conv1",)).origin == "conv1"
    assert _group(0, ("conv0", "conv2", "conv4")).origin == "conv0 (+2)"
    assert _group(1, parts=((0, 0, 4), (2, 4, 2))).origin == "concat/split of 0, 2"
    assert _group(1, parts=((0, 0, 4), (None, 4, 2))).origin == "concat/split of 0, ?"
    assert _group(1, ("cv1",), parts=((1, 0, 3), (2, 3, 5))).origin == "cv1 (parts 1, 2)"
    assert _group(2).origin == "-"
    assert _group(2).status == "pruned"
    assert _group(3, frozen=("graph output 'y'", "other")).status == "frozen: graph output 'y'"


def test_synthetic_report_formats_and_plots_groups_without_producers(tmp_path: Path) -> None:
    report = Report(
        groups=(_group(0, ("conv1",), spectrum=(0.7, 0.3), dof=1.5),
                _group(1, spectrum=(0.9, 0.1)),  # a Split piece: no producer, no dof
                _group(2, parts=((0, 0, 3), (1, 3, 3)), spectrum=(0.5, 0.5)),
                _group(3, frozen=("graph output 'y'",))),
        cost_before=ModelCost(100, 1000, {}), cost_after=ModelCost(50, 500, {}),
        calibration_samples=24, verification=None, options={}, seconds={"load": 0.1})
    lines = report.format().splitlines()
    rows = {line.split()[0]: line for line in lines[1:5]}
    assert rows["1"].split()[1] == "-" and "pruned" in rows["1"]
    assert "concat/split of 0, 1" in rows["2"]
    assert rows["3"].endswith("frozen: graph output 'y'")
    assert "parameters: 100 -> 50 (50.0% kept)" in lines
    assert json.loads(report.to_json())["groups"][2]["parts"] == [[0, 0, 3], [1, 3, 3]]
    pytest.importorskip("matplotlib")
    from onnx_spectral.plots import write_plots

    written = write_plots(report, tmp_path / "plots")
    assert [path.name for path in written] == ["spectra.png", "widths.png"]
    assert all(path.stat().st_size > 1000 for path in written)


@pytest.mark.parametrize("build", [
    graphs_coverage.c2f, graphs.concat_channels, concat_with_input,
    graphs.conv_output_is_graph_output, lambda: graphs.conv_sandwich(graphs.lrn),
    graphs.residual_block,
], ids=["c2f", "concat", "concat_with_input", "graph_output", "barrier", "residual"])
def test_cli_reports_every_kind_of_group(build, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """Table, JSON and plots for each graph; every group has a row and a JSON entry."""
    pytest.importorskip("matplotlib")
    model = build()
    onnx.save_model(model, str(tmp_path / "in.onnx"))
    out, report_path, plots = tmp_path / "out.onnx", tmp_path / "r.json", tmp_path / "plots"
    code = main([str(tmp_path / "in.onnx"), str(out), "--calib", "random", "--calib-samples",
                 "24", "--verify-samples", "8", "--provider", "cpu", "--allow-unchanged",
                 "--report", str(report_path), "--plots", str(plots)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    groups = json.loads(report_path.read_text())["groups"]
    table = printed.out.split("\n\n")[0].splitlines()
    assert len(table) == 1 + len(groups)
    for row, group in zip(table[1:], groups, strict=True):
        assert row.split()[0] == str(group["id"])
        assert ("frozen: " in row) == bool(group["frozen"])
        ids = ", ".join("?" if part[0] is None else str(part[0]) for part in group["parts"])
        if group["parts"] and group["producers"]:
            assert f"{group['producers'][0]} (parts {ids})" in row
        elif group["parts"]:
            assert f"concat/split of {ids}" in row
    assert sorted(path.name for path in plots.iterdir()) == ["spectra.png", "widths.png"]


def test_c2f_report_names_the_split_pieces_and_the_concatenation() -> None:
    _, report = compress(graphs_coverage.c2f(), "random", **FAST)
    by_id = {group.id: group for group in report.groups}
    pieces = [group for group in report.groups if not group.producers and not group.parts]
    assert [group.channels for group in pieces] == [3, 5]
    assert all(group.origin == "-" for group in pieces)
    (concat,) = [group for group in report.groups if group.parts and not group.producers]
    assert concat.channels == 13
    assert concat.origin == "concat/split of " + ", ".join(str(p[0]) for p in concat.parts)
    assert by_id[concat.parts[0][0]].channels == 3
    assert report.format().count("\n") >= len(report.groups)


def test_concat_with_a_graph_input_marks_the_untracked_part() -> None:
    _, report = compress(concat_with_input(), "random", **FAST)
    (concat,) = [group for group in report.groups if group.parts]
    assert [part[0] is None for part in concat.parts] == [False, True]
    assert concat.origin.endswith(", ?")
    assert f"{concat.channels} -> {concat.kept}" in report.format()


def _cli(tmp_path: Path, *extra: str) -> list[str]:
    onnx.save_model(graphs.conv_sandwich(graphs.unary("Relu")), str(tmp_path / "in.onnx"))
    return [str(tmp_path / "in.onnx"), str(tmp_path / "out.onnx"), "--calib", "random",
            "--calib-samples", "24", "--verify-samples", "8", "--provider", "cpu", *extra]


def test_failure_after_the_model_says_what_was_written(tmp_path: Path, monkeypatch,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    """Plots fail after the model and the JSON report are written: both stay, and the error
    line says so and names what was not written."""
    pytest.importorskip("matplotlib")

    def broken(*args: object) -> list[Path]:
        raise ValueError("no figure")

    monkeypatch.setattr("onnx_spectral.cli.write_plots", broken)
    report, plots = tmp_path / "r.json", tmp_path / "plots"
    code = main(_cli(tmp_path, "--report", str(report), "--plots", str(plots)))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1
    assert f"wrote {tmp_path / 'out.onnx'}, {report}; not written: {plots}" in err[0]
    assert "no output was written" not in err[0]
    onnx.checker.check_model(onnx.load(str(tmp_path / "out.onnx")))
    assert json.loads(report.read_text())["groups"]


def test_failure_writing_the_report_keeps_the_model(tmp_path: Path, monkeypatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    def full_disk(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("onnx_spectral.graph.atomic.write_text", full_disk)
    report = tmp_path / "r.json"
    assert main(_cli(tmp_path, "--report", str(report))) == 1
    err = capsys.readouterr().err
    assert f"wrote {tmp_path / 'out.onnx'}; not written: {report}" in err
    assert (tmp_path / "out.onnx").exists() and not report.exists()


def test_report_is_formatted_before_anything_is_written(tmp_path: Path, monkeypatch,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    def broken(self: Report) -> str:
        raise IndexError("tuple index out of range")

    monkeypatch.setattr(Report, "format", broken)
    assert main(_cli(tmp_path)) == 1
    assert "no output was written" in capsys.readouterr().err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["in.onnx"]


@pytest.mark.parametrize("how", ["flag", "variable", "none"])
def test_debug_prints_the_traceback_of_an_internal_error(
        how: str, tmp_path: Path, monkeypatch, capsys: pytest.CaptureFixture[str]) -> None:
    def explode(*args: object, **kwargs: object) -> None:
        raise ValueError("boom")

    monkeypatch.setattr("onnx_spectral.api.rewrite", explode)
    monkeypatch.delenv("ONNX_SPECTRAL_DEBUG", raising=False)
    if how == "variable":
        monkeypatch.setenv("ONNX_SPECTRAL_DEBUG", "1")
    assert main(_cli(tmp_path, *(["--debug"] if how == "flag" else []))) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("onnx-spectral: internal error: ValueError: boom")
    if how == "none":
        assert len(err) == 1
        assert "rerun with --debug or ONNX_SPECTRAL_DEBUG=1 for the traceback" in err[0]
    else:
        assert err[0] == "Traceback (most recent call last):"
        assert any("in explode" in line for line in err)
        assert "rerun with --debug" not in err[-1]


def test_options_errors_name_the_keyword_in_the_api_and_the_flag_on_the_cli(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(Exception, match=r"^min_keep=0: must be >= 1$"):
        compress(graphs.conv_sandwich(), "random", min_keep=0)
    with pytest.raises(Exception, match=r"^unknown option 'ratios'"):
        compress(graphs.conv_sandwich(), "random", ratios=0.5)
    with pytest.raises(Exception, match=r"^gram_budget=-1.0: must be >= 0$"):
        compress(graphs.conv_sandwich(), "random", gram_budget=-1.0)
    assert main(_cli(tmp_path, "--min-keep", "0")) == 2
    assert capsys.readouterr().err.strip() == "onnx-spectral: error: --min-keep 0: must be >= 1"


def test_every_cli_option_reaches_compress_options(tmp_path: Path, monkeypatch) -> None:
    """Each flag sets its field: non-default values on the command line arrive in
    CompressOptions (the CLI is derived from the fields)."""
    seen = {}

    def fake_compress(model: object, data: object, options: object, **kwargs: object):
        seen["options"] = options
        raise KeyboardInterrupt

    monkeypatch.setattr("onnx_spectral.cli.compress", fake_compress)
    args = ["--ratio", "0.3", "--theta", "0.2", "--ridge", "0.01", "--batch-size", "4",
            "--calib-samples", "12", "--verify-samples", "3", "--provider", "cpu",
            "--exclude", "a", "b", "--seed", "5", "--round-to", "2", "--selection", "l1",
            "--no-reconstruction", "--allow-unchanged", "--gram-budget", "0", "--flops", "0.4",
            "--allocation", "dof", "--min-keep", "2", "--no-compensation", "--affine",
            "--compensation-samples", "7", "--no-refit", "--refit-features", "9"]
    onnx.save_model(graphs.conv_sandwich(), str(tmp_path / "in.onnx"))
    assert main([str(tmp_path / "in.onnx"), str(tmp_path / "o.onnx"), "--calib", "random",
                 *args]) == 130
    options = seen["options"]
    expected = dict(ratio=0.3, theta=0.2, ridge=0.01, batch_size=4, calib_samples=12,
                    verify_samples=3, provider="cpu", exclude=("a", "b"), seed=5, round_to=2,
                    selection="l1", reconstruct=False, require_prunable=False, gram_budget=0.0,
                    flops=0.4, allocation="dof", min_keep=2, compensation=False, affine=True,
                    compensation_samples=7, refit=False, refit_features=9)
    assert {name: getattr(options, name) for name in expected} == expected
    assert np.isclose(options.plan_options().rho, 0.01)
