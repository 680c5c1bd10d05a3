"""The `auto` cost model's constants (csrc/cuda/persistent.cuh, CostModel) against the
committed H100 measurements, through scripts/fit_cost_model.py: a change of the constants
that no longer fits the data fails here. No GPU needed."""
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


def test_the_header_constants_fit_the_committed_h100_run(capsys):
    ratios = fit.main([])  # the run staged rows one element at a time: --staging old
    capsys.readouterr()
    for mode in ("fwd", "bwd"):
        rs = ratios[mode]
        assert len(rs) == 32, mode  # float32: LSTM and GRU 12 shapes each, RNN 8 (measured)
        assert 0.9 <= fit.geo(rs) <= 1.15, (mode, fit.geo(rs))
        assert 0.7 <= min(rs) and max(rs) <= 1.3, (mode, min(rs), max(rs))


def test_batched_staging_is_predicted_no_slower_and_far_faster_where_it_dominated():
    """With loads batched the model's persistent time never rises, and falls several-fold
    where the old staging dominated (N = 64, H = 768: 48 round trips a tile, now 2)."""
    model = fit.Model(fit.header_constants(), sms=132, clock_mhz=1980.0)
    for cell in ("lstm", "gru", "rnn"):
        for N in (1, 16, 64, 256):
            for H in (256, 768, 1024):
                for backward in (False, True):
                    old = model.persistent_us(cell, N, H, backward, "old")
                    new = model.persistent_us(cell, N, H, backward, "new")
                    assert new <= old + 1e-9, (cell, N, H, backward)
    assert (model.persistent_us("lstm", 64, 768, False, "old")
            > 3 * model.persistent_us("lstm", 64, 768, False, "new"))


def test_now_what_if_changes_the_predictions_only(capsys):
    """--now NAME=VALUE replaces a constant in the predictions (`now`, `clustr`, auto's
    pick), not in the fit: a higher FFMA share makes no predicted persistent time slower
    and the compute-bound ones faster, while the fit's ratios stay as they are."""
    base = fit.main([])
    out_base = capsys.readouterr().out
    what_if = fit.main(["--now", "kFfmaShare=0.7"])
    out_if = capsys.readouterr().out
    fit.main([])  # leave the emulator's cached constants as the header's
    capsys.readouterr()
    assert base == what_if  # the fit's ratios: measured against the header's constants

    def column(out, col):  # the `now` column per case
        rows = {}
        for line in out.splitlines():
            parts = line.split("|")
            if len(parts) >= 4 and parts[0].split() and parts[0].split()[0] in fit.GATES:
                rows[tuple(parts[0].split())] = float(parts[1].split()[col])
        return rows

    now_base, now_if = column(out_base, 3), column(out_if, 3)
    assert now_base.keys() == now_if.keys() and len(now_base) == 64
    assert all(now_if[k] <= now_base[k] + 1e-9 for k in now_base)
    assert now_if[("lstm", "float32", "256", "1024", "fwd")] < 0.8 * now_base[
        ("lstm", "float32", "256", "1024", "fwd")]
    with pytest.raises(SystemExit, match="kNoSuchConstant"):
        fit.main(["--now", "kNoSuchConstant=1"])
