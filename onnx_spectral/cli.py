"""Command line: parse arguments, run the pipeline, write files atomically, map errors to codes.

    onnx-spectral IN.onnx OUT.onnx --calib DATA [--ratio R] [...]
    onnx-spectral analyze IN.onnx [--json]
    onnx-spectral calibrate IN.onnx --calib DATA [--shard I/N] -o STATS.npz
    onnx-spectral merge-stats STATS_1.npz STATS_2.npz ... -o STATS.npz
    onnx-spectral IN.onnx OUT.onnx --stats STATS.npz [--calib DATA for held-out verification]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import onnx

from onnx_spectral.analysis import analyze
from onnx_spectral.api import CompressOptions, calibrate_statistics, compress
from onnx_spectral.calibration.sources import Preprocess
from onnx_spectral.calibration.stats_files import (
    Shard,
    load_statistics,
    merge_statistics,
    save_statistics,
)
from onnx_spectral.errors import (
    DataError,
    GraphError,
    ModelError,
    OptionsError,
    ResourceError,
    RewriteError,
    SpectralError,
    StatisticsError,
    UnsupportedGraphError,
)
from onnx_spectral.graph import atomic
from onnx_spectral.graph.model import load_model
from onnx_spectral.plots import require_matplotlib, write_plots
from onnx_spectral.report import analysis_dict, format_analysis, format_seconds
from onnx_spectral.selection.model_cost import model_cost
from onnx_spectral.selection.widths import ALLOCATIONS

EXIT_CODES: dict[type[SpectralError], int] = {
    OptionsError: 2,
    ModelError: 3,
    GraphError: 3,
    DataError: 4,
    StatisticsError: 4,
    RewriteError: 5,
    UnsupportedGraphError: 6,
    ResourceError: 7,
}
INTERNAL_ERROR = 1
"""Exit code of an unexpected exception (a bug: please report it)."""
INTERRUPTED = 130
"""Exit code after Ctrl-C (128 + SIGINT)."""


class _Parser(argparse.ArgumentParser):
    """argparse with its errors raised as OptionsError: one line, exit code 2."""

    def error(self, message: str) -> NoReturn:
        raise OptionsError(f"{message} (see {self.prog} --help)")


def _compress_parser() -> argparse.ArgumentParser:
    defaults = CompressOptions()
    parser = _Parser(
        prog="onnx-spectral",
        description="Prune the channels of an ONNX model by spectral pruning. "
                    "Use `onnx-spectral analyze IN.onnx` to list its channel groups.")
    parser.add_argument("input", type=Path, help="model to compress (.onnx)")
    parser.add_argument("output", type=Path, help="where to write the compressed model")
    parser.add_argument("--calib",
                        help="calibration data: .npz (one array per input), .npy, a folder of "
                             ".npy/.npz files or of images (see --preprocess), or 'random'; "
                             "with --stats only used for held-out verification")
    parser.add_argument("--stats", type=Path,
                        help="select from saved statistics (onnx-spectral calibrate / "
                             "merge-stats) instead of calibrating")
    parser.add_argument("--ratio", type=float, default=defaults.ratio,
                        help="fraction of channels each prunable group keeps (default %(default)s)")
    parser.add_argument("--theta", type=float, default=defaults.theta,
                        help="1: reconstruct activations; 0: reconstruct the next layer's "
                             "output (default %(default)s)")
    parser.add_argument("--ridge", type=float, default=defaults.ridge,
                        help="relative ridge rho of the channel reconstructions, lambda = "
                             "rho * trace(Sigma)/m (default %(default)s; the layer refit "
                             "chooses its own by cross-validation)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--calib-samples", type=int, default=defaults.calib_samples)
    parser.add_argument("--verify-samples", type=int, default=defaults.verify_samples,
                        help="held-out samples, taken after the calibration samples")
    parser.add_argument("--provider", choices=("auto", "cpu", "cuda"), default=defaults.provider)
    parser.add_argument("--exclude", nargs="+", default=[], metavar="NODE",
                        help="producer nodes whose channel groups stay whole")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--round-to", type=int, default=defaults.round_to,
                        help="round kept widths up to a multiple of this; 0 (default): 8 for "
                             "widths of 32 or more in groups of 64 channels or more, else 1")
    parser.add_argument("--selection", choices=("spectral", "l1", "random"),
                        default=defaults.selection,
                        help="channel choice: spectral (default) or filter L1 norm (baseline)")
    parser.add_argument("--no-reconstruction", action="store_true",
                        help="drop channels without folding a reconstruction (baseline)")
    parser.add_argument("--preprocess", type=Preprocess.parse, default=None,
                        help="for image folders, e.g. 'resize=256,crop=224,"
                             "mean=0.485:0.456:0.406,std=0.229:0.224:0.225'")
    parser.add_argument("--report", type=Path, help="also write the report as JSON here")
    parser.add_argument("--external-data", action="store_true",
                        help="write the tensors to OUT.<digest>.data beside OUT (automatic when "
                             "the input has external data or the tensors exceed 2 GB)")
    parser.add_argument("--allow-unchanged", action="store_true",
                        help="write the model even when no channel group can be pruned "
                             "(default: exit 6 and write nothing)")
    _add_gram_budget(parser, defaults)
    _add_budget_arguments(parser, defaults)
    return parser


def _add_budget_arguments(parser: argparse.ArgumentParser, defaults: CompressOptions) -> None:
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--flops", type=float, default=defaults.flops, metavar="R",
                        help="fraction of the whole model's MACs to keep (overrides --ratio)")
    budget.add_argument("--params", type=float, default=defaults.params, metavar="R",
                        help="fraction of the whole model's parameters to keep "
                             "(overrides --ratio)")
    parser.add_argument("--allocation", choices=ALLOCATIONS, default=defaults.allocation,
                        help="per-group widths under --flops/--params: uniform, dof (degrees of "
                             "freedom of the spectrum) or greedy (loss curve per unit of cost) "
                             "(default %(default)s)")
    parser.add_argument("--min-keep", type=int, default=defaults.min_keep,
                        help="no group keeps fewer channels (default %(default)s)")
    compensation = parser.add_mutually_exclusive_group()
    compensation.add_argument("--compensation", dest="compensation", action="store_true",
                              default=defaults.compensation,
                              help="sequential compensation: reconstruct toward the original "
                                   "model's activations (one extra calibration pass per layer)")
    compensation.add_argument("--no-compensation", dest="compensation", action="store_false")
    parser.add_argument("--compensation-samples", type=int,
                        default=defaults.compensation_samples,
                        help="calibration samples each compensation and refit pass runs "
                             "(default %(default)s)")
    refit = parser.add_mutually_exclusive_group()
    refit.add_argument("--refit", dest="refit", action="store_true", default=defaults.refit,
                       help="refit the Conv/Gemm/MatMul layers downstream of the pruning (whole "
                            "kernels and biases) toward the original's outputs (one extra pass "
                            "per layer; default on)")
    refit.add_argument("--no-refit", dest="refit", action="store_false")
    parser.add_argument("--refit-features", type=int, default=defaults.refit_features,
                        help="layers with more input features (channels x kernel) are not "
                             "refitted: the fit costs rows x features^2 (default %(default)s)")
    parser.add_argument("--affine", action="store_true",
                        help="affine reconstruction: fold a per-channel offset into the sinks' "
                             "biases (compensated layers included)")
    parser.add_argument("--plots", type=Path, metavar="DIR",
                        help="write PNG figures (spectra, widths) here; needs matplotlib")


def _analyze_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="onnx-spectral analyze",
                                     description="List the channel groups of a model.")
    parser.add_argument("input", type=Path, help="model to analyze (.onnx)")
    parser.add_argument("--exclude", nargs="+", default=[], metavar="NODE")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    return parser


def _run_compress(argv: Sequence[str]) -> int:
    args = _compress_parser().parse_args(argv)
    _check_paths(args.input, args.output, args.report)
    if args.plots is not None:
        require_matplotlib()  # fail before anything is written, not after the model
    options = CompressOptions(
        ratio=args.ratio, theta=args.theta, ridge=args.ridge, batch_size=args.batch_size,
        calib_samples=args.calib_samples, verify_samples=args.verify_samples,
        provider=args.provider, exclude=tuple(args.exclude), seed=args.seed,
        round_to=args.round_to, selection=args.selection,
        reconstruct=not args.no_reconstruction, preprocess=args.preprocess,
        progress=sys.stderr.isatty(), require_prunable=not args.allow_unchanged,
        gram_budget=args.gram_budget, flops=args.flops, params=args.params,
        allocation=args.allocation, min_keep=args.min_keep, compensation=args.compensation,
        compensation_samples=args.compensation_samples, affine=args.affine, refit=args.refit,
        refit_features=args.refit_features,
    )
    if args.calib is None and args.stats is None:
        raise OptionsError("give --calib DATA, or --stats STATS.npz written by `onnx-spectral "
                           "calibrate` (see onnx-spectral --help)")
    model, report = compress(args.input, args.calib, options, statistics=args.stats)
    external = args.external_data or _has_external_data(args.input)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    written = atomic.save_model(model, args.output, external_data=external)
    if args.report is not None:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_text(args.report, report.to_json())
    print(report.format())
    print(format_seconds(report.seconds))
    print("wrote " + ", ".join(str(path) for path in written))
    if args.plots is not None:
        for path in write_plots(report, args.plots):
            print(f"wrote {path}")
    return 0


def _has_external_data(path: Path) -> bool:
    try:
        return atomic.uses_external_data(onnx.load(str(path), load_external_data=False))
    except Exception:  # compress read it already; a race is caught by the final checks
        return False


def _check_paths(model: Path, output: Path, report: Path | None) -> None:
    """Refuse, before any work, outputs that would overwrite an input or cannot be written."""
    if output.resolve() == model.resolve():
        raise OptionsError(f"output '{output}' is the input model; give another path")
    if report is not None and report.resolve() in (model.resolve(), output.resolve()):
        raise OptionsError(f"--report '{report}' is the input or the output model; "
                           "give another path")
    for path in (output, report):
        if path is not None:
            _check_writable(path)


def _check_writable(path: Path) -> None:
    if path.is_dir():
        raise OptionsError(f"output '{path}' is a folder; give a file path")
    folder = path.absolute().parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise OptionsError(f"cannot write '{path}': '{folder}' is not a folder")
    try:
        handle, probe = tempfile.mkstemp(dir=folder, prefix=".onnx-spectral-probe.")
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        raise OptionsError(f"cannot write '{path}': folder '{folder}' is not writable "
                           f"({exc.strerror}); give a writable output path") from exc


def _run_analyze(argv: Sequence[str]) -> int:
    args = _analyze_parser().parse_args(argv)
    model = load_model(args.input)
    analysis = analyze(model, args.exclude)
    cost = model_cost(model)
    if args.json:
        print(json.dumps(analysis_dict(analysis, cost), indent=2))
    else:
        print(format_analysis(analysis, cost))
    return 0


def _calibrate_parser() -> argparse.ArgumentParser:
    defaults = CompressOptions()
    parser = argparse.ArgumentParser(
        prog="onnx-spectral calibrate",
        description="Gather channel statistics (or one shard of them) without compressing.")
    parser.add_argument("input", type=Path, help="model to calibrate (.onnx)")
    parser.add_argument("--calib", required=True, help="calibration data, as for compression")
    parser.add_argument("-o", "--output", type=Path, required=True,
                        help="statistics file to write (.npz)")
    parser.add_argument("--shard", type=Shard.parse, default=Shard(1, 1),
                        help="I/N: calibrate the I-th of N contiguous parts (1-based) of the "
                             "first --calib-samples samples")
    parser.add_argument("--calib-samples", type=int, default=defaults.calib_samples)
    parser.add_argument("--verify-samples", type=int, default=defaults.verify_samples,
                        help="as for compression: short data keeps these back from the range")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--provider", choices=("auto", "cpu", "cuda"), default=defaults.provider)
    parser.add_argument("--exclude", nargs="+", default=[], metavar="NODE")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--preprocess", type=Preprocess.parse, default=None)
    _add_gram_budget(parser, defaults)
    return parser


def _add_gram_budget(parser: argparse.ArgumentParser, defaults: CompressOptions) -> None:
    parser.add_argument("--gram-budget", type=float, default=defaults.gram_budget,
                        help="calibration's Gram matrices may cost at most this share of the "
                             "model's MACs; taps whose Gram is dear against the layers reading "
                             "them subsample positions to meet it (0: every position; default "
                             "%(default)s)")


def _run_calibrate(argv: Sequence[str]) -> int:
    args = _calibrate_parser().parse_args(argv)
    options = CompressOptions(batch_size=args.batch_size, calib_samples=args.calib_samples,
                              verify_samples=args.verify_samples, provider=args.provider,
                              exclude=tuple(args.exclude), seed=args.seed,
                              preprocess=args.preprocess, progress=sys.stderr.isatty(),
                              gram_budget=args.gram_budget)
    saved = calibrate_statistics(args.input, args.calib, options, shard=args.shard)
    atomic.write_atomically(args.output, lambda path: save_statistics(path, saved))
    print(f"shard {args.shard}: {saved.statistics.samples} samples, {len(saved.taps)} taps; "
          f"wrote {args.output}")
    return 0


def _run_merge(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="onnx-spectral merge-stats",
                                     description="Add the statistics of calibration shards.")
    parser.add_argument("inputs", type=Path, nargs="+", help="statistics files (.npz)")
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args(argv)
    merged = merge_statistics([load_statistics(path) for path in args.inputs],
                              [str(path) for path in args.inputs])
    atomic.write_atomically(args.output, lambda path: save_statistics(path, merged))
    missing = merged.missing_shards()
    if missing:
        print(f"warning: shards {', '.join(missing)} are missing", file=sys.stderr)
    print(f"{merged.statistics.samples} samples from {len(merged.shards)} shards; "
          f"wrote {args.output}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `onnx-spectral` console script; returns the exit code.

    Every failure prints one line `onnx-spectral: error: ...` to stderr and returns its code
    (EXIT_CODES, INTERNAL_ERROR, INTERRUPTED); nothing is written unless the run succeeds.
    """
    arguments = list(sys.argv[1:] if argv is None else argv)
    try:
        if arguments[:1] == ["analyze"]:
            return _run_analyze(arguments[1:])
        if arguments[:1] == ["calibrate"]:
            return _run_calibrate(arguments[1:])
        if arguments[:1] == ["merge-stats"]:
            return _run_merge(arguments[1:])
        return _run_compress(arguments)
    except SpectralError as exc:
        print(f"onnx-spectral: error: {exc}", file=sys.stderr)
        return next((code for kind, code in EXIT_CODES.items() if isinstance(exc, kind)), 1)
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else 0
    except KeyboardInterrupt:
        print("onnx-spectral: interrupted; no output was written", file=sys.stderr)
        return INTERRUPTED
    except MemoryError:
        print("onnx-spectral: error: out of memory; lower --batch-size or use a larger "
              "machine; no output was written", file=sys.stderr)
        return EXIT_CODES[ResourceError]
    except Exception as exc:  # a bug: one line, the code says so, and nothing was written
        print(f"onnx-spectral: internal error: {type(exc).__name__}: {exc} (please report "
              "this; no output was written)", file=sys.stderr)
        return INTERNAL_ERROR


if __name__ == "__main__":
    sys.exit(main())
