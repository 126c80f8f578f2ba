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
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, NoReturn

import onnx

from onnx_spectral.analysis import analyze
from onnx_spectral.api import CompressOptions, calibrate_statistics, compress
from onnx_spectral.calibration.stats_files import (
    Shard,
    load_statistics,
    merge_statistics,
    save_statistics,
)
from onnx_spectral.cost import model_cost
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
from onnx_spectral.graph.dequantize import as_float_model
from onnx_spectral.graph.if_branch import layers_only_in_if
from onnx_spectral.graph.model import load_model
from onnx_spectral.options import Terms, check_values, choices, field_types, option_specs
from onnx_spectral.plots import require_matplotlib, write_plots
from onnx_spectral.reconstruction_layers import add_reconstruction_layers
from onnx_spectral.report import analysis_dict, format_analysis, format_seconds

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


DEBUG_VARIABLE = "ONNX_SPECTRAL_DEBUG"
"""Set to 1 to print the traceback of an error, as --debug does."""
_COMMAND_OPTIONS = ("calib_samples", "verify_samples", "batch_size", "provider", "exclude",
                    "seed", "preprocess", "gram_budget", "input_shape")
"""The options of `onnx-spectral calibrate` (the calibration's part of compression's)."""


class _Parser(argparse.ArgumentParser):
    """argparse with its errors raised as OptionsError: one line, exit code 2; with --debug."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_argument("--debug", action="store_true",
                          help=f"print the traceback of an error (or set {DEBUG_VARIABLE}=1)")

    def error(self, message: str) -> NoReturn:
        raise OptionsError(f"{message} (see {self.prog} --help)")


def _flag(name: str) -> str:
    """The command-line flag of a CompressOptions field."""
    return option_specs()[name].flag or "--" + name.replace("_", "-")


FLAGS = Terms(_flag, lambda name, value: f"{_flag(name)} {value}")
"""The command line's terms for options: their flags."""


def _add_options(parser: argparse.ArgumentParser, names: Sequence[str] | None = None) -> None:
    """One argument per command-line option of CompressOptions (or of those `names`)."""
    defaults = CompressOptions()
    types = field_types()
    exclusive: dict[str, Any] = {}
    for name, spec in option_specs().items():
        if spec.flag is None or (names is not None and name not in names):
            continue
        default = getattr(defaults, name) if spec.cli_default is None else spec.cli_default
        if spec.exclusive is not None and spec.exclusive not in exclusive:
            exclusive[spec.exclusive] = parser.add_mutually_exclusive_group()
        target = parser if spec.exclusive is None else exclusive[spec.exclusive]
        if spec.switch == "pair":
            pair = parser.add_mutually_exclusive_group()
            on = "on" if default else "off"
            pair.add_argument(_flag(name), dest=name, action="store_true", default=default,
                              help=f"{spec.help} (default {on})")
            pair.add_argument("--no-" + _flag(name)[2:], dest=name, action="store_false")
        elif spec.switch in ("on", "off"):
            action = "store_true" if spec.switch == "on" else "store_false"
            target.add_argument(_flag(name), dest=name, default=default, action=action,
                                help=spec.flag_help or spec.help)
        elif spec.many:  # repeatable, each time with one or more values
            target.add_argument(_flag(name), dest=name, default=list(default),
                                metavar=spec.metavar, type=spec.parse or str, nargs="+",
                                action="extend", help=spec.help)
        else:
            shown = "" if default is None else " (default %(default)s)"
            optional = {} if spec.const is None else {"nargs": "?", "const": spec.const}
            target.add_argument(_flag(name), dest=name, default=default, metavar=spec.metavar,
                                type=spec.parse or _scalar(types[name]),
                                choices=choices(types[name]), help=spec.help + shown, **optional)


def _scalar(kind: Any) -> Callable[[str], Any]:
    """How argparse reads one value of a field of type `kind`."""
    if kind is int:
        return int
    if kind is float or kind == float | None:
        return float
    return str


def _options(args: argparse.Namespace, **extra: Any) -> CompressOptions:
    """CompressOptions from parsed arguments (and `extra` fields); errors name the flags."""
    specs = option_specs()
    values = {name: getattr(args, name) for name in specs if hasattr(args, name)}
    values.update({name: tuple(value) for name, value in values.items() if specs[name].many})
    values.update(extra)
    check_values(values, FLAGS)
    return CompressOptions(**values)


def _progress(args: argparse.Namespace) -> bool:
    """Progress bars on a terminal, unless --quiet."""
    return sys.stderr.isatty() and not args.quiet


def _add_quiet(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bars (there are none when stderr is not a terminal)")


def _compress_parser() -> argparse.ArgumentParser:
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
    parser.add_argument("--report", type=Path, help="also write the report as JSON here")
    _add_quiet(parser)
    parser.add_argument("--external-data", action="store_true",
                        help="write the tensors to OUT.<digest>.data beside OUT (automatic when "
                             "the input has external data or the tensors exceed 2 GB)")
    parser.add_argument("--plots", type=Path, metavar="DIR",
                        help="write PNG figures (spectra, widths) here; needs matplotlib")
    _add_options(parser)
    return parser


def _analyze_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="onnx-spectral analyze",
                     description="List the channel groups of a model.")
    parser.add_argument("input", type=Path, help="model to analyze (.onnx)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    _add_options(parser, ["exclude", "input_shape", "reconstruction_layers"])
    return parser


class _Outputs:
    """The files a command has written so far and those it still means to write, for the error
    line of a late failure."""

    def __init__(self) -> None:
        self.written: list[Path] = []
        self.pending: list[Path] = []

    def expect(self, *paths: Path | None) -> None:
        """The outputs (files, the plots folder) the command is about to write."""
        self.pending = [path for path in paths if path is not None]

    def wrote(self, output: Path, files: Sequence[Path] = ()) -> None:
        """`output` is written, as `files` (default: itself)."""
        self.written.extend(files or [output])
        self.pending.remove(output)

    def state(self) -> str:
        """What was and was not written, for an error line."""
        if not self.written:
            return "no output was written"
        missing = f"; not written: {', '.join(map(str, self.pending))}" if self.pending else ""
        return f"wrote {', '.join(map(str, self.written))}{missing}"


def _run_compress(argv: Sequence[str], outputs: _Outputs) -> int:
    args = _compress_parser().parse_args(argv)
    _check_paths(args.input, args.output, args.report)
    if args.plots is not None:
        require_matplotlib()  # fail before anything is written, not after the model
    options = _options(args, progress=_progress(args))
    if args.calib is None and args.stats is None:
        raise OptionsError("give --calib DATA, or --stats STATS.npz written by `onnx-spectral "
                           "calibrate` (see onnx-spectral --help)")
    model, report = compress(args.input, args.calib, options, statistics=args.stats)
    table = report.format() + "\n" + format_seconds(report.seconds)  # before writing anything
    report_json = report.to_json()
    outputs.expect(args.output, args.report, args.plots)
    external = args.external_data or _has_external_data(args.input)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    outputs.wrote(args.output, atomic.save_model(model, args.output, external_data=external))
    if args.report is not None:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_text(args.report, report_json)
        outputs.wrote(args.report)
    print(table)
    print("wrote " + ", ".join(f"{path} ({path.stat().st_size:,} bytes)"
                               for path in outputs.written))
    if args.plots is not None:
        figures = write_plots(report, args.plots)
        outputs.wrote(args.plots, figures)
        print("\n".join(f"wrote {path}" for path in figures))
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


def _run_analyze(argv: Sequence[str], outputs: _Outputs) -> int:
    args = _analyze_parser().parse_args(argv)
    model = load_model(args.input)
    pruned = as_float_model(model)[0]  # the groups compress prunes, and their MACs
    options = _options(args)
    shapes = dict(options.input_shape)
    if "" in shapes:  # a shape without a name: the single input's
        shapes = _single_input_shape(model, shapes.pop(""))
    cost = model_cost(pruned, shapes or None)
    analysis, layers = add_reconstruction_layers(
        analyze(pruned, args.exclude), cost, options.reconstruction_layers,
        lambda layered: analyze(layered, args.exclude))
    if args.json:
        added = [{**asdict(layer), "note": layer.note()} for layer in layers]
        print(json.dumps({**analysis_dict(analysis, cost), "reconstruction_layers": added},
                         indent=2))
    else:
        print(format_analysis(analysis, cost))
        for layer in layers:
            print(f"note: {layer.note()}")
        holder = layers_only_in_if(model)
        if holder is not None:
            print(f"note: the layers are all inside If node '{model.graph.node[holder].name}': "
                  "compressing with calibration data prunes the branch that data takes")
    return 0


def _single_input_shape(model: onnx.ModelProto, shape: tuple[int, ...]
                        ) -> dict[str, tuple[int, ...]]:
    """`--input-shape` without a name, for the model's one input."""
    initializers = {tensor.name for tensor in model.graph.initializer}
    inputs = [value.name for value in model.graph.input if value.name not in initializers]
    if len(inputs) != 1:
        raise OptionsError(f"--input-shape {','.join(map(str, shape))} has no input name and "
                           f"the model has {len(inputs)} inputs {inputs}; write NAME:D0,D1,...")
    return {inputs[0]: shape}


def _calibrate_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="onnx-spectral calibrate",
        description="Gather channel statistics (or one shard of them) without compressing.")
    parser.add_argument("input", type=Path, help="model to calibrate (.onnx)")
    parser.add_argument("--calib", required=True, help="calibration data, as for compression")
    _add_quiet(parser)
    parser.add_argument("-o", "--output", type=Path, required=True,
                        help="statistics file to write (.npz)")
    parser.add_argument("--shard", type=Shard.parse, default=Shard(1, 1),
                        help="I/N: calibrate the I-th of N contiguous parts (1-based) of the "
                             "first --calib-samples samples")
    _add_options(parser, _COMMAND_OPTIONS)
    return parser


def _run_calibrate(argv: Sequence[str], outputs: _Outputs) -> int:
    args = _calibrate_parser().parse_args(argv)
    options = _options(args, progress=_progress(args))
    saved = calibrate_statistics(args.input, args.calib, options, shard=args.shard)
    outputs.expect(args.output)
    atomic.write_atomically(args.output, lambda path: save_statistics(path, saved))
    outputs.wrote(args.output)
    print(f"shard {args.shard}: {saved.statistics.samples} samples, {len(saved.taps)} taps; "
          f"wrote {args.output}")
    return 0


def _run_merge(argv: Sequence[str], outputs: _Outputs) -> int:
    parser = _Parser(prog="onnx-spectral merge-stats",
                     description="Add the statistics of calibration shards.")
    parser.add_argument("inputs", type=Path, nargs="+", help="statistics files (.npz)")
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args(argv)
    merged = merge_statistics([load_statistics(path) for path in args.inputs],
                              [str(path) for path in args.inputs])
    outputs.expect(args.output)
    atomic.write_atomically(args.output, lambda path: save_statistics(path, merged))
    outputs.wrote(args.output)
    missing = merged.missing_shards()
    if missing:
        print(f"warning: shards {', '.join(missing)} are missing", file=sys.stderr)
    print(f"{merged.statistics.samples} samples from {len(merged.shards)} shards; "
          f"wrote {args.output}")
    return 0


_COMMANDS: dict[str, Callable[[Sequence[str], _Outputs], int]] = {
    "analyze": _run_analyze, "calibrate": _run_calibrate, "merge-stats": _run_merge}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `onnx-spectral` console script; returns the exit code.

    Every failure prints one line `onnx-spectral: error: ...` to stderr and returns its code
    (EXIT_CODES, INTERNAL_ERROR, INTERRUPTED); the line says what was written when a failure
    comes after the first output. With --debug (or ONNX_SPECTRAL_DEBUG=1) the traceback
    follows.
    """
    arguments = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in arguments or os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")
    outputs = _Outputs()
    command = _COMMANDS.get(arguments[0]) if arguments else None
    try:
        if command is not None:
            return command(arguments[1:], outputs)
        return _run_compress(arguments, outputs)
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else 0
    except KeyboardInterrupt:
        return _fail(INTERRUPTED, f"interrupted; {outputs.state()}", debug, prefix="")
    except MemoryError:
        return _fail(EXIT_CODES[ResourceError], "out of memory; lower --batch-size or use a "
                     f"larger machine; {outputs.state()}", debug)
    except SpectralError as exc:
        late = "" if not outputs.written else f" ({outputs.state()})"
        code = next((code for kind, code in EXIT_CODES.items() if isinstance(exc, kind)), 1)
        return _fail(code, f"{exc}{late}", debug)
    except Exception as exc:  # a bug: one line, the code says so, and what was written
        hint = "" if debug else f"; rerun with --debug or {DEBUG_VARIABLE}=1 for the traceback"
        return _fail(INTERNAL_ERROR, f"{type(exc).__name__}: {exc} (please report this{hint}; "
                     f"{outputs.state()})", debug, prefix="internal error: ")


def _fail(code: int, message: str, debug: bool, prefix: str = "error: ") -> int:
    """Print the error line (after the traceback with `debug`); return `code`."""
    if debug:
        traceback.print_exc()
    print(f"onnx-spectral: {prefix}{message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
