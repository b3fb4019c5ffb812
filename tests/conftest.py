"""Shared fixtures: a tiny prepared corpus (built once per session) and tiny run configs."""
import os

os.environ.setdefault("GLOG_v", "3")

import mindspore as ms  # noqa: E402
import pytest  # noqa: E402

# The whole session runs on the CPU device, chosen before any test runs a kernel: MindSpore
# refuses set_device once its runtime has started (mindspore/device_manager.py), and the
# training entry point calls it with the same target, which is then a no-op.
ms.set_device("CPU")


# The msrun launches' files first (stable sort: the rest keep their order). Under pytest-xdist
# (run_scripts/run_tests.sh: two workers, a file each) each of these long files then starts at once on a worker
# while the other worker takes the short files, instead of one starting late and running alone at the end.
FIRST_FILES = ("test_parallel_equivalence.py", "test_checkpoint_msrun.py")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: FIRST_FILES.index(item.path.name) if item.path.name in FIRST_FILES
               else len(FIRST_FILES))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A prepared dataset (vocab 512, seq 16) from ~200 kB of the default corpus."""
    from pangu_sigma.data.default_corpus import build_default_corpus
    from pangu_sigma.data.prepare import prepare

    root = tmp_path_factory.mktemp("tiny_data")
    build_default_corpus(str(root / "corpus"), max_bytes=200_000)
    prepare(str(root / "corpus"), str(root / "data"), vocab_size=512, seq_length=16, valid_fraction=0.05,
            progress_every=0, workers=1)
    return str(root / "data")


def tiny_run_config(data_dir, output_dir, overrides=()):
    """A RunConfig small enough to compile and train in seconds on 2 cores."""
    from pangu_sigma.config import config_from_dict

    raw = {
        "model": {"seq_length": 16, "hidden_size": 32, "num_layers": 2, "num_heads": 2, "ffn_hidden_size": 64,
                  "moe_layer_num": 1},
        "moe": {"router": "locmoe", "expert_num_per_dp_dim": 1, "capacity_factor": 2.0,
                "locality_loss_coef": 0.001},
        "parallel": {"expert_parallel": 4, "devices_per_node": 2, "virtual_world_size": 4},
        "data": {"dataset_dir": data_dir},
        "train": {"batch_size": 8, "sink_size": 5, "train_steps": 30, "output_dir": output_dir},
        "optim": {"lr": 0.005, "min_lr": 0.0005, "warmup_steps": 3},
        "checkpoint": {"save_steps": 10, "keep_last": 5},
        "logging": {"log_steps": 5, "expert_stats_steps": 15},
    }
    return config_from_dict(raw, list(overrides))


def _quiet(*_):
    pass


def assert_resume_is_bitwise(cfg, full, stop_after, steps):
    """Train `cfg` to step `stop_after` (its checkpoint), resume it to `steps`: each step's loss equals
    the uninterrupted run's (`full`, train()'s summary of the same config) to the bit."""
    from pangu_sigma.training import checkpoint
    from pangu_sigma.training.train import train

    first = train(cfg, log=_quiet, stop_after=stop_after)
    assert sorted(first["losses"]) == list(range(1, stop_after + 1))
    assert checkpoint.list_steps(checkpoint.rank_dir(cfg.train.output_dir)) == [stop_after]
    resumed = train(cfg, resume=True, log=_quiet)
    assert sorted(resumed["losses"]) == list(range(stop_after + 1, steps + 1))
    for step in range(1, steps + 1):
        got = first["losses"][step] if step <= stop_after else resumed["losses"][step]
        assert got == full["losses"][step], (step, got, full["losses"][step])


@pytest.fixture
def make_config(tiny_data):
    return lambda output_dir, *overrides: tiny_run_config(tiny_data, str(output_dir), overrides)
