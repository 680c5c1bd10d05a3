"""The benchmark's shape registry and the named sets of shapes a run picks from.

A shape is one layer stack's problem: T steps, N sequences, C input and H hidden units,
L layers, D directions (2: bidirectional); a packed shape's sequences have lengths of
their own (`lengths`), the longest T, and go in as a PackedSequence. Names say what a
shape is for; the sets are what a run times unless filters (--hidden, --batch, ...)
narrow them.
"""
from dataclasses import dataclass
from typing import Dict, List

import torch


@dataclass(frozen=True)
class Shape:
    name: str
    T: int
    N: int
    C: int
    H: int
    layers: int = 1
    bidirectional: bool = False
    packed: bool = False

    @property
    def D(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def family(self) -> str:
        """Shapes that differ only in H: the lines of the speedup-vs-hidden-size plot."""
        return (f"T={self.T} N={self.N}" + (f" L={self.layers}" if self.layers > 1 else "")
                + (" bidir" if self.bidirectional else "") + (" packed" if self.packed else ""))

    def describe(self) -> str:
        return (f"T={self.T} N={self.N} C={self.C} H={self.H} L={self.layers} D={self.D}"
                + (f" packed ({self.rows} rows)" if self.packed else ""))

    @property
    def lengths(self) -> List[int]:
        """Each sequence's length: T for all, or for a packed shape, drawn (seeded by the
        shape) uniformly from [T / 4, T], the first T, in no order (unsorted, as data
        comes)."""
        if not self.packed:
            return [self.T] * self.N
        g = torch.Generator().manual_seed(self.T * 1000 + self.N)
        lengths = torch.randint(max(1, self.T // 4), self.T + 1, (self.N,), generator=g).tolist()
        lengths[0] = self.T
        return lengths

    @property
    def rows(self) -> int:
        """The steps of all sequences together: T * N, or a packed shape's sum of lengths."""
        return sum(self.lengths)


def _shapes() -> Dict[str, Shape]:
    s: List[Shape] = [
        # the fastrnns benchmark's shape (pytorch/benchmarks/fastrnns), and its batch-1 twin
        Shape("classic", 100, 64, 512, 512),
        Shape("batch1", 100, 1, 512, 512),
        Shape("long", 1024, 16, 256, 256),
        Shape("2layer", 100, 64, 256, 256, layers=2),
        Shape("bidir", 100, 64, 256, 256, bidirectional=True),
        Shape("2layer-bidir", 100, 32, 256, 256, layers=2, bidirectional=True),
        # the CUDA-kernel issue's shape
        Shape("issue3", 512, 64, 512, 512),
    ]
    # hidden-size sweeps at batch 64 and batch 1 (H=512 is classic / batch1)
    for H in (128, 256, 1024):
        s.append(Shape(f"n64-h{H}", 100, 64, H, H))
        s.append(Shape(f"n1-h{H}", 100, 1, H, H))
    # the persistent-kernel issue's table: T=1024, N in {1, 16, 64, 256}, H in {256, 768, 1024}
    for N in (1, 16, 64, 256):
        for H in (256, 768, 1024):
            s.append(Shape(f"t1024-n{N}-h{H}", 1024, N, H, H))
    # --quick: small versions of the same axes, about five minutes on 2 CPU cores
    for H in (128, 256, 512):
        s.append(Shape(f"quick-n16-h{H}", 64, 16, H, H))
    s.append(Shape("quick-n1-h256", 64, 1, 256, 256))
    s.append(Shape("quick-2layer-bidir", 64, 16, 128, 128, layers=2, bidirectional=True))
    # --set tiny: calls that are all fixed cost (a step of a tiny model, as the tutorial's
    # cell makes; the Python layers, the op's dispatch and its allocations)
    s.append(Shape("tiny-t1", 1, 1, 8, 8))
    s.append(Shape("tiny-t1-2layer-bidir", 1, 1, 8, 8, layers=2, bidirectional=True))
    s.append(Shape("tiny-t16", 16, 4, 16, 16))
    # --set packed: PackedSequence input, sequences of different lengths; a name
    # classifier's batch (as examples/names.py trains) and longer sequences, 1 and 2 layers
    s.append(Shape("packed-names", 16, 64, 64, 128, packed=True))
    s.append(Shape("packed-t100", 100, 32, 256, 256, packed=True))
    s.append(Shape("packed-t100-2layer-bidir", 100, 32, 256, 256, layers=2, bidirectional=True,
                   packed=True))
    return {x.name: x for x in s}


SHAPES: Dict[str, Shape] = _shapes()

_SWEEP = ["n64-h128", "n64-h256", "classic", "n64-h1024", "n1-h128", "n1-h256", "batch1", "n1-h1024"]
SETS: Dict[str, List[str]] = {
    "quick": [n for n in SHAPES if n.startswith("quick-")],
    # the full run on a CPU and on a GPU
    "full": _SWEEP + ["long", "2layer", "bidir", "2layer-bidir"],
    "issue7": [n for n in SHAPES if n.startswith("t1024-")],
    "tiny": [n for n in SHAPES if n.startswith("tiny-")],
    "packed": [n for n in SHAPES if n.startswith("packed-")],
    "all": [n for n in SHAPES if not n.startswith(("quick-", "tiny-", "packed-"))],
}
