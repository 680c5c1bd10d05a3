"""scripts/pytest_shards.py (gpu_check's CUDA test stage runs the tests in several pytest
processes with it): every test runs once, in some shard; the merged JUnit file holds the
summed counts and every test case; a failure in any shard makes the exit status non-zero;
stopped by a signal it stops its shards and writes nothing when none finished."""
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "pytest_shards.py")

TESTS = '''
import pytest

@pytest.mark.parametrize("i", range(7))
def test_numbers(i):
    assert i >= 0

def test_skipped():
    pytest.skip("on purpose")

def test_fails():
    assert {fail}
'''


def _write(tmp_path, fail):
    path = tmp_path / "test_sample.py"
    path.write_text(TESTS.format(fail="False" if fail else "True"))
    return str(path)


def _run(tmp_path, shards, fail):
    xml = tmp_path / "out.xml"
    done = subprocess.run([sys.executable, SCRIPT, "--shards", str(shards), "--junitxml",
                           str(xml), "--", "-q", _write(tmp_path, fail)],
                          capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    return done, ET.parse(xml).getroot()


def test_every_test_runs_once_and_the_counts_are_summed(tmp_path):
    done, suite = _run(tmp_path, 3, fail=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (suite.get("tests"), suite.get("failures"), suite.get("skipped")) == ("9", "0", "1")
    names = sorted(case.get("name") for case in suite.iter("testcase"))
    assert names == sorted([f"test_numbers[{i}]" for i in range(7)] +
                           ["test_skipped", "test_fails"])
    # three processes, each with its share
    assert {line[:3] for line in done.stdout.splitlines() if line.startswith("[")} == \
        {"[0]", "[1]", "[2]"}


def test_a_failure_in_one_shard_fails_the_run(tmp_path):
    done, suite = _run(tmp_path, 3, fail=True)
    assert done.returncode != 0
    assert suite.get("failures") == "1"
    assert suite.get("tests") == "9"


def test_one_shard_is_plain_pytest(tmp_path):
    done, suite = _run(tmp_path, 1, fail=False)
    assert done.returncode == 0, done.stdout + done.stderr
    tests = suite.get("tests") or suite.find("testsuite").get("tests")
    assert tests == "9"


def test_a_signal_stops_the_shards_and_keeps_no_file_when_none_finished(tmp_path):
    path = tmp_path / "test_slow.py"
    path.write_text("import time\n\ndef test_a():\n    time.sleep(60)\n\n"
                    "def test_b():\n    time.sleep(60)\n")
    xml = tmp_path / "out.xml"
    proc = subprocess.Popen([sys.executable, SCRIPT, "--shards", "2", "--junitxml", str(xml),
                             "--", "-q", str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=str(tmp_path))
    deadline = time.time() + 120
    seen = ""
    while time.time() < deadline and "in 2 processes" not in seen:
        seen += proc.stdout.readline()
    assert "in 2 processes" in seen, seen
    time.sleep(2)  # the shards are in their sleeps
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "stopped by signal 15; finished shards: none" in out
    assert not xml.exists()
