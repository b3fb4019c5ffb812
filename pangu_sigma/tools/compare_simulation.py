"""compare_routers, simulation stage: each run's routing statistics on the cluster configs' step time."""
import os

from locmoe.errors import ConfigError

DEFAULT_CLUSTERS = (64, 128, 256)

def default_config_dir():
    """configs/ of the working directory if present, else the repository's."""
    if os.path.isdir("configs"):
        return "configs"
    return os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")


def cluster_config(router, size, config_dir):
    """(path, overrides) of the cluster config for a router and a size, or (None, None)."""
    own = os.path.join(config_dir, f"{router}_{size}n.yaml")
    if os.path.isfile(own):
        return own, []
    base = os.path.join(config_dir, f"locmoe_{size}n.yaml")
    if os.path.isfile(base):
        return base, [f"moe.router={router}"]
    return None, None


def simulate_router(router, train_cfg, log_path, clusters, config_dir, dispatch, hw):
    """{size: {...}} step time with the run's routing statistics and with uniform routing."""
    from pangu_sigma.build import dataset_meta, domain_sizes
    from pangu_sigma.config import load_config
    from pangu_sigma.tools.routing_stats import from_train_log
    from pangu_sigma.tools.simulate import run

    out = {}
    for size in clusters:
        path, overrides = cluster_config(router, size, config_dir)
        if path is None:
            out[size] = {"error": f"no {router}_{size}n.yaml or locmoe_{size}n.yaml in {config_dir}"}
            continue
        try:
            cluster_cfg = load_config(path, overrides)
            stats = from_train_log(log_path, train_cfg, cluster_cfg, world_size=size) \
                if train_cfg.model.moe_layer_num else None
            sizes = domain_sizes(dataset_meta(train_cfg))  # the placement of the corpus the routing came from
            routed = run(cluster_cfg, world_size=size, routing_stats=stats, dispatch=dispatch, hw=hw,
                         domain_sizes=sizes)
            uniform = run(cluster_cfg, world_size=size, dispatch=dispatch, hw=hw, domain_sizes=sizes)
        except ConfigError as err:
            out[size] = {"error": str(err)}
            continue
        keep = ("step_time", "breakdown", "a2a_fraction", "a2a_node_local_fraction", "communication", "compute")
        out[size] = {"config": path, "overrides": overrides,
                     "placement": stats["source"]["placement"] if stats else None,
                     "routed": {k: routed[k] for k in keep},
                     "uniform": {k: uniform[k] for k in keep},
                     "expert_rows_max_over_mean": [L["expert_rows_max"] / max(L["expert_rows_mean"], 1e-9)
                                                   for L in routed["layers"]]}
    return out
