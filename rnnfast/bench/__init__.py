"""rnnfast's benchmark suite: `python -m rnnfast.bench --help` (or, from a checkout,
`python -m benchmarks.bench`). shapes.py holds the shape registry, contenders.py every
implementation timed, timing.py the clocks, report.py the tables and JSON, plot.py the
PNG, runner.py the command line."""
