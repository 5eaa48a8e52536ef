"""Which bit-width each block of a CoQuant network computes at (seed 002): one shared, mutable state that every
switchable quantizer and BatchNorm of the network reads on each forward."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class BitState:
    """The bit-width of each of ``n_blocks`` blocks (the reconstruction partition's units) for the next forward.

    ``trained`` is the set B the network learns, highest first; evaluation may set any bit-width that has a
    quantizer and a BatchNorm (:func:`quantbench.coquant.switch.add_bits`).
    """

    trained: tuple[int, ...]
    n_blocks: int
    block_bits: list[int] = field(default_factory=list)
    #: the bit-width a training forward trains (its swapped-in teacher blocks do not update their statistics)
    student: int | None = None

    def __post_init__(self) -> None:
        self.trained = tuple(sorted(set(self.trained), reverse=True))
        if not self.trained:
            raise ValueError("CoQuant needs at least one bit-width in B")
        if self.n_blocks < 1:
            raise ValueError("CoQuant needs at least one block")
        if not self.block_bits:
            self.block_bits = [self.trained[0]] * self.n_blocks

    def bits_of(self, block: int) -> int:
        return self.block_bits[block]

    def set_all(self, bits: int) -> None:
        self.block_bits = [int(bits)] * self.n_blocks

    def set_blocks(self, bits: Sequence[int]) -> None:
        if len(bits) != self.n_blocks:
            raise ValueError(f"{len(bits)} bit-widths given for {self.n_blocks} blocks")
        self.block_bits = [int(b) for b in bits]

    @contextmanager
    def at(self, bits: int | Sequence[int], student: int | None = None) -> Iterator[None]:
        """Run the network at ``bits`` (one for every block, or one per block) training ``student`` (default: the
        single bit-width given), then restore the previous state."""
        saved = (list(self.block_bits), self.student)
        if isinstance(bits, int):
            self.set_all(bits)
            self.student = bits if student is None else student
        else:
            self.set_blocks(bits)
            self.student = student
        try:
            yield
        finally:
            self.block_bits, self.student = saved
