"""ZeRO-1 optimizer state (parallel.optimizer_shard) across layouts: per-rank zero_m./zero_v. slices
gather into the full Adam moments, and full moments split into any layout's slices, bitwise.

The references are written here in numpy from what a rank holds (not pangu_sigma.parallel.zero's
slicer): rank r = dp_rank * tp + tp_rank, ep_rank = dp_rank % ep; a TP-sharded parameter's piece is
its tp_rank's part of the split axis (k|v blocks of kv_proj split one by one); an expert tensor's is
its ep_rank's experts and its tp_rank's part of the inner width; the ranks sharing a piece (the
replica group) each keep one consecutive slice of its flattened, zero-padded moment, in rank order.
"""
import numpy as np
import pytest
import mindspore as ms

from locmoe.errors import ConfigError
from pangu_sigma.training import checkpoint, checkpoint_tool
from pangu_sigma.training.ckpt_stream import CheckpointReader, CheckpointWriter

D, V, H, E = 6, 10, 10, 4
SHAPES = {
    "model.embedding.token_table": (V, D),  # TP axis 0
    "model.blocks.0.attn.q_proj.weight": (D, D),  # TP axis 1
    "model.blocks.0.attn.kv_proj.weight": (D, 2 * D),  # TP axis 1, k|v blocks
    "model.blocks.0.ln1.gamma": (D,),  # replicated
    "model.blocks.1.ffn.experts.w_in": (E, D, H),  # experts: EP axis 0, TP axis 2
    "model.blocks.1.ffn.experts.w_out": (E, H, D),  # experts: EP axis 0, TP axis 1
}
# name -> (world_size, tp, ep): DP2; TP2 x DP2 x EP2 (experts not ZeRO-split: expert-DP of 1);
# TP2 x DP4 x EP2 (every replica group of 2 or more, padding in several)
LAYOUTS = {"dp2": (2, 1, 1), "tp2_dp2_ep2": (4, 2, 2), "tp2_dp4_ep2": (8, 2, 2)}


def layout_dict(key):
    world, tp, ep = LAYOUTS[key]
    return {"world_size": world, "tp": tp, "ep": ep, "num_experts": E, "devices_per_node": 2}


def coords(rank, tp, ep):
    """(tp_rank, ep_rank) of a global rank."""
    return rank % tp, (rank // tp) % ep


def piece(name, full, rank, layout):
    """numpy: the part of the full tensor `name` that `rank` holds."""
    tp, ep = layout["tp"], layout["ep"]
    t, e = coords(rank, tp, ep)
    if name.endswith("token_table"):
        rows = full.shape[0] // tp
        return full[t * rows:(t + 1) * rows]
    if name.endswith("q_proj.weight"):
        cols = full.shape[1] // tp
        return full[:, t * cols:(t + 1) * cols]
    if name.endswith("kv_proj.weight"):
        k, v = full[:, :D], full[:, D:]
        cols = D // tp
        return np.concatenate([k[:, t * cols:(t + 1) * cols], v[:, t * cols:(t + 1) * cols]], axis=1)
    if "experts.w_" in name:
        per = E // ep
        mine = full[e * per:(e + 1) * per]
        inner = 2 if name.endswith("w_in") else 1
        width = H // tp
        return np.take(mine, np.arange(t * width, (t + 1) * width), axis=inner)
    return full


def sharers(name, rank, layout):
    """The ranks holding the same piece as `rank` (its replica group), ascending."""
    tp, ep = layout["tp"], layout["ep"]
    t, e = coords(rank, tp, ep)
    if "experts." in name:
        return [q for q in range(layout["world_size"]) if coords(q, tp, ep) == (t, e)]
    if name.endswith(("token_table", "q_proj.weight", "kv_proj.weight")) and tp > 1:
        return [q for q in range(layout["world_size"]) if coords(q, tp, ep)[0] == t]
    return list(range(layout["world_size"]))


def zero_slice(name, full, rank, layout):
    """numpy: rank's ZeRO-1 slice of the full moment `full` of parameter `name`."""
    flat = piece(name, full, rank, layout).reshape(-1)
    group = sharers(name, rank, layout)
    c = -(-flat.size // len(group))
    padded = np.concatenate([flat, np.zeros(c * len(group) - flat.size, flat.dtype)])
    k = group.index(rank)
    return padded[k * c:(k + 1) * c]


@pytest.fixture(scope="module")
def state():
    """Known full parameters and moments (float32, no zero that padding could hide)."""
    rng = np.random.RandomState(5)
    out = {}
    for name, shape in SHAPES.items():
        out[name] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        out["adam_m." + name] = rng.uniform(-1.0, 1.0, shape).astype(np.float32)
        out["adam_v." + name] = rng.uniform(1.0, 2.0, shape).astype(np.float32)
    out["global_step"] = np.array([3], np.int32)
    return out


def write_full(path, state):
    with CheckpointWriter(str(path)) as writer:
        for name, value in state.items():
            writer.write(name, value)
    return str(path)


def write_sharded(folder, state, layout):
    """Per-rank files of a run with optimizer_shard, built by the numpy reference -> {rank: path}."""
    files = {}
    for rank in range(layout["world_size"]):
        files[rank] = str(folder / f"rank{rank}.ckpt")
        with CheckpointWriter(files[rank]) as writer:
            for name in SHAPES:
                writer.write(name, np.ascontiguousarray(piece(name, state[name], rank, layout)))
                for kind in ("m", "v"):
                    writer.write(f"zero_{kind}.{name}", zero_slice(name, state[f"adam_{kind}.{name}"], rank, layout))
            writer.write("global_step", state["global_step"])
    return files


def assert_bitwise(a, b, name):
    assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), name


@pytest.mark.parametrize("key", list(LAYOUTS))
def test_sharded_slices_merge_into_the_full_moments(state, tmp_path, key):
    layout = layout_dict(key)
    source = checkpoint.StateSource(write_sharded(tmp_path, state, layout), layout, {}, key)
    assert sorted(source.names()) == sorted(state)  # the moments go by their full-layout names
    for name in state:
        assert_bitwise(source.full(name), state[name], name)
    merged = str(tmp_path / "merged.ckpt")
    checkpoint_tool.merge(source, merged, with_optimizer=True, log=lambda *_: None)
    reader = CheckpointReader(merged)
    assert sorted(reader.names()) == sorted(state)
    for name in state:
        assert_bitwise(reader.read(name), state[name], name)
    if key == "tp2_dp4_ep2":  # the references really are split and padded
        assert zero_slice("model.blocks.0.ln1.gamma", state["adam_m.model.blocks.0.ln1.gamma"], 7, layout)[-1] == 0
        assert len(sharers("model.blocks.1.ffn.experts.w_in", 0, layout)) == 2


@pytest.mark.parametrize("key", list(LAYOUTS))
def test_full_to_sharded_layout_and_back_is_bitwise(state, tmp_path, key):
    layout = layout_dict(key)
    full = checkpoint.StateSource({0: write_full(tmp_path / "full.ckpt", state)},
                                  dict(checkpoint.FULL_LAYOUT, num_experts=E), {"step": 3}, "full")
    run = str(tmp_path / "sharded")
    checkpoint_tool.convert(full, run, layout, with_optimizer=True, log=lambda *_: None, optimizer_shard=True)
    for rank in range(layout["world_size"]):  # each rank's file holds the numpy reference's slices
        reader = CheckpointReader(checkpoint.step_base(run, rank, 3) + ".ckpt")
        assert not any(n.startswith("adam_") for n in reader.names())
        for name in SHAPES:
            assert_bitwise(reader.read(name), np.ascontiguousarray(piece(name, state[name], rank, layout)), name)
            for kind in ("m", "v"):
                expected = zero_slice(name, state[f"adam_{kind}.{name}"], rank, layout)
                assert_bitwise(reader.read(f"zero_{kind}.{name}"), expected, (rank, kind, name))
    merged = str(tmp_path / "back.ckpt")
    assert checkpoint_tool.main(["merge", run, "--output", merged, "--with-optimizer"], log=lambda *_: None) == 0
    reader = CheckpointReader(merged)
    assert sorted(reader.names()) == sorted(state)
    for name in state:
        assert_bitwise(reader.read(name), state[name], name)


def test_sharded_to_another_sharded_layout_through_the_tool(state, tmp_path):
    """TP2 x DP4 x EP2 slices -> DP2 slices (convert reads the sharded run, writes the other's) -> full."""
    source_layout, target = layout_dict("tp2_dp4_ep2"), layout_dict("dp2")
    source = checkpoint.StateSource(write_sharded(tmp_path, state, source_layout), source_layout, {"step": 3}, "src")
    run = str(tmp_path / "dp2")
    checkpoint_tool.convert(source, run, target, with_optimizer=True, log=lambda *_: None, optimizer_shard=True)
    for rank in range(2):
        reader = CheckpointReader(checkpoint.step_base(run, rank, 3) + ".ckpt")
        for name in SHAPES:
            assert_bitwise(reader.read(f"zero_v.{name}"), zero_slice(name, state[f"adam_v.{name}"], rank, target),
                           name)
    back = checkpoint.open_source(run)
    for name in state:
        assert_bitwise(back.full(name), state[name], name)


class StepCell:
    """The parameters of one rank's train step, as load_state sees them."""

    def __init__(self, arrays):
        self.params = [ms.Parameter(ms.Tensor(np.zeros_like(v)), name=k) for k, v in arrays.items()]

    def get_parameters(self):
        return iter(self.params)


@pytest.mark.parametrize("sharded_source", [True, False])
def test_a_sharded_rank_loads_its_slices_from_any_layout(state, tmp_path, sharded_source):
    """--resume of a run with optimizer_shard on TP2 x DP4 x EP2: from a DP2 run's slices (another layout)
    or from unsharded moments in its own layout (a run without optimizer_shard), each rank gets the
    numpy reference's slices; and an unsharded single process gets the full moments back."""
    target = layout_dict("tp2_dp4_ep2")
    if sharded_source:
        source_layout = layout_dict("dp2")
        source = checkpoint.StateSource(write_sharded(tmp_path, state, source_layout), source_layout, {}, "dp2")
    else:
        full = checkpoint.StateSource({0: write_full(tmp_path / "full.ckpt", state)},
                                      dict(checkpoint.FULL_LAYOUT, num_experts=E), {"step": 3}, "full")
        checkpoint_tool.convert(full, str(tmp_path / "plain"), target, with_optimizer=True, log=lambda *_: None)
        source = checkpoint.open_source(str(tmp_path / "plain"))
        assert source.layout == target and "adam_m.model.blocks.0.ln1.gamma" in source.readers[5]
    for rank in (0, 5, 7):
        expected = {"global_step": state["global_step"]}
        for name in SHAPES:
            expected[name] = np.ascontiguousarray(piece(name, state[name], rank, target))
            for kind in ("m", "v"):
                expected[f"zero_{kind}.{name}"] = zero_slice(name, state[f"adam_{kind}.{name}"], rank, target)
        cell = StepCell(expected)
        checkpoint.load_state(cell, source, target, rank)
        for param in cell.params:
            assert_bitwise(param.asnumpy(), expected[param.name], (rank, param.name))
    single = StepCell(state)
    checkpoint.load_state(single, source, dict(checkpoint.FULL_LAYOUT, num_experts=E), 0)
    for param in single.params:
        assert_bitwise(param.asnumpy(), state[param.name], param.name)


def test_slices_of_another_layout_are_one_line(state, tmp_path, capsys):
    """Files whose recorded layout is not the one that wrote them (slices of the wrong length) end in one
    line naming the entry; convert's --optimizer-shard needs --with-optimizer and more than one rank."""
    wrote = layout_dict("tp2_dp2_ep2")
    claimed = dict(wrote, tp=1, ep=1)
    source = checkpoint.StateSource(write_sharded(tmp_path, state, wrote), claimed, {}, "mislabelled")
    with pytest.raises(ConfigError) as err:
        source.full("adam_m.model.blocks.0.attn.q_proj.weight")
    text = str(err.value)
    assert "\n" not in text and "zero_m.model.blocks.0.attn.q_proj.weight" in text and "(9,)" in text, text
    full = write_full(tmp_path / "full.ckpt", state)
    for args, expected in [(["--world-size", "2", "--ep", "1", "--optimizer-shard"], "--with-optimizer"),
                           (["--world-size", "1", "--ep", "1", "--with-optimizer", "--optimizer-shard"],
                            "--world-size > 1")]:
        assert checkpoint_tool.main(["convert", full, "--output", str(tmp_path / "x"), *args],
                                    log=lambda *_: None) == 2
        err_text = capsys.readouterr().err.strip()
        assert err_text.count("\n") == 0 and "--optimizer-shard=True" in err_text and expected in err_text, err_text
