"""The examples (examples/), each run in-process with a tiny configuration and both layers:
the loss falls, torch.nn's layers with the same seed give the same loss curve, the outputs
are written, and each task's score beats what needs no learning. Speed is measured by the
examples themselves, not asserted here.

Curve tolerance (examples.common.CURVE_RTOL, 1e-4 relative, per step): rnnfast and torch.nn
compute the same float32 math in different orders, so single losses differ by a few ulps
(~1e-7). Training feeds each difference into the next step's weights and amplifies it: in
the full runs it grows about tenfold every 50-80 steps whichever two float32 runs are
compared (torch.nn against itself with its weights nudged by one ulp passes 1e-4 at step 125
of the SimpleRNN run, rnnfast against torch.nn at step 266). These tiny runs are short
enough (at most 72 steps) that float32 noise stays near 1e-7, far below 1e-4, while a real difference (a wrong gradient, a dropout mask drawn differently) shows
up above it within a few steps.
"""
import argparse
import json

import numpy as np
import pytest
import torch

from examples import charlm, common, forecast, names

TINY = {
    "names-simple": (names, ["--model", "simple", "--max-names", "800", "--epochs", "3",
                             "--hidden", "32", "--batch-size", "32"]),
    "names-gru": (names, ["--model", "gru", "--max-names", "800", "--epochs", "3", "--hidden",
                          "32", "--batch-size", "32"]),
    "names-lstm": (names, ["--model", "lstm", "--max-names", "800", "--epochs", "3",
                           "--hidden", "32", "--batch-size", "32"]),
    "forecast": (forecast, ["--epochs", "8", "--hidden", "32", "--window", "20",
                            "--batch-size", "32", "--lr", "1e-2"]),
    "charlm": (charlm, ["--max-chars", "12000", "--epochs", "2", "--hidden", "32", "--embed",
                        "16", "--batch-size", "8", "--bptt", "50", "--sample-chars", "40"]),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each tiny configuration run with rnnfast, then with torch.nn: {name: {layer: result}}.
    On one thread: these runs are too small to gain from two, and on a machine whose cores
    other processes share, each two-thread parallel region can wait out a time slice for
    its preempted partner: with another process busy here this file took 508 s on two
    threads and 36 s on one."""
    out = tmp_path_factory.mktemp("examples-out")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = {}
        for name, (module, argv) in TINY.items():
            results[name] = {layer: module.main(argv + ["--layer", layer, "--out", str(out),
                                                        "--speed-seconds", "0"])
                             for layer in common.LAYERS}
    finally:
        torch.set_num_threads(threads)
    return results


@pytest.mark.parametrize("name", TINY)
def test_loss_falls(runs, name):
    for layer, r in runs[name].items():
        assert r["last_loss"] < 0.9 * r["first_loss"], (layer, r["first_loss"], r["last_loss"])
        held_out = [e["loss"] for e in r["history"]["eval"]]
        assert held_out[-1] < held_out[0], (layer, held_out)


@pytest.mark.parametrize("name", TINY)
def test_torch_layer_gives_the_same_loss_curve(runs, name):
    fast, ref = runs[name]["rnnfast"], runs[name]["torch"]
    assert fast["config"] == ref["config"]
    a, b = fast["history"]["step_loss"], ref["history"]["step_loss"]
    assert len(a) == len(b) > 5
    diff = common.rel_diff(a, b).max()
    assert diff <= common.CURVE_RTOL, f"{name}: loss curves differ by {diff:.2e} relative"
    # the torch.nn run found the rnnfast run's record and compared the curves itself
    assert ref["vs_other_layer"]["max_rel_diff"] == diff
    assert ref["vs_other_layer"]["steps_within_rtol"] == len(a)
    # the held-out losses, taken in eval mode, agree as well
    eval_a = [e["loss"] for e in fast["history"]["eval"]]
    eval_b = [e["loss"] for e in ref["history"]["eval"]]
    assert common.rel_diff(eval_a, eval_b).max() <= common.CURVE_RTOL


@pytest.mark.parametrize("name", TINY)
def test_outputs_written(runs, name):
    for layer, r in runs[name].items():
        pngs = [f for f in r["files"] if f.endswith(".png")]
        assert len(pngs) >= (1 if name == "charlm" else 2)
        for f in r["files"]:
            data = open(f, "rb").read()
            assert len(data) > 1000 if f.endswith(".png") else data, f
            if f.endswith(".png"):
                assert data.startswith(b"\x89PNG\r\n\x1a\n"), f
        loss_png = next(f for f in pngs if f.endswith("-loss.png"))
        record = json.loads(open(loss_png.replace("-loss.png", ".json")).read())
        assert record["history"]["step_loss"] == r["history"]["step_loss"]
        assert record["speed"]["ratio"] > 0 and record["seconds_per_epoch"] > 0


@pytest.mark.parametrize("name", ["names-simple", "names-gru", "names-lstm"])
def test_names_accuracy_above_chance(runs, name):
    for r in runs[name].values():
        m = r["metrics"]
        # the majority class's share is what a model that learned nothing would score
        assert m["test_accuracy"] > 2 * m["majority_class"]
        confusion = np.array(m["confusion"])
        assert confusion.shape == (len(names.LANGUAGES),) * 2
        assert np.trace(confusion) / confusion.sum() == pytest.approx(m["test_accuracy"])


def test_forecast_beats_naive_one_step(runs):
    for r in runs["forecast"].values():
        s = r["metrics"]["scores"]
        assert s["lstm_one_step"]["rmse"] < s["naive_last_value"]["rmse"]


def test_charlm_below_uniform_bits(runs):
    for r in runs["charlm"].values():
        m = r["metrics"]
        assert m["held_out_bpc"] < 0.75 * m["uniform_bpc"]
        assert len(m["sample"]) == len("def ") + 40


def test_curves_compared_only_with_the_same_configuration(runs, tmp_path):
    r = runs["forecast"]["rnnfast"]
    out = tmp_path
    (out / "forecast-torch.json").write_text(json.dumps(runs["forecast"]["torch"]))
    args = argparse.Namespace(**r["config"], layer="rnnfast", out=out, speed_seconds=0)
    assert common.other_layer_run(out, "forecast", args) is not None
    args.seed += 1
    assert common.other_layer_run(out, "forecast", args) is None
