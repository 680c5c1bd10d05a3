"""The `auto` cost model's constants (csrc/cuda/persistent.cuh, CostModel) against the
committed H100 measurements, through scripts/fit_cost_model.py: a change of the constants
that no longer fits the data, or whose picks lose to cuDNN where the data says they won,
fails here. No GPU needed."""
import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_fit():
    path = os.path.join(ROOT, "scripts", "fit_cost_model.py")
    spec = importlib.util.spec_from_file_location("fit_cost_model", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


fit = load_fit()


@pytest.fixture(scope="module")
def committed():
    return fit.main([])


# Model over measured (both with the shared whole-sequence GEMMs) for each path and direction
# over the five committed runs (scripts/fit_cost_model.py's RUNS). The grid variant's
# forward's worst case is the 64-row tensor-core tile at H = 1024 (bfloat16, N = 64 and 256),
# charged up to 1.6x of its measured time; the picks there stay right (the per-step path or
# the cluster variant at N = 256, the grid variant at N = 64). The per-step path's host
# time varies from call to call (14-25 us a step where its GEMM is small), and a backward
# is a forward+backward less a forward, each with that noise: at small sizes, where the
# per-step path is never the pick, its backward ranges 0.36x-3.1x.
@pytest.mark.parametrize("path,mode,count,geo_range,worst", [
    ("persistent", "fwd", 72, (0.95, 1.15), (0.8, 1.7)),
    ("persistent", "bwd", 71, (0.9, 1.1), (0.7, 1.25)),
    ("cluster", "fwd", 36, (0.9, 1.1), (0.65, 1.4)),
    ("cluster", "bwd", 35, (0.9, 1.1), (0.55, 1.5)),
    ("step", "fwd", 72, (0.85, 1.05), (0.45, 1.95)),
    ("step", "bwd", 71, (0.9, 1.1), (0.3, 3.2)),
    ("reg", "fwd", 18, (0.85, 1.05), (0.75, 1.15)),
])
def test_the_header_constants_fit_the_committed_h100_runs(committed, path, mode, count,
                                                          geo_range, worst, capsys):
    capsys.readouterr()
    ratios, _ = committed
    rs = ratios[(path, mode)]
    assert len(rs) == count, (path, mode, len(rs))
    assert geo_range[0] <= fit.geo(rs) <= geo_range[1], (path, mode, fit.geo(rs))
    assert worst[0] <= min(rs) and max(rs) <= worst[1], (path, mode, min(rs), max(rs))


def test_auto_picks_beat_cudnn_on_the_measured_cases(committed, capsys):
    """Where the path the model picks was measured, its time against cuDNN's: the geomean
    speedup over cuDNN at least 2.2x forward and backward (2.37x and 2.31x with the
    committed constants over 72 and 71 cases; the backward's losses are the bfloat16 per-step
    path at N = 64 and 256, H = 768 and 1024, and the float32 Elman RNN at H = 256)."""
    capsys.readouterr()
    _, picks = committed
    for mode, least in (("fwd", 2.2), ("bwd", 2.2)):
        assert len(picks[mode]) >= 70, mode
        assert fit.geo(picks[mode]) >= least, (mode, fit.geo(picks[mode]))


def picks_against_the_fastest(consts):
    """[(case, pick's time over the fastest measured path's)] where the pick and at least one
    other path the planner could take were measured (the tiled grid forward is not one where
    the register tile holds the layer)."""
    out = []
    for (cell, dtype, N, H, mode), meas in sorted(fit.measured_cases(fit.DEFAULT_JSONS).items()):
        est = fit.Model(consts, dtype).estimates(cell, N, H, mode == "bwd")
        paths = {p: meas[p] for p in fit.PATHS if p in meas and est.get(p) is not None
                 and not (p == "persistent" and est.get("reg") is not None)}
        pick = fit.pick(est)
        if len(paths) < 2 or pick not in paths:
            continue
        out.append(((cell, dtype, N, H, mode), paths[pick] / min(paths.values())))
    return out


def test_the_picks_are_near_the_fastest_measured_path():
    """The pick within 10% of the fastest measured path in all but 2 of 143 cases (the
    bfloat16 Elman RNN forward at N = 256, H = 768, where the cluster variant took 17.0 us a
    step against the model's 10.7 and the per-step path's 13.1; the bfloat16 LSTM backward at
    N = 256, H = 256: cluster 15.4 against the per-step path's noisy 12.2). With the
    constants before their refit to the fourth and fifth runs: 8 cases, the worst 2.95x."""
    rs = picks_against_the_fastest(fit.header_constants())
    far = [case for case, r in rs if r > 1.1]
    assert len(rs) >= 140 and len(far) <= 2, (len(rs), far)
    assert max(r for _, r in rs) <= 1.35, max(rs, key=lambda cr: cr[1])


def test_now_what_if_changes_the_picks_only(committed, capsys):
    """--now NAME=VALUE replaces a constant in the picks, not in the fit: a far higher cost
    per tile of the grid variant leaves the fit's ratios as they are and moves picks away
    from it."""
    capsys.readouterr()
    base_ratios, _ = committed
    fit.main([])
    out_base = capsys.readouterr().out
    ratios, _ = fit.main(["--now", "kTileUs=50"])
    out_if = capsys.readouterr().out
    assert ratios == base_ratios
    picked = lambda out: sum(" persistent " in line.split("|")[-1] for line in out.splitlines())
    assert picked(out_if) < picked(out_base)
    with pytest.raises(SystemExit, match="kNoSuchConstant"):
        fit.main(["--now", "kNoSuchConstant=1"])
