"""Every setting of a compression run, declared once: type, default, help, command-line flag, check.

`CompressOptions` is what the Python API takes. The command line builds its arguments from the
same fields (`cli.py`, through `Option`), and the selection's `PlanOptions` from the fields
marked `plan`, so adding an option is adding one field. Errors name an option in the caller's
terms (`Terms`): the keyword for API callers (`ratio=1.5`), the flag on the command line
(`--ratio 1.5`).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from onnx_spectral.calibration.sources import Preprocess
from onnx_spectral.correction.refit import MAX_FEATURES
from onnx_spectral.errors import OptionsError
from onnx_spectral.graph.model import InitializerInputs
from onnx_spectral.graph.sessions import Provider
from onnx_spectral.quantize import Quantize, QuantizeFormat, QuantizeMethod
from onnx_spectral.reconstruction_layers import ReconstructionLayers
from onnx_spectral.selection.baselines import Selection
from onnx_spectral.selection.plan import PlanOptions
from onnx_spectral.selection.widths import Allocation

Check = Callable[[Any], "str | None"]
"""A value's problem in words ("must lie in (0, 1]"), or None when it is accepted."""
Switch = Literal["value", "on", "off", "pair"]
"""How a flag sets its field: `--flag VALUE`; `--flag` sets True; `--flag` sets False;
`--flag` / `--no-flag`."""


@dataclass(frozen=True)
class Option:
    """How a field of CompressOptions meets the user.

    `flag`: the command-line flag ("" = `--field-name`; None = API only). `cli_default`: the
    command line's default when it differs from the API's (None: the same). `flag_help`: the
    flag's help when the flag sets the opposite of what `help` describes. `plan`: the
    PlanOptions field it feeds. `exclusive`: flags of one name exclude each other. `const`:
    the value of the flag given without one (its value is then optional).
    """

    help: str
    check: Check | None = None
    flag: str | None = ""
    switch: Switch = "value"
    parse: Callable[[str], Any] | None = None
    metavar: str | None = None
    many: bool = False
    exclusive: str | None = None
    plan: str | None = None
    cli_default: Any = None
    flag_help: str | None = None
    const: Any = None


def option(default: Any, help: str, **spec: Any) -> Any:
    """A dataclass field of CompressOptions with its `Option` in the metadata."""
    return field(default=default, metadata={"option": Option(help, **spec)})


def in_unit(low_open: bool) -> Check:
    """Accept (0, 1] when `low_open`, else [0, 1]."""
    def check(value: float) -> str | None:
        inside = 0.0 < value <= 1.0 if low_open else 0.0 <= value <= 1.0
        return None if inside else f"must lie in {'(' if low_open else '['}0, 1]"
    return check


def at_least(bound: int, note: str = "") -> Check:
    """Accept values >= `bound` (not NaN)."""
    def check(value: float) -> str | None:
        return None if value >= bound else f"must be >= {bound}{note}"
    return check


InputShape = tuple[str, tuple[int, ...]]
"""A model input's name and the full shape (samples first) its MACs are counted at."""


def parse_input_shape(text: str) -> InputShape:
    """`NAME:D0,D1,...` as (NAME, (D0, D1, ...)); the name may be left out ("" then), for a
    model with one input."""
    name, _, dims = text.rpartition(":")
    try:
        shape = tuple(int(dim) for dim in dims.split(","))
    except ValueError:
        raise OptionsError(f"--input-shape {text}: expected NAME:D0,D1,... with whole numbers, "
                           "e.g. x:1,3,48,192") from None
    return name, shape


def input_shapes_of(value: Any) -> tuple[InputShape, ...]:
    """`input_shape` as given to the API (a dict name -> shape, or (name, shape) pairs or
    "NAME:D0,D1,..." strings) as (name, shape) pairs."""
    items: Iterable[Any] = value.items() if isinstance(value, Mapping) else value
    pairs = []
    for item in items:
        if isinstance(item, str):
            pairs.append(parse_input_shape(item))
        else:
            name, shape = item
            pairs.append((str(name), tuple(shape)))
    return tuple(pairs)


def input_shapes_problem(value: tuple[InputShape, ...]) -> str | None:
    """What is wrong with (name, shape) pairs: a size below 1 or a name given twice."""
    names = [name for name, _ in value]
    if len(set(names)) < len(names):
        return "names an input twice"
    for name, shape in value:
        if not shape or not all(isinstance(d, numbers.Integral) and d >= 1 for d in shape):
            return f"input '{name}': every dim must be a whole number >= 1"
    return None


def positive(value: float) -> str | None:
    return None if value > 0.0 else "must be > 0"


def optional(check: Check) -> Check:
    """`check`, with None accepted."""
    return lambda value: None if value is None else check(value)


@dataclass(frozen=True)
class Terms:
    """How errors spell an option: its name, and a setting of it to a value."""

    name: Callable[[str], str]
    setting: Callable[[str, Any], str]


KEYWORDS = Terms(lambda name: name, lambda name, value: f"{name}={value!r}")
"""The API's terms: Python keywords."""


@dataclass(frozen=True)
class CompressOptions:
    """Every setting of a compression run; defaults are the tool's defaults."""

    ratio: float = option(0.5, "fraction of channels each prunable group keeps",
                          check=in_unit(True), plan="ratio")
    theta: float = option(0.5, "1: reconstruct activations; 0: reconstruct the next layer's "
                          "output", check=in_unit(False), plan="theta")
    ridge: float = option(1e-3, "relative ridge rho of the channel reconstructions, lambda = "
                          "rho * trace(Sigma)/m (the layer refit chooses its own by "
                          "cross-validation)", check=positive, plan="rho")
    batch_size: int = option(32, "samples per ONNX Runtime run", check=at_least(1))
    calib_samples: int = option(1000, "calibration samples (the first ones of the data)",
                                check=at_least(1))
    verify_samples: int = option(200, "held-out samples, taken after the calibration samples",
                                 check=at_least(0))
    provider: Provider = option("auto", "ONNX Runtime execution provider")
    exclude: tuple[str, ...] = option((), "producer nodes whose channel groups stay whole",
                                      many=True, metavar="NODE")
    seed: int = option(0, "seed of 'random' calibration data and of random selection")
    initializer_inputs: InitializerInputs = option(
        "constant", "initializers also listed as graph inputs (the IR-3 convention of older "
        "exporters): 'constant' treats them as weights (the output lists them as initializers "
        "only); 'input' keeps them overridable and leaves the layers that read them whole")
    reconstruction_layers: ReconstructionLayers = option(
        "auto", "a Conv/Gemm/MatMul with more inputs than outputs whose outputs cannot be pruned "
        "(they feed a LayerNorm, a reduction, a graph output) may compute fewer outputs and "
        "rebuild the rest with an added layer: 'auto' for layers with a tenth of the MACs or more "
        "whose outputs reach no graph output, 'all', or 'none'")
    round_to: int = option(0, "round kept widths up to a multiple of this; 0: 8 for widths of "
                           "32 or more in groups of 64 channels or more, else 1 (ONNX Runtime's "
                           "CPU convolutions run faster on multiples of 8)",
                           check=at_least(0, " (0: automatic)"), plan="round_to")
    selection: Selection = option("spectral", "channel choice: spectral, or filter L1 norm and "
                                  "random (baselines)", plan="selection")
    reconstruct: bool = option(True, "fold a reconstruction of the dropped channels into the "
                               "layers reading them; off: drop them only (baseline)",
                               flag="--no-reconstruction", switch="off", plan="reconstruct",
                               flag_help="drop channels without folding a reconstruction "
                               "(baseline)")
    preprocess: Preprocess | None = option(
        None, "for image folders, e.g. 'resize=256,crop=224,mean=0.485:0.456:0.406,"
        "std=0.229:0.224:0.225'", parse=Preprocess.parse)
    progress: bool = option(False, "show a progress bar for each pass over the data "
                            "(calibration, compensation, refit, verification)", flag=None)
    ray: str | None = option(None, "run every pass over the data on Ray workers: 'local' (the "
                             "flag without an address) starts Ray in this process, 'auto' joins "
                             "the cluster this machine belongs to, 'ray://HOST:10001' a remote "
                             "one (needs the 'ray' extra)", const="local", metavar="ADDRESS")
    ray_workers: int = option(0, "Ray workers, each with its own ONNX Runtime session (0: one "
                              "per CPU of the cluster)", check=at_least(0))
    require_prunable: bool = option(
        False, "refuse a model none of whose channel groups can be pruned, before calibrating "
        "(UnsupportedGraphError, exit 6); --allow-unchanged writes it anyway",
        flag="--allow-unchanged", switch="off", cli_default=True,
        flag_help="write the model even when no channel group can be pruned (default: exit 6 "
        "and write nothing)")
    gram_budget: float = option(
        0.05, "calibration's Gram matrices may cost at most this share of the model's MACs; "
        "taps whose Gram is dear against the layers reading them subsample positions to meet "
        "it, keeping at least 8 rows per channel (0: every position)", check=at_least(0))
    input_shape: tuple[InputShape, ...] = option(
        (), "shape of a model input the MACs are counted at (for --flops and the report), "
        "samples first, e.g. x:1,3,48,192 (one per input; the name may be left out for a "
        "single-input model); default: one sample of the calibration data",
        many=True, parse=parse_input_shape, metavar="NAME:DIMS", check=input_shapes_problem)
    flops: float | None = option(None, "fraction of the whole model's MACs to keep (overrides "
                                 "--ratio)", check=optional(in_unit(True)), metavar="R",
                                 exclusive="budget", plan="flops")
    params: float | None = option(None, "fraction of the whole model's parameters to keep "
                                  "(overrides --ratio)", check=optional(in_unit(True)),
                                  metavar="R", exclusive="budget", plan="params")
    allocation: Allocation = option("greedy", "per-group widths under --flops/--params: "
                                    "uniform, dof (degrees of freedom of the spectrum) or greedy "
                                    "(loss curve per unit of cost)", plan="allocation")
    min_keep: int = option(1, "no group keeps fewer channels (unless it has fewer)",
                           check=at_least(1), plan="min_keep")
    compensation: bool = option(True, "sequential compensation: reconstruct toward the original "
                                "model's activations (one extra calibration pass per layer)",
                                switch="pair")
    affine: bool = option(False, "affine reconstruction: fold a per-channel offset into the "
                          "sinks' biases (compensated layers included)", switch="on",
                          plan="affine")
    cross_selection: bool = option(False, "under compensation, choose the kept channels toward "
                                   "the original's activations too", flag=None,
                                   plan="cross_selection")
    compensation_samples: int = option(1000, "calibration samples each compensation and refit "
                                       "pass runs, and --quantize calibrates on",
                                       check=at_least(1))
    refit: bool = option(True, "refit the Conv/Gemm/MatMul layers downstream of the pruning "
                         "(whole kernels and biases) toward the original's outputs (one extra "
                         "pass per layer; needs calibration batches, not saved statistics)",
                         switch="pair")
    refit_features: int = option(MAX_FEATURES, "layers with more input features (channels x "
                                 "kernel) are not refitted: the fit costs rows x features^2",
                                 check=at_least(1))
    quantize: Quantize = option("auto", "then quantize the model written: int8 (ONNX Runtime's "
                                "quantize_static; uint8 activations calibrated on the "
                                "calibration data, int8 weights); the report compares both "
                                "the float and the int8 model with the original. dynamic: "
                                "ONNX Runtime's quantize_dynamic (int8 weights, activations "
                                "quantized at run time). auto: as the input model is "
                                "quantized (pruned as its float model), else none")
    quantize_method: QuantizeMethod = option("minmax", "how --quantize calibrates activation "
                                             "ranges")
    quantize_format: QuantizeFormat = option("qdq", "--quantize writes QuantizeLinear/"
                                             "DequantizeLinear pairs (qdq) or QLinear ops "
                                             "(qoperator)")
    quantize_per_channel: bool = option(True, "--quantize: int8 weights per output channel "
                                        "(off: one scale per tensor)", switch="pair")
    quantize_exclude: tuple[str, ...] = option((), "nodes --quantize leaves in float",
                                               many=True, metavar="NODE")

    def __post_init__(self) -> None:
        try:
            shapes = input_shapes_of(self.input_shape)
        except (TypeError, ValueError) as exc:
            raise OptionsError(f"input_shape={self.input_shape!r}: accepted: a dict input name "
                               "-> shape, or 'NAME:D0,D1,...' strings") from exc
        object.__setattr__(self, "input_shape", shapes)
        check_values(values_of(self), KEYWORDS)

    def plan_options(self) -> PlanOptions:
        """The selection's settings: the fields marked `plan`, under their PlanOptions names."""
        return PlanOptions(**{spec.plan: getattr(self, name)
                              for name, spec in option_specs().items() if spec.plan})

    def summary(self) -> dict[str, Any]:
        """The options as plain values, for the report."""
        values = dataclasses.asdict(self)
        values["exclude"] = list(self.exclude)
        values["quantize_exclude"] = list(self.quantize_exclude)
        values["preprocess"] = None if self.preprocess is None else str(self.preprocess)
        values["input_shape"] = {name: list(shape) for name, shape in self.input_shape}
        return values


def option_specs() -> dict[str, Option]:
    """Each field of CompressOptions with its `Option`, in declaration order."""
    return {item.name: item.metadata["option"] for item in dataclasses.fields(CompressOptions)}


def field_types() -> dict[str, Any]:
    """Each field of CompressOptions with its resolved type."""
    return typing.get_type_hints(CompressOptions)


def choices(kind: Any) -> tuple[str, ...] | None:
    """The accepted strings of a Literal type (None for other types)."""
    return tuple(typing.get_args(kind)) if typing.get_origin(kind) is Literal else None


def values_of(options: CompressOptions) -> dict[str, Any]:
    return {item.name: getattr(options, item.name) for item in dataclasses.fields(options)}


def check_values(values: Mapping[str, Any], terms: Terms) -> None:
    """Raise OptionsError, in `terms`, for the first value out of range or of a wrong kind."""
    types = field_types()
    for name, spec in option_specs().items():
        if name not in values:
            continue
        value = values[name]
        problem = _kind_problem(types[name], value)
        if problem is None and spec.check is not None:
            problem = spec.check(value)
        if problem is not None:
            raise OptionsError(f"{terms.setting(name, value)}: {problem}")
    if values.get("flops") is not None and values.get("params") is not None:
        raise OptionsError(f"give one budget: {terms.name('flops')} or {terms.name('params')}, "
                           "not both")


def _kind_problem(kind: Any, value: Any) -> str | None:
    """What is wrong with the kind of `value` for a field of type `kind` (None: nothing)."""
    accepted = choices(kind)
    if accepted is not None:
        return None if value in accepted else "accepted: " + ", ".join(accepted)
    if kind == float | None and value is None:
        return None
    if kind is float or kind == float | None:
        number = isinstance(value, numbers.Real) and not isinstance(value, bool)
        return None if number and not math.isinf(value) else "must be a finite number"
    if kind is int:
        whole = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        return None if whole else "must be an integer"
    return None


def with_overrides(options: CompressOptions | None, overrides: Mapping[str, Any]
                   ) -> CompressOptions:
    """`options` (default: the defaults) with keyword `overrides`; unknown keywords refused."""
    known = option_specs()
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise OptionsError(f"unknown option {', '.join(map(repr, unknown))}: accepted: "
                           f"{', '.join(known)}")
    return dataclasses.replace(options or CompressOptions(), **overrides)
