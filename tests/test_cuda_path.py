"""The CUDA path switch (rnnfast.cuda_path and friends, RNNFAST_CUDA_PATH): its API on any
machine. Which path runs on a GPU, and that both give torch.nn's results, is tested in
test_cuda.py."""
import os
import subprocess
import sys

import pytest
import torch

import rnnfast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


DEFAULT = "auto"


def test_default():
    assert rnnfast.get_cuda_path() == DEFAULT


def test_set_returns_the_previous_setting():
    assert rnnfast.set_cuda_path("step") == DEFAULT
    try:
        assert rnnfast.get_cuda_path() == "step"
        assert rnnfast.set_cuda_path("persistent") == "step"
        assert rnnfast.get_cuda_path() == "persistent"
        assert rnnfast.set_cuda_path("cluster") == "persistent"
        assert rnnfast.get_cuda_path() == "cluster"
    finally:
        rnnfast.set_cuda_path(DEFAULT)
    assert rnnfast.get_cuda_path() == DEFAULT


def test_context_manager_restores_even_after_an_error():
    with pytest.raises(KeyError):
        with rnnfast.cuda_path("persistent"):
            assert rnnfast.get_cuda_path() == "persistent"
            raise KeyError("inside")
    assert rnnfast.get_cuda_path() == DEFAULT


@pytest.mark.parametrize("bad", ["fast", "", "Persistent", "clusters"])
def test_unknown_path_is_a_clear_error(bad):
    with pytest.raises(ValueError,
                       match="expected 'auto', 'persistent', 'cluster' or 'step', but got"):
        rnnfast.set_cuda_path(bad)
    assert rnnfast.get_cuda_path() == DEFAULT


def test_non_string_path_is_a_clear_error():
    with pytest.raises(TypeError, match="expected the path as a str"):
        rnnfast.set_cuda_path(1)


def test_the_cpu_ignores_the_setting():
    f = rnnfast.LSTM(3, 5)
    x = torch.randn(4, 2, 3)
    expected = f(x)[0]
    for path in ("persistent", "cluster"):
        with rnnfast.cuda_path(path):
            assert torch.equal(f(x)[0], expected)


def _in_child(code, env_value):
    env = dict(os.environ, RNNFAST_CUDA_PATH=env_value)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("value", ["step", "persistent", "cluster", "auto"])
def test_environment_variable_sets_the_initial_value(value):
    done = _in_child("import rnnfast; print(rnnfast.get_cuda_path())", value)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == value


def test_bad_environment_variable_is_a_clear_error():
    done = _in_child("import rnnfast; rnnfast.get_cuda_path()", "fastest")
    assert done.returncode != 0
    assert ("RNNFAST_CUDA_PATH: expected 'auto', 'persistent', 'cluster' or 'step', but got "
            "'fastest'") in done.stderr


def test_no_plan_is_noted_before_a_cuda_call():
    """rnnfast._ops._last_cuda_plan(): (None, None) until a CUDA op has planned; the CPU
    ops never plan."""
    code = ("import torch, rnnfast\n"
            "from rnnfast._ops import _last_cuda_plan\n"
            "assert _last_cuda_plan() == (None, None)\n"
            "f = rnnfast.LSTM(3, 5)\n"
            "f(torch.randn(4, 2, 3, requires_grad=True))[0].sum().backward()\n"
            "print(_last_cuda_plan())")
    done = _in_child(code, "persistent")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(None, None)"


def test_no_step_variant_is_noted_on_the_cpu():
    """rnnfast._ops._last_step_variant(): (None, None) until a CUDA op runs on the per-step
    path; the CPU ops never note one, whatever RNNFAST_STEP_FUSED and RNNFAST_STEP_GRAPH say."""
    code = ("import os, torch, rnnfast\n"
            "from rnnfast._ops import _last_step_variant\n"
            "os.environ['RNNFAST_STEP_FUSED'] = '1'\n"
            "os.environ['RNNFAST_STEP_GRAPH'] = '1'\n"
            "assert _last_step_variant() == (None, None)\n"
            "f = rnnfast.GRU(3, 8)\n"
            "f(torch.randn(4, 2, 3, requires_grad=True))[0].sum().backward()\n"
            "print(_last_step_variant())")
    done = _in_child(code, "step")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(None, None)"
