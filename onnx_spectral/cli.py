"""Command line: parse arguments, run the pipeline, write files atomically, map errors to codes.

    onnx-spectral IN.onnx OUT.onnx --calib DATA [--ratio R] [...]
    onnx-spectral analyze IN.onnx [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import onnx

from .analysis import analyze
from .api import CompressOptions, compress
from .cost import model_cost
from .data import Preprocess
from .errors import (
    DataError,
    GraphError,
    ModelError,
    OptionsError,
    RewriteError,
    SpectralError,
    StatisticsError,
)
from .graph import load_model
from .plots import write_plots
from .report import analysis_dict, format_analysis
from .widths import ALLOCATIONS

EXIT_CODES: dict[type[SpectralError], int] = {
    OptionsError: 2,
    ModelError: 3,
    GraphError: 3,
    DataError: 4,
    StatisticsError: 4,
    RewriteError: 5,
}


def _compress_parser() -> argparse.ArgumentParser:
    defaults = CompressOptions()
    parser = argparse.ArgumentParser(
        prog="onnx-spectral",
        description="Prune the channels of an ONNX model by spectral pruning. "
                    "Use `onnx-spectral analyze IN.onnx` to list its channel groups.")
    parser.add_argument("input", type=Path, help="model to compress (.onnx)")
    parser.add_argument("output", type=Path, help="where to write the compressed model")
    parser.add_argument("--calib", required=True,
                        help="calibration data: .npz (one array per input), .npy, a folder of "
                             ".npy/.npz files or of images (see --preprocess), or 'random'")
    parser.add_argument("--ratio", type=float, default=defaults.ratio,
                        help="fraction of channels each prunable group keeps (default %(default)s)")
    parser.add_argument("--theta", type=float, default=defaults.theta,
                        help="1: reconstruct activations; 0: reconstruct the next layer's "
                             "output (default %(default)s)")
    parser.add_argument("--ridge", type=float, default=defaults.ridge,
                        help="relative ridge rho, lambda = rho * trace(Sigma)/m "
                             "(default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--calib-samples", type=int, default=defaults.calib_samples)
    parser.add_argument("--verify-samples", type=int, default=defaults.verify_samples,
                        help="held-out samples, taken after the calibration samples")
    parser.add_argument("--provider", choices=("auto", "cpu", "cuda"), default=defaults.provider)
    parser.add_argument("--exclude", nargs="+", default=[], metavar="NODE",
                        help="producer nodes whose channel groups stay whole")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--round-to", type=int, default=defaults.round_to,
                        help="round kept widths up to a multiple of this")
    parser.add_argument("--selection", choices=("spectral", "l1", "random"),
                        default=defaults.selection,
                        help="channel choice: spectral (default) or filter L1 norm (baseline)")
    parser.add_argument("--no-reconstruction", action="store_true",
                        help="drop channels without folding a reconstruction (baseline)")
    parser.add_argument("--preprocess", type=Preprocess.parse, default=None,
                        help="for image folders, e.g. 'resize=256,crop=224,"
                             "mean=0.485:0.456:0.406,std=0.229:0.224:0.225'")
    parser.add_argument("--report", type=Path, help="also write the report as JSON here")
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
                        help="calibration samples each compensation pass runs "
                             "(default %(default)s)")
    parser.add_argument("--affine", action="store_true",
                        help="affine reconstruction: fold a per-channel offset into the sinks' "
                             "biases (layers not reconstructed by --compensation)")
    parser.add_argument("--plots", type=Path, metavar="DIR",
                        help="write PNG figures (spectra, widths) here; needs matplotlib")


def _analyze_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onnx-spectral analyze",
                                     description="List the channel groups of a model.")
    parser.add_argument("input", type=Path, help="model to analyze (.onnx)")
    parser.add_argument("--exclude", nargs="+", default=[], metavar="NODE")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    return parser


def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same folder, then rename: never half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                                         suffix=".tmp")
    os.close(handle)
    try:
        write(Path(temporary))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _run_compress(argv: Sequence[str]) -> int:
    args = _compress_parser().parse_args(argv)
    if args.output.resolve() == args.input.resolve():
        raise OptionsError(f"output '{args.output}' is the input model; give another path")
    options = CompressOptions(
        ratio=args.ratio, theta=args.theta, ridge=args.ridge, batch_size=args.batch_size,
        calib_samples=args.calib_samples, verify_samples=args.verify_samples,
        provider=args.provider, exclude=tuple(args.exclude), seed=args.seed,
        round_to=args.round_to, selection=args.selection,
        reconstruct=not args.no_reconstruction, preprocess=args.preprocess,
        progress=sys.stderr.isatty(), flops=args.flops, params=args.params,
        allocation=args.allocation, min_keep=args.min_keep, compensation=args.compensation,
        compensation_samples=args.compensation_samples, affine=args.affine,
    )
    model, report = compress(args.input, args.calib, options)
    _write_atomically(args.output, lambda path: onnx.save_model(model, str(path)))
    if args.report is not None:
        _write_atomically(args.report, lambda path: path.write_text(report.to_json()))
    print(report.format())
    print(f"wrote {args.output}")
    if args.plots is not None:
        for path in write_plots(report, args.plots):
            print(f"wrote {path}")
    return 0


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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `onnx-spectral` console script; returns the exit code."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    try:
        if arguments[:1] == ["analyze"]:
            return _run_analyze(arguments[1:])
        return _run_compress(arguments)
    except SpectralError as exc:
        print(f"onnx-spectral: error: {exc}", file=sys.stderr)
        return next((code for kind, code in EXIT_CODES.items() if isinstance(exc, kind)), 1)


if __name__ == "__main__":
    sys.exit(main())
