"""replan: a plan from a saved trace.json, and one SalfError naming the file when the cost
table it stores is missing or malformed."""

from __future__ import annotations

import json

import pytest

from salf.analysis import Trace
from salf.cost import ModelShape, cost_table
from salf.errors import SalfError
from salf.models.tiny import tiny_model
from salf.pipeline import replan

LAYERS = 4


@pytest.fixture(scope="module")
def cost():
    shape = ModelShape.from_model(tiny_model("llama", num_layers=LAYERS))
    return cost_table(shape, 32, 4, loss_positions="last", head="frozen", machine="h200")


def write_trace(folder, cost) -> str:
    spaces = [{"space": l, "deviation": 1.0 - 0.3 * (1 - 1 / (l + 1))} for l in range(LAYERS + 1)]
    tr = Trace(model={"spec": "tiny"}, data={"dataset": "d"}, task="classification",
               num_layers=LAYERS, spaces=spaces, extra={} if cost is None else {"cost": cost})
    path = folder / "trace.json"
    tr.to_json(path)
    return path


def test_replan_writes_the_plan_where_asked(tmp_path, cost):
    result = replan(write_trace(tmp_path, cost), "paper", out=tmp_path / "sub" / "p.json")
    assert result.plan_path == tmp_path / "sub" / "p.json" and result.out_dir is None
    assert json.loads(result.plan_path.read_text())["policy"] == "paper"
    default = replan(write_trace(tmp_path, cost), "budget=0.9")
    assert default.plan_path == tmp_path / "plan-budget0.9.json" and default.plan_path.exists()


def test_replan_with_another_head_keeps_the_traces_settings(tmp_path, cost):
    result = replan(write_trace(tmp_path, cost), "paper", head="untied-copy", out=tmp_path / "p.json")
    assert result.cost["settings"]["head"] == "untied-copy" and result.plan.head == "untied-copy"
    assert result.cost["settings"]["seq_len"] == 32 and result.cost["settings"]["batch_size"] == 4
    assert result.plan.predicted["machine"] == "h200"  # the trace's machine, not this one
    assert {c["head"] for c in result.cost["cuts"]} == {"untied-copy"}  # priced with the new head


def _broken(cost, what):
    cost = json.loads(json.dumps(cost))
    if what == "not an object":
        return ["a list"]
    if what == "no settings":
        del cost["settings"]
    elif what == "empty settings":
        cost["settings"] = {}
    elif what == "settings not an object":
        cost["settings"] = "frozen"
    elif what == "no seq_len":
        del cost["settings"]["seq_len"]
    elif what == "unknown setting":
        cost["settings"]["colour"] = "blue"
    elif what == "bad batch size":
        cost["settings"]["batch_size"] = "four"
    elif what == "bad machine":
        cost["settings"]["machine"] = {"name": "x"}
    elif what == "no shape":
        del cost["shape"]
    elif what == "short cuts":
        cost["cuts"] = cost["cuts"][:2]
    elif what == "cut without flops":
        del cost["cuts"][1]["flops_ratio"]
    return cost


@pytest.mark.parametrize("what,head", [
    ("not an object", "frozen"), ("no settings", "frozen"), ("empty settings", "frozen"),
    ("settings not an object", "frozen"), ("short cuts", "frozen"), ("cut without flops", "frozen"),
    ("no seq_len", "untied-copy"), ("unknown setting", "untied-copy"), ("bad batch size", "untied-copy"),
    ("bad machine", "untied-copy"), ("no shape", "untied-copy")])
def test_malformed_cost_table_is_one_error_naming_the_file(tmp_path, cost, what, head):
    path = write_trace(tmp_path, _broken(cost, what))
    with pytest.raises(SalfError, match="trace.json"):
        replan(path, "paper", head=head, out=tmp_path / "p.json")
    assert not (tmp_path / "p.json").exists()


def test_trace_without_cost_table(tmp_path):
    with pytest.raises(SalfError, match="no cost table"):
        replan(write_trace(tmp_path, None), "paper")
