"""`prepare`: a model as the pipeline prunes it, with its analysis, its cost and its data.

The model pruned can differ from the model given: a quantized model is pruned as its float model
(`graph.dequantize`), a model whose layers are all inside one If as the branch its data takes
(`graph.if_branch`), and layers whose outputs cannot be pruned get reconstruction layers
(`reconstruction_layers`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from warnings import catch_warnings, simplefilter

import onnx

from onnx_spectral.analysis import Analysis, analyze
from onnx_spectral.calibration.deployment import deployment_inputs
from onnx_spectral.calibration.sources import (
    DataSource,
    SampleStream,
    fixed_batch_size,
    model_input_specs,
    open_calibration,
    runs_note,
)
from onnx_spectral.calibration.stats_files import SavedStatistics, saved_for_model
from onnx_spectral.cost import ModelCost, model_cost
from onnx_spectral.errors import OptionsError, UnsupportedGraphError
from onnx_spectral.graph.dequantize import as_float_model
from onnx_spectral.graph.if_branch import TakenBranch, take_branch
from onnx_spectral.graph.model import initializer_inputs_note
from onnx_spectral.options import CompressOptions
from onnx_spectral.quantize import Quantize, quantize_problem
from onnx_spectral.reconstruction_layers import ReconstructionLayer, add_reconstruction_layers
from onnx_spectral.selection.budget import nothing_prunable


@dataclass(frozen=True)
class Prepared:
    """A loaded model, its analysis and its data, opened: what every later step reads.

    `stream`: the calibration data (None with saved statistics and no data). `saved`: saved
    statistics to select from instead of calibrating. `batch`: samples per ONNX Runtime run.
    `cost`: the model's size and MACs at the shape it runs at (`deployment_inputs`);
    `analyzed_cost`: the same of `analysis.graph.model`, which has the reconstruction `layers`
    (`reconstruction_layers`) at full width.
    `notes`: what the loading did; `warnings`: what the user should act on.
    `original`: the model pruned; `given`: the model as the user gave it, which the outputs are
    compared with (they differ for a quantized model, pruned as its float model);
    `quantize`: options.quantize with "auto" decided. `taken`: the If branch `original` is,
    for a model whose layers are all inside one If (`graph.if_branch`).
    """

    original: onnx.ModelProto
    analysis: Analysis
    stream: SampleStream | None
    saved: SavedStatistics | None
    batch: int
    notes: tuple[str, ...]
    warnings: tuple[str, ...]
    cost: ModelCost
    given: onnx.ModelProto
    quantize: Quantize
    taken: TakenBranch | None
    analyzed_cost: ModelCost
    layers: tuple[ReconstructionLayer, ...]

    @property
    def reference_cost(self) -> ModelCost | None:
        """The cost budgets are fractions of, when not `analyzed_cost` (`group_costs`)."""
        return self.cost if self.layers else None

    def outer(self, pruned: onnx.ModelProto) -> onnx.ModelProto:
        """A pruned `original` as the model to write: back inside its If when `taken`."""
        return pruned if self.taken is None else self.taken.rewrap(pruned)


def prepare(given: onnx.ModelProto, calibration_data: DataSource | None,
            options: CompressOptions, statistics: SavedStatistics | str | Path | None = None
            ) -> Prepared:
    """Analyze `given` (a quantized model as its float model; a model whose layers are all in
    one If, as that branch; with reconstruction layers after the producers that need them) and
    open its data (and saved statistics, checked against it).

    Raises UnsupportedGraphError when `require_prunable` and no group can be pruned (under a
    budget, `budget_costs` does); OptionsError when `quantize` cannot apply.
    """
    original, dequantized = as_float_model(given)
    quantize_mode = options.quantize if options.quantize != "auto" else (
        "none" if dequantized is None else dequantized.quantize)
    specs = model_input_specs(original)  # initializers listed as inputs are not data
    with catch_warnings(record=True) as caught:
        simplefilter("always")
        stream = (None if calibration_data is None
                  else open_calibration(calibration_data, specs, preprocess=options.preprocess,
                                        seed=options.seed))
    original, taken = (take_branch(original, stream.peek)  # overridable weights: kept as they are
                       if stream and options.initializer_inputs == "constant" else (original, None))

    def analysis_of(model: onnx.ModelProto) -> Analysis:
        return analyze(model, options.exclude, initializer_inputs=options.initializer_inputs,
                       shape_feeds=None if stream is None else stream.peek)

    analysis = analysis_of(original)
    inputs = deployment_inputs(specs, options.input_shape, stream)
    cost = model_cost(analysis.graph.model, inputs)
    analysis, layers = add_reconstruction_layers(analysis, cost, options.reconstruction_layers,
                                                 analysis_of)
    if options.require_prunable and not analysis.prunable \
            and not options.plan_options().budgeted:  # a budget says why (`budget_costs`)
        raise UnsupportedGraphError(nothing_prunable(analysis))
    saved = None if statistics is None else saved_for_model(statistics, given, analysis.taps)
    warnings = [str(warning.message) for warning in caught]
    notes = tuple(note for note in (initializer_inputs_note(original, options.initializer_inputs),
                                    None if stream is None else runs_note(specs),
                                    dequantized and dequantized.note(quantize_mode),
                                    taken and taken.note(), *(layer.note() for layer in layers))
                  if note)
    if saved is not None:
        warnings.extend(f"statistics lack shard {shard}" for shard in saved.missing_shards())
    if quantize_mode != "none":
        problem = quantize_problem(original, options.quantize_exclude) or (
            None if saved is None else "--quantize needs calibration batches, not saved "
            "statistics (--stats)" + (" (the input model is QDQ-quantized: --quantize none "
                                      "writes it in float)" if dequantized else ""))
        if problem is not None:
            raise OptionsError(problem)
    batch = fixed_batch_size(specs) or options.batch_size
    analyzed_cost = model_cost(analysis.graph.model, inputs) if layers else cost
    return Prepared(original, analysis, stream, saved, batch, notes, tuple(warnings), cost,
                    given, quantize_mode, taken, analyzed_cost, layers)
