"""Re-draws a benchmark's PNG from its JSON: `python -m benchmarks.plot results.json [out.png]`."""
from rnnfast.bench.plot import main

if __name__ == "__main__":
    main()
