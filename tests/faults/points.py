"""Where a fault lands: randomized, but reproducible from the seed each test prints.

VIM_FAULT_SEED=N replays a failing run's injection points; unset, each session draws a fresh seed.
"""

import os
import random
import zlib

_SESSION_SEED = int(os.environ.get("VIM_FAULT_SEED") or random.SystemRandom().randrange(2**31))


def fault_rng(name: str) -> random.Random:
    """A generator for one fault's injection points, seeded by the session seed and the fault's name."""
    seed = _SESSION_SEED ^ zlib.crc32(name.encode())
    print(f"fault {name}: VIM_FAULT_SEED={_SESSION_SEED} (points seed {seed})")
    return random.Random(seed)
