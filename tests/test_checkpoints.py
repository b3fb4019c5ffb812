"""Checkpoints across layouts and runs (single process): the .ckpt stream format, full -> TP2 x EP2 ->
full round trip, merged run folders in eval, and every run-folder mistake ending in one line with the
earlier run's files unchanged. The msrun scenarios are in test_checkpoint_msrun.py."""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml
import mindspore as ms

from locmoe.errors import ConfigError
from pangu_sigma.data.shards import meta_digest
from pangu_sigma.training import checkpoint, checkpoint_tool
from pangu_sigma.training.ckpt_stream import CheckpointReader, CheckpointWriter
from pangu_sigma.training.train import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 4 experts, 2 heads: splits as TP2 x EP2 on 4 ranks
LAYOUT_SETS = ("moe.expert_num_per_dp_dim=2", "parallel.expert_parallel=2", "parallel.op_level_model_parallel_num=2",
               "parallel.virtual_world_size=4", "parallel.virtual_scope=cluster", "train.batch_size=4",
               "train.sink_size=1", "train.train_steps=4", "checkpoint.save_steps=2", "checkpoint.keep_last=2")


def _quiet(*_):
    pass


def folder_hash(path):
    """sha256 over every file's relative name and bytes under path."""
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            digest.update(os.path.relpath(full, path).encode())
            with open(full, "rb") as handle:
                digest.update(handle.read())
    return digest.hexdigest()


def one_line(err):
    text = str(err.value)
    assert "\n" not in text and isinstance(err.value, ConfigError), text
    return text


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """One tiny 4-step run (virtual TP2 x EP2 cluster, one process) shared by the tests below."""
    from conftest import tiny_run_config

    out = tmp_path_factory.mktemp("ckpt_run")
    cfg = tiny_run_config(tiny_data, str(out / "run"), LAYOUT_SETS)
    summary = train(cfg, log=_quiet)
    return cfg, str(out / "run"), summary, out


def test_stream_writer_is_byte_identical_to_mindspore_and_reader_reads_mindspore(tmp_path):
    arrays = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "step": np.array(7, np.int32),
              "scale": np.array(2.5, np.float32), "half": np.ones((2, 2), np.float16)}
    ms.save_checkpoint([{"name": k, "data": ms.Tensor(v)} for k, v in arrays.items()], str(tmp_path / "ms.ckpt"))
    with CheckpointWriter(str(tmp_path / "ours.ckpt")) as writer:
        for name, value in arrays.items():
            writer.write(name, value)
    assert (tmp_path / "ours.ckpt").read_bytes() == (tmp_path / "ms.ckpt").read_bytes()
    reader = CheckpointReader(str(tmp_path / "ms.ckpt"))
    for name, value in arrays.items():
        got = reader.read(name)
        assert got.dtype == value.dtype and got.shape == value.shape and np.array_equal(got, value)
    with pytest.raises(RuntimeError):
        with CheckpointWriter(str(tmp_path / "failed.ckpt")) as writer:
            writer.write("w", arrays["w"])
            raise RuntimeError("killed")
    assert sorted(os.listdir(tmp_path)) == ["ms.ckpt", "ours.ckpt"]  # no half file, no temporary


def test_round_trip_full_to_tp2_ep2_and_back_is_bitwise(trained, tmp_path):
    cfg, run, _, _ = trained
    source = checkpoint.open_source(run)
    assert source.layout["world_size"] == 1
    layout = checkpoint_tool.target_layout(4, 2, 2, None, 2, 4)
    checkpoint_tool.convert(source, str(tmp_path / "tp2ep2"), layout, with_optimizer=True, log=_quiet)
    # the pieces are the independent numpy slices of the full arrays
    rank3 = CheckpointReader(str(tmp_path / "tp2ep2/checkpoints/rank_3/step_00000004.ckpt"))
    experts = [n for n in source.names() if n.endswith("experts.w_in")]
    kv = [n for n in source.names() if n.endswith("attn.kv_proj.weight")]
    assert experts and kv and any(n.startswith("adam_m.") for n in experts)
    for name in experts:  # rank 3: ep_rank 1 (experts 2, 3), tp_rank 1 (second half of the ffn width)
        full = source.full(name)  # [E, d, h]
        assert np.array_equal(rank3.read(name), full[2:4, :, full.shape[2] // 2:])
    for name in kv:  # fused k|v blocks: tp_rank 1 holds the second half of each
        full = source.full(name)  # [d, 2d]
        half = full.shape[1] // 4
        assert np.array_equal(rank3.read(name), np.concatenate([full[:, half:2 * half], full[:, 3 * half:]], 1))
    merged = str(tmp_path / "merged.ckpt")
    checkpoint_tool.main(["merge", str(tmp_path / "tp2ep2"), "--output", merged, "--with-optimizer"], log=_quiet)
    back = CheckpointReader(merged)
    assert sorted(back.names()) == sorted(source.names())
    for name in source.names():
        a, b = back.read(name), source.full(name)
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), name
    # without optimizer state: the model's parameters only
    checkpoint_tool.main(["merge", run, "--output", str(tmp_path / "model.ckpt")], log=_quiet)
    names = CheckpointReader(str(tmp_path / "model.ckpt")).names()
    assert names and not any(checkpoint.is_optimizer_state(n) for n in names)


def test_tool_bad_layouts_are_one_line(trained, tmp_path, capsys):
    _, run, _, _ = trained
    for args, expected in [(["--world-size", "4", "--tp", "3", "--ep", "1"], "--tp=3"),
                           (["--world-size", "4", "--tp", "2", "--ep", "3"], "--ep=3"),
                           (["--world-size", "2", "--experts-per-rank", "3"], "--experts-per-rank=3"),
                           (["--world-size", "3", "--tp", "3", "--ep", "1", "--devices-per-node", "3"],
                            "--tp=3")]:  # hidden 32 does not split in 3: fails while writing
        assert checkpoint_tool.main(["convert", run, "--output", str(tmp_path / "x"), *args], log=_quiet) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and expected in err, err
        assert not (tmp_path / "x").exists()  # nothing left that would refuse the corrected command
    assert checkpoint_tool.main(["merge", str(tmp_path / "nothing"), "--output", str(tmp_path / "m.ckpt")]) == 2
    assert "source=" in capsys.readouterr().err


def test_tool_never_damages_and_names_what_is_wrong(trained, tmp_path, capsys):
    """Issue 20 item 7: merge onto an existing checkpoint or into a read-only place, --with-optimizer from a
    model-only checkpoint, a run folder missing one rank: one line each, every existing file unchanged."""
    _, run, _, _ = trained
    model = str(tmp_path / "model.ckpt")
    assert checkpoint_tool.main(["merge", run, "--output", model], log=_quiet) == 0
    capsys.readouterr()
    before = folder_hash(str(tmp_path))
    for argv, expected in [(["merge", run, "--output", model], "--output="),
                           (["merge", run, "--output", "/proc/sys/pangu/m.ckpt"], "not writable"),
                           (["merge", model, "--output", str(tmp_path / "m2.ckpt"), "--with-optimizer"],
                            "--with-optimizer=True"),
                           (["convert", model, "--output", str(tmp_path / "c"), "--world-size", "1", "--ep", "1",
                             "--with-optimizer"], "--with-optimizer=True")]:
        assert checkpoint_tool.main(argv, log=_quiet) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expected in err and "Traceback" not in err, err
    assert folder_hash(str(tmp_path)) == before
    four = str(tmp_path / "four")
    assert checkpoint_tool.main(["convert", run, "--output", four, "--world-size", "4", "--tp", "2", "--ep", "2",
                                 "--devices-per-node", "2"], log=_quiet) == 0
    shutil.rmtree(checkpoint.rank_dir(four, 2))
    assert checkpoint_tool.main(["merge", four, "--output", str(tmp_path / "m3.ckpt")], log=_quiet) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "rank(s) [2]" in err and not (tmp_path / "m3.ckpt").exists(), err


def test_eval_of_run_folder_equals_eval_of_merged_checkpoint(trained, tmp_path, capsys):
    from pangu_sigma.evaluation.eval import evaluate

    cfg, run, _, _ = trained
    merged = str(tmp_path / "merged.ckpt")
    checkpoint_tool.main(["merge", run, "--output", merged, "--step", "2"], log=_quiet)
    copy = str(tmp_path / "run")  # its newest step 4 incomplete: eval reads step 2 and says so
    shutil.copytree(run, copy)
    os.remove(checkpoint.marker_path(copy, 4))
    capsys.readouterr()
    a = evaluate(cfg, copy, batch_size=4, log=_quiet)
    err = capsys.readouterr().err
    assert f"read {copy} step 2 (its newest complete step; step(s) [4] are incomplete)" in err, err
    b = evaluate(cfg, merged, batch_size=4, log=_quiet)
    assert a["perplexity"] == b["perplexity"] and a["tokens"] == b["tokens"]


def test_training_into_an_existing_run_refuses_and_overwrite_moves_it_whole(trained, tmp_path):
    from conftest import tiny_run_config

    cfg, run, _, _ = trained
    copy = str(tmp_path / "run")
    shutil.copytree(run, copy)
    cfg = tiny_run_config(cfg.data.dataset_dir, copy, LAYOUT_SETS)
    before = folder_hash(copy)
    with pytest.raises(ConfigError) as err:
        train(cfg, log=_quiet)
    assert "train.output_dir=" in one_line(err) and "--resume" in str(err.value) and "--overwrite" in str(err.value)
    assert folder_hash(copy) == before
    summary = train(cfg, overwrite=True, log=_quiet)
    assert sorted(summary["losses"]) == [1, 2, 3, 4]
    assert folder_hash(copy + ".old-1") == before  # the old run, whole and untouched
    assert checkpoint.complete_steps(copy) == [2, 4]


@pytest.mark.parametrize("change, expected", [
    (("train.batch_size=2",), "train.batch_size=2 is invalid: a per-rank batch giving the run's global batch 8"),
    (("optim.lr=0.01",), "optim.lr (0.005 -> 0.01)"),
    (("moe.router=switch",), "moe.router ('locmoe' -> 'switch')"),
])
def test_resume_with_a_result_changing_config_refuses_naming_the_field(trained, tmp_path, change, expected):
    from conftest import tiny_run_config

    cfg, run, _, _ = trained
    copy = str(tmp_path / "run")
    shutil.copytree(run, copy)
    before = folder_hash(copy)
    bad = tiny_run_config(cfg.data.dataset_dir, copy, LAYOUT_SETS + ("train.train_steps=6",) + change)
    with pytest.raises(ConfigError) as err:
        train(bad, resume=True, log=_quiet)
    assert expected in one_line(err)
    assert folder_hash(copy) == before


def test_resume_with_another_tokenizer_refuses_unless_allowed(trained, tmp_path):
    from conftest import tiny_run_config

    cfg, run, _, _ = trained
    data = str(tmp_path / "data")
    shutil.copytree(cfg.data.dataset_dir, data)
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    with open(os.path.join(data, "tokenizer.model"), "rb") as handle:
        proto.ParseFromString(handle.read())
    proto.pieces[-1].score -= 1.0  # same vocabulary size, another tokenizer: the data prepared again with it
    with open(os.path.join(data, "tokenizer.model"), "wb") as handle:
        handle.write(proto.SerializeToString())
    with open(os.path.join(data, "meta.json"), encoding="utf-8") as handle:
        meta = json.load(handle)
    meta["tokenizer_sha256"] = hashlib.sha256(open(os.path.join(data, "tokenizer.model"), "rb").read()).hexdigest()
    meta["meta_sha256"] = meta_digest(meta)  # as prepare writes it
    with open(os.path.join(data, "meta.json"), "w", encoding="utf-8") as handle:
        json.dump(meta, handle)
    copy = str(tmp_path / "run")
    shutil.copytree(run, copy)
    before = folder_hash(copy)
    other = tiny_run_config(data, copy, LAYOUT_SETS + ("train.train_steps=6",))
    with pytest.raises(ConfigError) as err:
        train(other, resume=True, log=_quiet)
    assert "data.tokenizer_sha256" in one_line(err)
    assert folder_hash(copy) == before
    resumed = train(other, resume=True, allow_changes=("data.tokenizer_sha256",), log=_quiet)
    assert sorted(resumed["losses"]) == [5, 6]


def test_eval_and_generate_refuse_a_mismatch_naming_the_field(trained, tmp_path):
    from pangu_sigma.evaluation.eval import evaluate
    from conftest import tiny_run_config

    cfg, run, _, _ = trained
    before = folder_hash(run)
    other = tiny_run_config(cfg.data.dataset_dir, run, LAYOUT_SETS + ("moe.capacity_factor=1.0",))
    with pytest.raises(ConfigError) as err:
        evaluate(other, run, batch_size=4, log=_quiet)
    assert "moe.capacity_factor (2.0 -> 1.0)" in one_line(err)
    assert evaluate(other, run, batch_size=4, log=_quiet, allow_changes=("moe.capacity_factor",))["tokens"] > 0
    path = tmp_path / "other.yaml"
    path.write_text(yaml.safe_dump(other.to_dict()))
    proc = subprocess.run([sys.executable, "-m", "pangu_sigma.evaluation.generate", "--config", str(path),
                           "--checkpoint", run, "--prompt", "the", "--greedy", "--max-new-tokens", "2"],
                          capture_output=True, text=True, cwd=REPO, env=dict(os.environ, GLOG_v="3"), timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "moe.capacity_factor" in lines[0]
    assert folder_hash(run) == before


def test_init_checkpoint_of_another_size_fails_before_training_in_one_line(trained, tmp_path):
    from conftest import tiny_run_config

    cfg, run, _, _ = trained
    before = folder_hash(run)
    bigger = tiny_run_config(cfg.data.dataset_dir, str(tmp_path / "new"),
                             LAYOUT_SETS + ("model.ffn_hidden_size=128", f"train.init_checkpoint={run}",
                                            "parallel.optimizer_shard=true"))
    lines = []
    with pytest.raises(ConfigError) as err:
        train(bigger, log=lines.append, allow_batch_change=True)
    text = one_line(err)
    assert text.startswith("train.init_checkpoint=") and "--checkpoint" not in text and "shape" in text
    assert not os.path.exists(tmp_path / "new")  # no folder that looks like a run (issue 20 item 3)
    assert folder_hash(run) == before
    # flags that cannot act say so (issue 20 item 7)
    assert "[train] note: --allow-batch-change has no effect without --resume" in lines[0], lines
    assert "[train] note: parallel.optimizer_shard has no effect in a single process" in lines[1], lines


def test_resume_with_an_allowed_change_that_cannot_load_leaves_the_run_as_it_was(trained, tmp_path):
    """Issue 20 item 7: --allow-config-change for a shape the checkpoint cannot follow fails in one line
    before run.json is rewritten: the run still resumes with its own config."""
    from conftest import tiny_run_config

    cfg, run, _, _ = trained
    copy = str(tmp_path / "run")
    shutil.copytree(run, copy)
    before = folder_hash(copy)
    wider = tiny_run_config(cfg.data.dataset_dir, copy, LAYOUT_SETS + ("train.train_steps=6",
                                                                     "model.ffn_hidden_size=128"))
    with pytest.raises(ConfigError) as err:
        train(wider, resume=True, allow_changes=("model.ffn_hidden_size",), log=_quiet)
    assert "shape" in one_line(err)
    assert folder_hash(copy) == before


def test_output_paths_are_checked_at_start_up(trained, tmp_path):
    from conftest import tiny_run_config

    cfg, _, _, _ = trained
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    for output in (str(afile), str(afile / "sub")):
        bad = tiny_run_config(cfg.data.dataset_dir, output, LAYOUT_SETS)
        with pytest.raises(ConfigError) as err:
            train(bad, log=_quiet)
        assert one_line(err).startswith("train.output_dir=")
    assert afile.read_text() == "keep me"


def _ranks_side_by_side(folders, wait_s):
    """check_shared_folder run by one thread per rank, each on its own view of train.output_dir, with a
    world sum of the values the threads pass (a stand-in for the barrier's AllReduce) -> each rank's error."""
    import threading

    from pangu_sigma.training.shared_folder import check_shared_folder

    meeting = threading.Barrier(len(folders))
    values, errors = [0.0] * len(folders), [None] * len(folders)

    def world_sum(rank, value):
        values[rank] = value
        meeting.wait()
        total = sum(values)
        meeting.wait()
        return total

    def run(rank):
        try:
            check_shared_folder(folders[rank], rank, lambda value: world_sum(rank, value), wait_s)
        except ConfigError as err:
            errors[rank] = str(err)

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(len(folders))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


def test_output_dir_that_a_server_does_not_share_fails_on_every_rank_in_one_line(tmp_path):
    """Rank 2 of 3 writes into its own node-local folder of the same name: every rank stops with the same
    line naming train.output_dir (a resume would otherwise restart rank 2's server from step 0)."""
    shared, local = tmp_path / "shared", tmp_path / "node1"
    shared.mkdir()
    local.mkdir()
    assert _ranks_side_by_side([str(shared)] * 3, wait_s=0.0) == [None] * 3
    assert os.listdir(shared) == []  # the probe is gone
    errors = _ranks_side_by_side([str(shared), str(shared), str(local)], wait_s=0.0)
    assert len({error.replace(str(local), str(shared)) for error in errors}) == 1  # each names its own path
    assert errors[0].startswith(f"train.output_dir='{shared}'") and "1 rank(s)" in errors[0]
    assert "\n" not in errors[0] and os.listdir(shared) == []


def test_leftover_temporaries_are_removed_at_the_next_save(trained, tmp_path):
    from conftest import tiny_run_config

    cfg, run, _, _ = trained
    copy = str(tmp_path / "run")
    shutil.copytree(run, copy)
    leftovers = [os.path.join(checkpoint.rank_dir(copy, 0), ".tmp99999_step_00000006.ckpt"),
                 os.path.join(checkpoint.checkpoints_dir(copy), "step_00000006.complete.tmp99999")]
    for path in leftovers:
        with open(path, "wb") as handle:
            handle.write(b"half")
    longer = tiny_run_config(cfg.data.dataset_dir, copy, LAYOUT_SETS + ("train.train_steps=6",))
    assert checkpoint.latest_complete(copy)[0] == 4  # the half-written step does not count
    train(longer, resume=True, log=_quiet)
    assert not any(os.path.exists(p) for p in leftovers)
    assert checkpoint.complete_steps(copy) == [4, 6]


def test_resume_on_another_layout_from_a_converted_checkpoint_matches_the_uninterrupted_run(trained, tmp_path):
    """Full run to step 2 -> converted to 4 ranks TP2 x EP2 (optimizer state too) -> resumed in one
    process posing as 2 ranks (DP2, EP2): steps 3-4 equal the uninterrupted run's."""
    from conftest import tiny_run_config

    cfg, run, summary, _ = trained
    converted = str(tmp_path / "tp2ep2")
    assert checkpoint_tool.main(["convert", run, "--step", "2", "--output", converted, "--world-size", "4",
                                 "--tp", "2", "--ep", "2", "--devices-per-node", "2", "--with-optimizer"],
                                log=_quiet) == 0
    assert checkpoint.latest_complete(converted)[1]["layout"]["world_size"] == 4
    two = LAYOUT_SETS + ("parallel.op_level_model_parallel_num=1", "parallel.virtual_world_size=2",
                         "parallel.devices_per_node=1")
    lines = []
    resumed = train(tiny_run_config(cfg.data.dataset_dir, converted, two), resume=True, log=lines.append)
    assert any("resharded from tp=2 ep=2 on 4 ranks" in line for line in lines), lines
    assert sorted(resumed["losses"]) == [3, 4]
    for step in (3, 4):
        assert resumed["losses"][step] == pytest.approx(summary["losses"][step], rel=1e-5, abs=0)


def test_resume_from_sharded_optimizer_state_equals_the_uninterrupted_run(trained, tmp_path):
    """Full run to step 2 -> converted to 8 ranks TP2 x DP4 x EP2 with the moments as ZeRO-1 slices
    (the files a run with parallel.optimizer_shard writes) -> resumed on the run's own single-process
    layout, which gathers the slices back: steps 3-4 equal the uninterrupted run's, bitwise."""
    from conftest import tiny_run_config

    cfg, run, summary, _ = trained
    converted = str(tmp_path / "zero8")
    assert checkpoint_tool.main(["convert", run, "--step", "2", "--output", converted, "--world-size", "8",
                                 "--tp", "2", "--ep", "2", "--devices-per-node", "2", "--with-optimizer",
                                 "--optimizer-shard"], log=_quiet) == 0
    names = CheckpointReader(checkpoint.step_base(converted, 5, 2) + ".ckpt").names()
    assert any(n.startswith("zero_v.") for n in names) and not any(n.startswith("adam_") for n in names)
    lines = []
    resumed = train(tiny_run_config(cfg.data.dataset_dir, converted, LAYOUT_SETS), resume=True, log=lines.append)
    assert any("resharded from tp=2 ep=2 on 8 ranks" in line for line in lines), lines
    assert sorted(resumed["losses"]) == [3, 4]
    assert [resumed["losses"][s] for s in (3, 4)] == [summary["losses"][s] for s in (3, 4)]


def test_train_cli_into_an_existing_run_is_one_line_and_changes_nothing(trained, tmp_path):
    cfg, run, _, _ = trained
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    before = folder_hash(run)
    proc = subprocess.run([sys.executable, "-m", "pangu_sigma.training.train", "--config", str(path)],
                          capture_output=True, text=True, cwd=str(tmp_path), env=dict(os.environ, GLOG_v="3"),
                          timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "train.output_dir=" in lines[0] and "--overwrite" in lines[0]
    assert folder_hash(run) == before
    assert sorted(os.listdir(tmp_path)) == ["run.yaml"]  # nothing left in the working directory


def test_sharded_optimizer_slices_load_on_their_layout_and_merge_elsewhere(tmp_path):
    """ZeRO-1 moments (zero_m./zero_v.) are a rank's flat slice: the rank that wrote them loads them as
    written; elsewhere they are gathered over the replica group into the full moment (adam_m.), and a
    one-process cell loads that (the other layouts: test_zero_conversion.py)."""
    layout = {"world_size": 2, "tp": 1, "ep": 1, "num_experts": 4, "devices_per_node": 2}
    files = {}
    for rank in range(2):
        files[rank] = str(tmp_path / f"rank{rank}.ckpt")
        with CheckpointWriter(files[rank]) as writer:
            writer.write("w", np.full((2, 3), 1.0, np.float32))
            writer.write("zero_m.w", np.full(3, rank + 1.0, np.float32))  # ceil(6 / 2) elements
    source = checkpoint.StateSource(files, layout, {}, "two ranks")
    assert checkpoint.is_optimizer_state("zero_m.w") and checkpoint.is_optimizer_state("zero_v.w")
    assert source.names() == ["w", "adam_m.w"]

    class Cell:  # the parameters of a train step, as load_state sees them
        def __init__(self, moment, shape):
            self.params = [ms.Parameter(ms.Tensor(np.zeros((2, 3), np.float32)), name="w"),
                           ms.Parameter(ms.Tensor(np.zeros(shape, np.float32)), name=moment)]

        def get_parameters(self):
            return iter(self.params)

    cell = Cell("zero_m.w", 3)  # rank 1's
    checkpoint.load_state(cell, source, layout, 1)
    assert np.array_equal(cell.params[1].asnumpy(), np.full(3, 2.0, np.float32))  # rank 1's own slice
    full = np.array([[1, 1, 1], [2, 2, 2]], np.float32)  # rank 0's slice, then rank 1's
    assert np.array_equal(source.full("zero_m.w"), full) and np.array_equal(source.full("adam_m.w"), full)
    single = Cell("adam_m.w", (2, 3))
    checkpoint.load_state(single, source, dict(layout, world_size=1), 0)
    assert np.array_equal(single.params[1].asnumpy(), full)
