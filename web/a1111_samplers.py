"""AUTOMATIC1111's sampler names, mapped onto the schedulers our nodes have.

A1111 names a sampler ("DPM++ 2M") and, since 1.9, a noise schedule apart
("karras"); the old combined names ("DPM++ 2M Karras") still work there, and
here. Each pair becomes one of our scheduler names (gpu_node.pipeline's
SCHEDULERS); a pair no node can run is refused by name, never approximated.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from web.errors import NotFound, field_error

# The sampler A1111's API uses when a request names none (its `sampler_index`
# default).
DEFAULT_SAMPLER = "Euler"
# Schedule names meaning "the sampler's own" (A1111's "Automatic").
AUTOMATIC = frozenset({"", "automatic"})
KARRAS = "karras"


@dataclass(frozen=True)
class Sampler:
    """One A1111 sampler: our scheduler, and its Karras-schedule variant."""

    name: str
    scheduler: str
    aliases: tuple[str, ...] = ()
    karras: str | None = None
    options: dict[str, str] = field(default_factory=dict)


SAMPLERS: tuple[Sampler, ...] = (
    Sampler(
        "Euler a",
        "euler_a",
        ("k_euler_a", "k_euler_ancestral"),
        options={"uses_ensd": "True"},
    ),
    Sampler("Euler", "euler", ("k_euler",)),
    Sampler("LMS", "lms", ("k_lms",)),
    Sampler("DPM++ 2M", "dpmpp_2m", ("k_dpmpp_2m",), karras="dpmpp_2m_karras"),
    Sampler(
        "DPM++ 2M Karras",
        "dpmpp_2m_karras",
        ("k_dpmpp_2m_ka",),
        karras="dpmpp_2m_karras",
        options={"scheduler": "karras"},
    ),
    Sampler("DDIM", "ddim", ("ddim",), options={"default_eta_is_0": "True"}),
    Sampler("PLMS", "pndm", ("plms",)),
    Sampler("UniPC", "unipc", ("unipc",)),
)
# Ancestral samplers add noise at each step with eta 1 (A1111's default).
ANCESTRAL = frozenset({"euler_a"})


def _lookup() -> dict[str, Sampler]:
    table: dict[str, Sampler] = {}
    for sampler in SAMPLERS:
        for name in (sampler.name, *sampler.aliases):
            table[name.lower()] = sampler
    return table


_BY_NAME = _lookup()


def offered(schedulers: set[str]) -> list[Sampler]:
    """The samplers whose scheduler is among `schedulers`, in A1111's order."""
    return [sampler for sampler in SAMPLERS if sampler.scheduler in schedulers]


def scheduler_for(name: str | None, schedule: str | None, available: list[str]) -> str:
    """Our scheduler for A1111's sampler `name` and `schedule` on a model whose
    nodes have `available`: 404 for a sampler A1111 would not know either
    (as A1111 answers), 422 for one the model's nodes cannot run."""
    wanted = name or DEFAULT_SAMPLER
    sampler = _BY_NAME.get(wanted.lower())
    if sampler is None:
        known = ", ".join(s.name for s in offered(set(available)))
        raise NotFound(f"Sampler not found: {wanted!r} (available: {known}).")
    kind = (schedule or "").lower()
    if kind in AUTOMATIC:
        scheduler = sampler.scheduler
    elif kind == KARRAS and sampler.karras is not None:
        scheduler = sampler.karras
    else:
        raise field_error(
            "scheduler",
            f"Scheduler {schedule!r} is not available with {sampler.name!r}: "
            "send automatic" + (" or karras." if sampler.karras is not None else "."),
        )
    if scheduler not in available:
        known = ", ".join(s.name for s in offered(set(available))) or "none"
        raise field_error(
            "sampler_name",
            f"Sampler {sampler.name!r} (schedule {kind or 'automatic'}) is not "
            f"available for this model (available: {known}).",
        )
    return scheduler


def sampler_name(scheduler: str) -> str:
    """A1111's name for one of our schedulers (for `info`)."""
    for sampler in SAMPLERS:
        if sampler.scheduler == scheduler:
            return sampler.name
    return scheduler
