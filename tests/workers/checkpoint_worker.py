"""msrun worker for tests/test_checkpoint_msrun.py: checkpoints across layouts and kill drills.

argv: OUT_DIR DATA_DIR SCENARIO [KILL_STEP]
  first       4 workers (TP2 x DP2, EP2): run A, 8 steps uninterrupted (checkpoints at 4 and 8);
              then run K, which every rank SIGKILLs itself right after step KILL_STEP.
  killwrite   4 workers: resume K; at its next checkpoint rank 2 SIGKILLs itself halfway
              through writing its file, the other ranks right after writing theirs (no marker).
  finish      4 workers: resume K to step 8; then eval of A on its layout, every rank writing its
              figures to dist_eval_rank{r}.json (pangu_sigma.evaluation.distributed).
  two         2 workers (DP2, EP2): resume OUT_DIR/a2 (a copy of A at step 4) to step 8.
Losses are read back from each run's train_log_rank0.jsonl; rank 0 of `first` also writes the
TP specs of its model (spec.json) to check reshard's table against the layers.
"""
import json
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from conftest import tiny_run_config  # noqa: E402

# 4 experts; per-rank batch 4 on dp=2 ranks (global batch 8) in every layout
COMMON = ("moe.expert_num_per_dp_dim=2", "parallel.expert_parallel=2", "train.batch_size=4", "train.sink_size=1",
          "train.train_steps=8", "logging.log_steps=1", "checkpoint.keep_last=2")
FOUR = COMMON + ("parallel.op_level_model_parallel_num=2", "parallel.devices_per_node=2")
TWO = COMMON + ("parallel.op_level_model_parallel_num=1", "parallel.devices_per_node=1")


def die():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def kill_after_step(step):
    """A log function that kills this process once the line of `step` is logged."""
    def log(line):
        print(line, flush=True)
        if line.startswith("step") and int(line.split()[1].split("/")[0]) == step:
            die()
    return log


def kill_during_next_save(rank):
    """Rank 2 dies halfway through writing its next checkpoint file; the others after writing theirs."""
    from pangu_sigma.training import checkpoint, ckpt_stream

    original_save, original_write = checkpoint.save_rank, ckpt_stream.CheckpointWriter.write
    written = []

    def half_write(self, name, array):
        original_write(self, name, array)
        written.append(name)
        if len(written) == 20:
            die()

    def save_then_die(*args, **kwargs):
        if rank == 2:
            ckpt_stream.CheckpointWriter.write = half_write
        original_save(*args, **kwargs)
        die()

    checkpoint.save_rank = save_then_die


def main():
    out, data, scenario = sys.argv[1:4]
    import mindspore as ms
    import mindspore.communication as communication
    from mindspore.communication import get_rank, init
    from mindspore.communication.management import GlobalComm
    from pangu_sigma.training.train import train

    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device("CPU")
    init()
    # several runs in one process: MindSpore allows one set_device and one init per process
    ms.set_device = lambda *a, **k: None
    communication.init = lambda *a, **k: None if GlobalComm.INITED else init(*a, **k)
    rank = get_rank()
    if scenario == "first":
        cfg = tiny_run_config(data, os.path.join(out, "a"), FOUR + ("checkpoint.save_steps=4",))
        train(cfg, log=print)
        if rank == 0:
            from pangu_sigma.build import build_model, dataset_meta, parallel_context
            from pangu_sigma.parallel.tp_layers import tp_shard_specs

            net = build_model(cfg, dataset_meta(cfg), parallel_context(cfg).topology, parallel=parallel_context(cfg))
            with open(os.path.join(out, "spec.json"), "w", encoding="utf-8") as handle:
                json.dump({k: [v.dim, v.parts] for k, v in tp_shard_specs(net).items()}, handle)
        cfg = tiny_run_config(data, os.path.join(out, "k"), FOUR + ("checkpoint.save_steps=2",))
        train(cfg, log=kill_after_step(int(sys.argv[4])))
    elif scenario == "killwrite":
        kill_during_next_save(rank)
        train(tiny_run_config(data, os.path.join(out, "k"), FOUR + ("checkpoint.save_steps=2",)), resume=True)
    elif scenario == "finish":
        train(tiny_run_config(data, os.path.join(out, "k"), FOUR + ("checkpoint.save_steps=2",)), resume=True)
        # eval of run A on its training layout (pangu_sigma.evaluation.distributed), in this launch
        from pangu_sigma.evaluation.distributed import evaluate_on_cluster, json_safe

        cfg = tiny_run_config(data, os.path.join(out, "a"), FOUR + ("checkpoint.save_steps=4",))
        result, rank_of_result = evaluate_on_cluster(cfg, os.path.join(out, "a"), batch_size=4)
        with open(os.path.join(out, f"dist_eval_rank{rank_of_result}.json"), "w", encoding="utf-8") as handle:
            json.dump(json_safe(result), handle)
    elif scenario == "two":
        train(tiny_run_config(data, os.path.join(out, "a2"), TWO + ("checkpoint.save_steps=4",)), resume=True)
    print(f"[worker {rank}] {scenario} done", flush=True)


if __name__ == "__main__":
    main()
