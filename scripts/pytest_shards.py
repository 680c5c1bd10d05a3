#!/usr/bin/env python3
"""Runs pytest on some test files in several processes at once, for scripts/gpu_check.sh:
the CUDA tests spend most of their time in the float64 reference loops on the CPU, which
one pytest process runs on one core while the GPU machine has 16.

The tests are collected once (`pytest --collect-only -q`), dealt round-robin into
--shards lists (so that each shard gets a share of every file and parametrization), and
each list runs in its own pytest process; their output is prefixed with the shard's
number. Each shard writes its JUnit XML; at the end (or when this script is stopped by a
signal, e.g. gpu_check's time limit: the running shards are stopped, and what finished
is kept) the shards' files are merged into one --junitxml (one testsuite, the counts
summed). The exit status is 0 when every shard passed, else the first non-zero one.

  python scripts/pytest_shards.py --shards 4 --junitxml out.xml -- tests/test_cuda.py -q

Arguments after `--` go to every pytest process: the test files, and options in one
word each (`--tb=short`, `-q`; not `-k EXPR`). --shards 1 runs one plain pytest process.
"""
import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import xml.etree.ElementTree as ET


def collect(pytest_args):
    """The node ids pytest would run for these arguments."""
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                           "-p", "no:cacheprovider", *pytest_args],
                          capture_output=True, text=True)
    ids = [line.strip() for line in done.stdout.splitlines() if "::" in line]
    if done.returncode not in (0, 5) or not ids:  # 5: no tests collected
        sys.stdout.write(done.stdout[-4000:] + done.stderr[-4000:])
    return ids, done.returncode


def merge(parts, path):
    """One JUnit file from the shards' (those that exist and parse)."""
    merged = ET.Element("testsuite", name="pytest")
    counts = dict(tests=0, failures=0, errors=0, skipped=0)
    seconds = 0.0
    for part in parts:
        try:
            root = ET.parse(part).getroot()
        except (OSError, ET.ParseError):
            continue
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        if suite is None:
            continue
        for k in counts:
            counts[k] += int(suite.get(k, 0))
        seconds = max(seconds, float(suite.get("time", 0)))
        merged.extend(list(suite))
    for k, v in counts.items():
        merged.set(k, str(v))
    merged.set("time", f"{seconds:.3f}")
    ET.ElementTree(merged).write(path, encoding="utf-8", xml_declaration=True)
    return counts


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "--" in argv:
        cut = argv.index("--")
        own, pytest_args = argv[:cut], argv[cut + 1:]
    else:
        own, pytest_args = argv, []
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--junitxml", required=True)
    args = ap.parse_args(own)
    if args.shards <= 1:
        return subprocess.call([sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
                                f"--junitxml={args.junitxml}", *pytest_args])
    files = [a for a in pytest_args if not a.startswith("-")]
    options = [a for a in pytest_args if a.startswith("-")]
    work = tempfile.mkdtemp(prefix="pytest_shards.")
    parts, procs = [], []

    def stop(signum, frame):
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        done = [part for part in parts if os.path.exists(part)]
        counts = merge(done, args.junitxml) if done else "none"  # no file: nothing finished
        print(f"pytest_shards: stopped by signal {signum}; finished shards: {counts}",
              flush=True)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    ids, rc = collect(files)  # (-q among the options would make the listing per file)
    if not ids:
        merge([], args.junitxml)
        return rc if rc != 0 else 5
    shards = [ids[i::args.shards] for i in range(args.shards)]
    shards = [s for s in shards if s]
    parts.extend(os.path.join(work, f"shard{i}.xml") for i in range(len(shards)))
    print(f"pytest_shards: {len(ids)} tests from {' '.join(files)} in {len(shards)} "
          f"processes", flush=True)
    for i, shard in enumerate(shards):
        listing = os.path.join(work, f"shard{i}.txt")
        with open(listing, "w") as f:
            f.write("\n".join(shard) + "\n")
        cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *options,
               f"--junitxml={parts[i]}", *shard]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, start_new_session=True))

    lock = threading.Lock()

    def relay(i, proc):
        for line in proc.stdout:
            with lock:
                sys.stdout.write(f"[{i}] {line}")
                sys.stdout.flush()

    threads = [threading.Thread(target=relay, args=(i, p), daemon=True)
               for i, p in enumerate(procs)]
    for t in threads:
        t.start()

    codes = [p.wait() for p in procs]
    for t in threads:
        t.join()
    counts = merge(parts, args.junitxml)
    print(f"pytest_shards: {counts['tests']} tests, {counts['failures']} failed, "
          f"{counts['errors']} errors, {counts['skipped']} skipped; shard exit codes {codes}",
          flush=True)
    return next((c for c in codes if c != 0), 0)


if __name__ == "__main__":
    sys.exit(main())
