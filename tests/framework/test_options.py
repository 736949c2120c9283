"""Pass options are checked when the pipeline text is parsed, before any pass runs: ranges, choices,
regular expressions, finite numbers, duplicates. Each mistake is one UserError line (exit 2) naming
the pass, the option, the value and what is allowed."""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Literal

import onnx
import pytest
from onnx import TensorProto, helper

import onnxopt
from onnxopt.cli import main
from onnxopt.errors import UserError
from onnxopt.framework.options import option
from onnxopt.framework.pass_api import Pass
from onnxopt.framework.pipeline import build_pipeline
from onnxopt.framework.registry import all_passes

BAD = [
    ("prune{macs=1.5}", "'macs' = 1.5 is out of range (allowed: 0 <= macs < 1)"),
    ("prune{max_ratio=-0.1}", "'max_ratio'"),
    ("prune{criterion=l3}", "one of auto, l1, l2, bn, activation, recon"),
    ("lowrank{params=1.5}", "'params' = 1.5 is out of range"),
    ("lowrank{multiple=0}", "multiple >= 1"),
    ("lowrank{energy=0}", "0 < energy <= 1"),
    ("lowrank{ops=Gemm|Foo}", "'ops' = 'Foo' is not allowed"),
    ("quantize{activations=int4}", "one of uint8, int8"),
    ("quantize{percentile=150}", "0 < percentile <= 100"),
    ("quantize{include=a(b}", "'include' = 'a(b' is not a valid regular expression"),
    ("quantize{exclude=conv|[x}", "'exclude' = '[x' is not a valid regular expression"),
    ("quantize{ranges=t=2:1}", "'ranges' = 't=2:1'"),
    ("quantize{ranges=t}", "is not 'tensor=min:max'"),
    ("quantize{vnni=maybe}", "one of auto, yes, no"),
    ("quantize{sensitivity_samples=0}", "sensitivity_samples >= 1"),
    ("fold{size_limit_mb=-1}", "size_limit_mb >= 0"),
    ("fold{size_limit_mb=inf}", "'size_limit_mb' = inf is not a finite number"),
    ("prune{macs=nan}", "'macs' = nan is not a finite number"),
    ("fold{max_iterations=0}", "max_iterations >= 1"),
    ("fuse{max_iterations=-3}", "max_iterations >= 1"),
    ("fold{size_limit_mb=1,size_limit_mb=2}", "'size_limit_mb' given twice"),
]


@pytest.mark.parametrize("text,words", BAD)
def test_bad_option_values_fail_at_parse_time(text, words):
    with pytest.raises(UserError) as err:
        build_pipeline(text)
    msg = str(err.value)
    assert words in msg and msg.startswith(f"pass '{text.split('{')[0]}'") and "\n" not in msg


def test_good_option_values_parse():
    (q,) = build_pipeline("quantize{percentile=100,activations=int8,include=^conv.*|fc[0-9]+,ranges=t=-1:2.5}")
    assert q.options.percentile == 100.0 and q.options.include == ["^conv.*", "fc[0-9]+"]
    (lr,) = build_pipeline("lowrank{params=none,error=0.1,ops=Gemm|Conv}")
    assert lr.options.params is None and lr.options.ops == ["Gemm", "Conv"]


def test_bad_option_exits_2_before_the_model_is_read(tmp_path, capsys):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    model = helper.make_model(
        helper.make_graph(
            [helper.make_node("Relu", ["x"], ["y"])],
            "g",
            [x],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        )
    )
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    code = main(["optimize", str(src), "-o", str(tmp_path / "o.onnx"), "-p", "fold,prune{macs=1.5}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "prune" in err[0] and "macs" in err[0] and "1.5" in err[0]
    assert not (tmp_path / "o.onnx").exists()


def test_every_builtin_default_is_accepted_and_every_number_option_declares_a_range():
    for name, cls in all_passes().items():
        cls.check_options(cls.Options())
        if name not in ("fold", "fuse", "prune", "lowrank", "quantize"):
            continue
        hints = typing.get_type_hints(cls.Options)
        for f in dataclasses.fields(cls.Options):
            meta = f.metadata
            if hints[f.name] in (int, float, float | None) and f.name not in ("target_sqnr", "storage_sqnr"):
                assert any(meta.get(k) is not None for k in ("low", "high", "above", "below")), (
                    f"{name}.{f.name} declares no range"
                )


def test_options_built_from_python_are_checked_too():
    from onnxopt.passes.prune.pruner import Prune

    with pytest.raises(UserError, match="'macs' = 2.0 is out of range"):
        Prune(Prune.Options(macs=2.0))
    with pytest.raises(UserError, match="not a finite number"):
        onnxopt.optimize(helper.make_model(helper.make_graph([], "g", [], [])), pipeline="lowrank{eps=inf}")


def test_passes_lists_the_allowed_values(capsys):
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert "float 0<=x<1" in out and "uint8|int8" in out and "list[str](regex)" in out


def test_plugin_options_can_declare_ranges_choices_and_literals():
    class Demo(Pass):
        name = "demo"

        @dataclasses.dataclass
        class Options:
            ratio: float = option(0.5, "a fraction", above=0, below=1)
            mode: Literal["a", "b"] = option("a", "a or b")
            count: int = option(1, "a count", check=lambda v: None if v % 2 else "must be odd")

    assert Demo.parse_options({"ratio": "0.25", "mode": "b"}).mode == "b"
    for raw, words in [
        ({"ratio": "1"}, "0 < ratio < 1"),
        ({"mode": "c"}, "one of a, b"),
        ({"count": "2"}, "must be odd"),
        ({"ratio": "-inf"}, "finite"),
    ]:
        with pytest.raises(UserError, match=words.replace("(", r"\(")):
            Demo.parse_options(raw)
    assert math.isclose(Demo().options.ratio, 0.5)
