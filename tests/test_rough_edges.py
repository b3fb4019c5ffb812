"""Issue 13 item 6: each rough edge ends in one line naming what the user wrote."""
import yaml

from pangu_sigma.training import train as train_module


def run(main, argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err
    return code, err


def test_empty_config_file_is_named(tmp_path, capsys):
    config = tmp_path / "empty.yaml"
    config.write_text("")
    code, err = run(train_module.main, ["--config", str(config)], capsys)
    assert code == 2 and err.count("\n") == 1 and "empty.yaml" in err and "the file is empty" in err
    assert not (tmp_path / "output").exists()


def test_expert_parallel_not_dividing_dp_names_expert_parallel(tmp_path, capsys):
    config = tmp_path / "ep.yaml"
    config.write_text(yaml.safe_dump({"parallel": {"expert_parallel": 3, "virtual_world_size": 4,
                                                   "op_level_model_parallel_num": 2}}))
    code, err = run(train_module.main, ["--config", str(config)], capsys)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("error: parallel.expert_parallel=3 is invalid: a divisor of the data-parallel size 2"), err


def test_generate_rejects_a_prompt_longer_than_the_room(make_config, tmp_path, capsys):
    from pangu_sigma.evaluation import generate

    cfg = make_config(tmp_path / "run")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    prompt = "the model reads a long prompt " * 10  # far more than 16 - 4 tokens
    code, err = run(generate.main, ["--config", str(config), "--checkpoint", str(tmp_path / "none.ckpt"),
                                    "--prompt", prompt, "--max-new-tokens", "4"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "--prompt=" in err and "at most 12 tokens (model.seq_length 16 - --max-new-tokens 4)" in err, err


def test_routing_report_rejects_a_train_log_that_is_not_json_lines(make_config, tmp_path, capsys):
    from pangu_sigma.tools import routing_report

    cfg = make_config(tmp_path / "run")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    log = tmp_path / "train.log"
    log.write_text("[train] step 5/30 loss 6.1\n")
    code, err = run(routing_report.main, ["--config", str(config), "--checkpoint", str(tmp_path / "none.ckpt"),
                                          "--output", str(tmp_path / "report"), "--train-log", str(log)], capsys)
    assert code == 2 and err.count("\n") == 1 and "train.log" in err and "JSON-lines training log" in err, err
    assert "Traceback" not in err
    report = tmp_path / "report.md"  # issue 20 item 5: --output naming a file
    report.write_text("keep me")
    code, err = run(routing_report.main, ["--config", str(config), "--checkpoint", str(tmp_path / "none.ckpt"),
                                          "--output", str(report)], capsys)
    assert code == 2 and err.count("\n") == 1 and "--output=" in err and "a file of that name exists" in err, err
    assert report.read_text() == "keep me"


def test_ctrl_c_during_training_is_one_line_naming_the_last_checkpoint(make_config, tmp_path):
    """A real SIGINT after the first checkpoint (MindSpore's own SIGINT handler would end the process with
    SIGTERM and no message): one line with the last complete checkpoint's step and path and the command that
    resumes it (issue 20 item 2). Exit 130 ("interrupted: ..."), or 143 ("interrupted (SIGTERM): ...") when the
    SIGINT lands while a MindSpore thread holds its SignalGuard (libmindspore_common's DefaultIntHandler turns
    it into a SIGTERM, which the trainer then reports the same way): 2 of 6 runs on this machine."""
    import os
    import signal
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = make_config(tmp_path / "run", "train.train_steps=1000", "checkpoint.save_steps=5")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    process = subprocess.Popen([sys.executable, "-m", "pangu_sigma.training.train", "--config", str(config)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=repo,
                               env=dict(os.environ, PYTHONPATH=repo, GLOG_v="3"))
    for line in process.stdout:
        if line.startswith("[train] checkpoint "):
            saved = line.split()[2]
            break
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.strip()]
    head = {130: "interrupted: last complete checkpoint: step ",
            143: "interrupted (SIGTERM): last complete checkpoint: step "}.get(process.returncode)
    assert head is not None, (process.returncode, err[-500:])
    assert len(lines) == 1 and lines[0].startswith(head), lines
    step, rest = lines[0][len(head):].split(" (", 1)
    path, command = rest.split("); resume with: ")
    assert os.path.isfile(path) and path >= saved and path.endswith(f"step_{int(step):08d}.ckpt"), lines
    assert command == f"python -m pangu_sigma.training.train --config {config} --resume", command


# ---- issue 20: the last bad inputs (items 4-7), each one line, nothing written ----

def corpus_of(tiny_data):
    import os

    return os.path.join(os.path.dirname(tiny_data), "corpus")


def test_prepare_into_a_read_only_place_or_with_no_shard_size_is_one_line(tiny_data, tmp_path, capsys):
    from pangu_sigma.data import prepare

    # /proc/sys refuses new entries even to root (chmod would not stop a root test run)
    code, err = run(prepare.main, ["--input", corpus_of(tiny_data), "--output", "/proc/sys/pangu_prepared",
                                   "--workers", "1", "--progress-every", "0"], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: output=") and "writable" in err, err
    code, err = run(prepare.main, ["--input", corpus_of(tiny_data), "--output", str(tmp_path / "out"),
                                   "--shard-mb", "0"], capsys)
    assert code == 2 and err.count("\n") == 1 and "--shard-mb=0.0" in err and not (tmp_path / "out").exists()


def test_meta_json_that_disagrees_with_its_shards_is_refused(tiny_data, tmp_path):
    """Issue 20 item 4: seq_length and sample_length edited in meta.json, shards untouched: the rows' real
    length disagrees; an edit no file contradicts is caught by meta.json's own digest."""
    import json
    import shutil

    import pytest

    from locmoe.errors import ConfigError
    from pangu_sigma.data.dataset import read_meta

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    meta = json.loads((data / "meta.json").read_text())
    meta.update(seq_length=32, sample_length=33)
    (data / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError) as err:
        read_meta(str(data))
    assert "rows of seq_length + 1 = 33 tokens" in str(err.value) and "hold 17" in str(err.value)
    assert "\n" not in str(err.value)
    meta.update(seq_length=16, sample_length=17, valid_fraction=0.5)  # an edit no file contradicts
    (data / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError) as err:
        read_meta(str(data))
    assert "meta_sha256" in str(err.value) and "\n" not in str(err.value)


def test_plan_blames_expert_parallel_first_and_notes_ragged_nodes(capsys):
    import os

    from pangu_sigma.cluster import plan

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code, err = run(plan.main, ["--config", os.path.join(repo, "configs/locmoe_128n.yaml"), "--world-size", "128",
                                "--set", "parallel.expert_parallel=3"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("error: parallel.expert_parallel=3 is invalid: a divisor of the data-parallel size 16"), err
    code = plan.main(["--config", os.path.join(repo, "configs/cpu_tiny.yaml"), "--world-size", "12",
                      "--devices-per-node", "8", "--set", "parallel.expert_parallel=4", "--set",
                      "model.vocab_size=512", "--set", "parallel.virtual_world_size=0", "--domain-sizes", "100,100"])
    out = capsys.readouterr().out
    assert code == 0 and "8 devices per node do not divide the world size 12: the last node holds 4" in out, out


def test_simulate_domain_sizes_must_cover_every_domain(make_config, tmp_path, capsys):
    from pangu_sigma.tools import simulate

    cfg = make_config(tmp_path / "run", "data.placement=domain_affine")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    code, err = run(simulate.main, ["--config", str(config), "--domain-sizes", "100"], capsys)
    assert code == 2 and err.count("\n") == 1 and "--domain-sizes='100'" in err and "2 sizes" in err, err


def test_a_malformed_router_set_is_named_as_such():
    import pytest

    from locmoe.errors import ConfigError
    from pangu_sigma.tools.compare_routers import parse_router_sets

    for bad in ("switch:moe=1", "switch:capacity_factor=1", "switch:moe.a.b=1"):
        with pytest.raises(ConfigError) as err:
            parse_router_sets([bad])
        assert err.value.field == "--router-set", bad
    assert parse_router_sets(["switch:moe.capacity_factor=1"]) == {"switch": ["moe.capacity_factor=1"]}
