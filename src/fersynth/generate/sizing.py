"""How many images to generate per class: sized from what the grid's variants need.

DESIGN.md, "Evaluation protocol": a row called Expanded must really hold generated images in
every class it rebalances. Algorithm 4 (fersynth.augment) adds at most what a class' accepted
pool holds, so generation is sized from the other end:

    needed_c    = max over the grid's variants of what the variant asks of class c
                  (augment.wanted: the rho or balance target minus the real count)
    outputs_c   = min(max_per_class, ceil(needed_c / acceptance_c)), and at least the fixed
                  size (max_seeds_per_class x K) when a variant takes the whole pool
                  (expanded, synthetic: they ask for no count)
    seeds_c     = min(training images of c, max_seeds_per_class, ceil(outputs_c / K))
    K_c         = K, raised to min(max_k, ceil(outputs_c / seeds_c)) when c has too few seeds

`acceptance_c` is the share of c's generated images the vote is expected to accept
(`generate.acceptance`; a previous run's verify report measures it). The plan is a pure
function of the training counts and the settings, so generate, merge and every shard compute
the same one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fersynth.classes import CLASSES
from fersynth.settings import GenerateSettings


@dataclass(frozen=True)
class ClassPlan:
    """One class' generation: what the variants need, the outputs aimed at, seeds and K."""

    real: int  # training images of the class (the seed images it can draw on)
    needed: int  # accepted images the grid's variants ask for
    outputs: int  # generated outputs aimed at (needed / acceptance, capped)
    seeds: int  # seed images drawn
    k: int  # outputs per seed image

    @property
    def generated(self) -> int:
        return self.seeds * self.k


def needed_per_class(variants: list[str], counts: dict[str, int], rho: float) -> dict[str, int]:
    """Accepted images each class needs for the largest ask of `variants` (augment.wanted with
    an unlimited pool); a variant that takes the whole pool asks for no count."""
    from fersynth.augment import TAKES_WHOLE_POOL, wanted

    unlimited = {name: 10**9 for name in CLASSES}
    needed = dict.fromkeys(CLASSES, 0)
    for variant in variants:
        if variant in ("original", "identities", *TAKES_WHOLE_POOL):
            continue  # nothing, new identities (generate.identities), or no count (the fixed size)
        asks = wanted(variant, counts, unlimited, rho)
        for name in CLASSES:
            needed[name] = max(needed[name], int(asks.get(name, 0)))
    return needed


def plan_generation(settings: GenerateSettings, counts: dict[str, int]) -> dict[str, ClassPlan]:
    """Each expanded class' plan (`generate.classes`; null: every class) from its training
    count `counts` and the settings (see the module docstring)."""
    from fersynth.augment import TAKES_WHOLE_POOL

    classes = [name for name in CLASSES if settings.classes is None or name in settings.classes]
    limit = settings.max_seeds_per_class
    fixed = {name: min(counts.get(name, 0), limit or counts.get(name, 0)) * settings.k for name in CLASSES}
    if settings.sizing == "fixed" or settings.variants is None:  # no grid to size for: fixed
        return {
            name: ClassPlan(
                counts.get(name, 0), fixed[name], fixed[name], fixed[name] // settings.k, settings.k
            )
            for name in classes
        }
    variants = list(settings.variants)
    needed = needed_per_class(variants, counts, settings.rho or 1.0)
    whole_pool = any(variant in TAKES_WHOLE_POOL for variant in variants)
    plans = {}
    for name in classes:
        real = counts.get(name, 0)
        outputs = math.ceil(needed[name] / settings.acceptance_of(name)) if needed[name] else 0
        if whole_pool:  # expanded, synthetic: the fixed size at least
            outputs = max(outputs, fixed[name])
        if settings.max_per_class is not None:
            outputs = min(outputs, settings.max_per_class)
        seeds = min(real, limit or real, math.ceil(outputs / settings.k))
        k = settings.k
        if seeds and seeds * k < outputs:  # too few seed images at K: more outputs per seed
            k = min(settings.max_k, max(settings.k, math.ceil(outputs / seeds)))
        plans[name] = ClassPlan(real, needed[name], outputs, seeds, k if seeds else settings.k)
    return plans
