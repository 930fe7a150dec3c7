"""Progress inside long steps: what the callback hears (sensitivity probes, speed checks, validation samples and
latency pairs, each auto candidate's steps), the terminal view (two lines, rate and ETA), and silence off a TTY."""
import io
import re
import time

import numpy as np
import onnx
from onnx import helper

import onnxcomp
from onnxcomp import testing
from onnxcomp.progress import Counter, TerminalProgress, is_outer, within


def _chain(width: int = 48, layers: int = 3) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        w = helper.make_tensor(f"W{i}", onnx.TensorProto.FLOAT, [width, width],
                               (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32).ravel())
        inits.append(w)
        nodes += [helper.make_node("MatMul", [x, f"W{i}"], [f"h{i}"], name=f"mm{i}"),
                  helper.make_node("Relu", [f"h{i}"], [f"r{i}"], name=f"relu{i}")]
        x = f"r{i}"
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [8, width])],
                          [helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, [8, width])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _feeds(n: int = 10, width: int = 48):
    rng = np.random.default_rng(1)
    return [{"x": rng.standard_normal((8, width)).astype(np.float32)} for _ in range(n)]


def _steps(seen):
    """step -> list of (done, total) in the order heard."""
    out: dict[str, list] = {}
    for s, d, t in seen:
        out.setdefault(s, []).append((d, t))
    return out


def _counts_up_to_its_total(calls) -> bool:
    dones = [d for d, _ in calls]
    return dones == sorted(dones) and calls[-1][0] == calls[-1][1] > 0


def test_the_callback_hears_probes_speed_checks_and_validation():
    seen = []
    recipe = [{"type": "sparsify", "sparsity": 0.5, "allocation": "sensitivity", "min_weight_elements": 0},
              {"type": "lowrank", "params_ratio": 0.5, "allocation": "sensitivity", "min_weight_elements": 0,
               "speed_check": False}]  # (pairs this small are never faster: the speed check would keep no rank)
    onnxcomp.compress(_chain(), recipe, calibration_data=_feeds(), progress=lambda *a: seen.append(a))
    timed = []  # a second compression, heard apart: its own probes count up to their own total
    onnxcomp.compress(_chain(), [{"type": "lowrank", "params_ratio": 0.5, "min_weight_elements": 0}],
                      calibration_data=_feeds(), progress=lambda *a: timed.append(a), validate=False)
    steps = {**_steps(seen), "lowrank: speed checks": _steps(timed).get("lowrank: speed checks", [])}
    for name in ("sparsify: sensitivity probes", "lowrank: sensitivity probes", "lowrank: speed checks",
                 "validation: outputs", "validation: latency"):
        assert steps.get(name), sorted(steps)
        assert _counts_up_to_its_total(steps[name]), (name, steps[name])
    # 3 layers x the sparsity ladder's nonzero levels, one tick per probe
    assert steps["sparsify: sensitivity probes"][-1][1] % 3 == 0
    # inner steps are reported while a pass runs: between its "pass i/n" tick and the next
    order = [s for s, _, _ in seen]
    first_probe = order.index("sparsify: sensitivity probes")
    assert order.index("pass 1/2: sparsify") < first_probe < order.index("pass 2/2: lowrank")
    assert order.index("pass 2/2: lowrank") < order.index("lowrank: sensitivity probes") < order.index("passes")
    assert order.index("passes") < order.index("validation: outputs")


def test_auto_reports_each_candidate_inside_its_bar_and_times_on_the_given_shapes(monkeypatch):
    import onnxcomp.validation as validation

    shapes_seen = []
    real = validation.validate

    def spy(*args, **kwargs):
        shapes_seen.append(kwargs.get("input_shapes"))
        return real(*args, **kwargs)

    monkeypatch.setattr(validation, "validate", spy)
    seen = []
    res = onnxcomp.compress(testing.digits_cnn_path(), "fast", progress=lambda *a: seen.append(a),
                            input_shapes={"input": [3, 1, 8, 8]})
    steps = _steps(seen)
    n = len(res.report.search["trials"])
    assert steps["auto search"][-1] == (n, n) and _counts_up_to_its_total(steps["auto search"])
    inner = [s for s in steps if " · " in s]
    assert any(s.startswith("lossless · pass 1/") for s in inner), inner
    assert any(s.endswith("· validation: outputs") for s in inner)
    assert not any(is_outer(s) for s in inner)  # a candidate's passes never take the search's line
    # every check and timing of the search ran on the stated shapes, and so did the final validation
    assert shapes_seen and all(s == {"input": [3, 1, 8, 8]} for s in shapes_seen), shapes_seen
    assert res.report.validation.timed_shapes == {"input": [[3, 1, 8, 8]]}


def test_terminal_view_has_two_lines_with_rate_and_eta():
    out = io.StringIO()
    bars = TerminalProgress(file=out)
    bars("pass 1/2: quantize", 0, 2)
    for i in range(6):
        bars("calibration: ranges", i + 1, 12)
        time.sleep(0.25)
    bars("pass 2/2: cleanup", 1, 2)
    bars.close()
    text = out.getvalue()
    assert "pass 1/2: quantize" in text and "calibration: ranges" in text and "pass 2/2: cleanup" in text
    assert re.search(r"calibration: ranges: +\d+%.*\d+/12 \[\d\d:\d\d<\d\d:\d\d, +[\d.]+it/s\]", text), text
    assert "\x1b[A" in text  # the inner bar sits on the line below the pass's


def test_counter_and_within():
    seen = []
    c = Counter(lambda *a: seen.append(a), "probes", 3)
    c.tick()
    c.tick(5)  # never past the total
    assert seen == [("probes", 0, 3), ("probes", 1, 3), ("probes", 3, 3)]
    Counter(None, "nothing", 3).tick()  # no callback: a no-op
    inner = within(lambda *a: seen.append(a), "int8-static")
    inner("pass 1/1: quantize", 0, 1)
    assert seen[-1] == ("int8-static · pass 1/1: quantize", 0, 1) and within(None, "x") is None


def test_progress_true_is_quiet_when_stderr_is_not_a_terminal(capfd):
    onnxcomp.compress(_chain(), [{"type": "sparsify", "sparsity": 0.5, "allocation": "sensitivity",
                                  "min_weight_elements": 0}], calibration_data=_feeds(), progress=True)
    onnxcomp.validate(_chain(), _chain(), progress=True)
    assert capfd.readouterr().err == ""
