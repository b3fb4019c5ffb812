"""A resume must not change the domain-affine placement's level-1 map without saying so.

The domain -> expert map (locmoe.placement.plan_placement) depends on the node count: a run resumed
on another cluster size would route every domain to other experts than the ones it trained, and its
drops change with no message. The completion marker of each checkpoint stores the map it trained
with; a resume compares it with the map of the new layout.
"""
import numpy as np

from locmoe.errors import ConfigError
from pangu_sigma.training import checkpoint

MARKER_KEY = "level1_experts"


def placement_map(placement):
    """The [D, E] 0/1 map as nested lists for the marker, or None without a placement."""
    return None if placement is None else np.asarray(placement.domain_experts).astype(int).tolist()


def check_placement_map(stored, placement, allowed, log):
    """stored: the marker's map (None: the run had no placement, or predates the check). A changed map
    is refused unless --allow-config-change names data.placement (or all); then it is said in one line."""
    current = placement_map(placement)
    if stored is None or current is None or stored == current:
        return
    changed = [d for d, (old, new) in enumerate(zip(stored, current)) if old != new]
    if len(stored) != len(current):
        changed = list(range(max(len(stored), len(current))))
    describe = "; ".join(
        f"domain {d}: experts {np.nonzero(stored[d])[0].tolist() if d < len(stored) else []} -> "
        f"{np.nonzero(current[d])[0].tolist() if d < len(current) else []}" for d in changed[:4])
    if any(a.rstrip(".") in ("data.placement", "data", "all") for a in allowed):
        log(f"[train] note: the domain-affine placement's level-1 map changes on this layout ({describe}); "
            "routing and drops will differ from the run's (--allow-config-change data.placement)")
        return
    raise ConfigError("data.placement", "domain_affine",
                      f"a layout with the run's level-1 map: on this one it changes ({describe}), so every "
                      "moved domain would reach other experts than it trained; resume on the run's node count, "
                      "or pass --allow-config-change data.placement to accept the new map")


def check_resume_placement(output_dir, placement, allowed, log):
    """check_placement_map against the map in the newest complete checkpoint's marker of output_dir."""
    found = checkpoint.latest_complete(output_dir)
    if found is not None:
        check_placement_map(found[1].get(MARKER_KEY), placement, allowed, log)
