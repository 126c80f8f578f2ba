"""Run the fuzzer's properties (tests/test_fuzz.py) on many graphs without stopping at a failure.

Hypothesis stops at the first failing example; this survey keeps going, sorts the failures by
signature (exception type, the innermost onnx_spectral frame or else the failing check, and
the message with numbers blanked) and keeps, per signature, the count and the smallest graph
(fewest nodes), saved as `<out>/failure_<k>.onnx` with its description and traceback in
`<out>/summary.json` (rewritten as the run goes, so a run cut short still reports):

    python -m tests.fuzz_survey --examples 5000 --seconds 2400 --out /tmp/fuzz_failures

`--shrink TEXT` instead lets hypothesis shrink the failures whose signature contains TEXT (the
others count as passing) and prints the smallest graph found.
"""

from __future__ import annotations

import argparse
import json
import re
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
from hypothesis import HealthCheck, Phase, given, settings

from tests.test_fuzz import cases, check_case


class _TimeUp(Exception):
    """Raised inside the hypothesis loop to end the survey."""


@dataclass
class Failure:
    """One failure signature: how often it occurred and its smallest example."""

    signature: str
    count: int = 0
    nodes: int = 1 << 30
    description: str = ""
    traceback: str = ""
    file: str = ""
    kinds: Counter[str] = field(default_factory=Counter)
    """How many of the failing graphs had each drawn option (`kinds`)."""

    def common(self) -> list[str]:
        """The drawn options every failing graph had."""
        return sorted(kind for kind, count in self.kinds.items() if count == self.count)


@dataclass
class Survey:
    out: Path
    deadline: float
    examples: int = 0
    passed: int = 0
    failures: dict[str, Failure] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    def record(self, model: onnx.ModelProto, options: dict[str, Any], error: BaseException
               ) -> None:
        key = signature(error)
        failure = self.failures.setdefault(key, Failure(key))
        failure.count += 1
        failure.kinds.update(kinds(model.doc_string, options))
        if len(model.graph.node) < failure.nodes:
            failure.nodes = len(model.graph.node)
            failure.description = f"{model.doc_string}; options {options}"
            failure.traceback = "".join(traceback.format_exception(error))[-3000:]
            failure.file = f"failure_{list(self.failures).index(key)}.onnx"
            onnx.save(model, str(self.out / failure.file))
        self.write()

    def write(self) -> None:
        summary = {"examples": self.examples, "passed": self.passed,
                   "seconds": round(time.monotonic() - self.started, 1),
                   "failures": [{**vars(failure), "common": failure.common()}
                                for failure in self.failures.values()]}
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1))


def kinds(description: str, options: dict[str, Any]) -> list[str]:
    """The drawn options of a graph (from its `cnn_graphs` description) and the budget kind."""
    fields = re.findall(r"(\w+=[^,)]+)", description.split(";")[0])
    symbolic = re.search(r"input \[N, \d+, (\w+), (\w+)\]", description)
    spatial = ["spatial " + "/".join("static" if dim.isdigit() else dim for dim in
                                     symbolic.groups())] if symbolic else []
    heads = [f"head {name}" for name in re.findall(r"head (\w+)", description)]
    cuts = [f"has {block}" for block in ("concat", "split") if f"'{block}'" in description]
    runs = [f"run inputs {name}" for name in re.findall(r"run inputs (\w+ ?\w*)$", description)]
    return [*fields, *spatial, *heads, *cuts, *runs, "budget " + next(iter(options))]


def signature(error: BaseException) -> str:
    """Exception type, innermost library frame (or the failing check), message sans numbers."""
    frames = traceback.extract_tb(error.__traceback__)
    library = [frame for frame in frames if "/onnx_spectral/" in frame.filename]
    frame = library[-1] if library else frames[-1]
    where = f"{frame.filename.split('/')[-2]}/{frame.filename.split('/')[-1]}:{frame.name}"
    names = re.sub(r"'[^']*'(, '[^']*')*", "'.'", str(error).split("\n")[0])
    message = re.sub(r"\d+", "#", names)[:100]
    return f"{type(error).__name__} at {where}: {message}"


def run(examples: int, seconds: float, out: Path) -> Survey:
    out.mkdir(parents=True, exist_ok=True)
    survey = Survey(out, time.monotonic() + seconds)

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=cases())
    def survey_case(case: tuple[onnx.ModelProto, dict[str, Any]]) -> None:
        if time.monotonic() > survey.deadline:
            raise _TimeUp
        survey.examples += 1
        try:
            check_case(*case)
            survey.passed += 1
        except Exception as error:  # every failure is recorded, none stops the survey
            survey.record(*case, error)
        if survey.examples % 25 == 0:
            survey.write()

    try:
        survey_case()
    except _TimeUp:
        pass
    survey.write()
    return survey


def shrink(text: str, examples: int, out: Path) -> None:
    """Shrink the failures whose signature contains `text`; save the smallest one found."""
    out.mkdir(parents=True, exist_ok=True)
    found: list[tuple[onnx.ModelProto, dict[str, Any], str]] = []

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck), report_multiple_bugs=False)
    @given(case=cases())
    def shrink_case(case: tuple[onnx.ModelProto, dict[str, Any]]) -> None:
        try:
            check_case(*case)
        except Exception as error:
            if text in signature(error):
                found.append((*case, "".join(traceback.format_exception(error))[-3000:]))
                raise

    try:
        shrink_case()
    except Exception:
        model, options, trace = found[-1]
        onnx.save(model, str(out / "shrunk.onnx"))
        print(f"{trace}\n{model.doc_string}; options {options}\nsaved: {out / 'shrunk.onnx'}")
        return
    print(f"no failure matching {text!r} in {examples} examples")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--out", type=Path, default=Path("fuzz_failures"))
    parser.add_argument("--shrink", metavar="TEXT",
                        help="shrink the failures whose signature contains TEXT")
    args = parser.parse_args()
    if args.shrink:
        shrink(args.shrink, args.examples, args.out)
        return
    survey = run(args.examples, args.seconds, args.out)
    print(f"{survey.examples} examples, {survey.passed} passed, "
          f"{len(survey.failures)} distinct failures:")
    for failure in survey.failures.values():
        print(f"  {failure.count:5d}x {failure.signature}\n         {failure.description}\n"
              f"         all had: {', '.join(failure.common()) or '-'}")


if __name__ == "__main__":
    main()
