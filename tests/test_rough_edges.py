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


def test_ctrl_c_during_training_is_one_line_naming_the_last_checkpoint(make_config, tmp_path):
    """A real SIGINT after the first checkpoint (MindSpore's own SIGINT handler would end the process with
    SIGTERM and no message): exit 130 and one line with the last complete checkpoint's step and path and
    the command that resumes it (issue 20 item 2)."""
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
    assert process.returncode == 130, err[-500:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("interrupted: last complete checkpoint: step "), lines
    step, rest = lines[0][len("interrupted: last complete checkpoint: step "):].split(" (", 1)
    path, command = rest.split("); resume with: ")
    assert os.path.isfile(path) and path >= saved and path.endswith(f"step_{int(step):08d}.ckpt"), lines
    assert command == f"python -m pangu_sigma.training.train --config {config} --resume", command
