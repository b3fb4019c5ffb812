"""Text continuation with a key/value cache:
python -m pangu_sigma.evaluation.generate --config FILE --checkpoint PATH --prompt TEXT
    [--max-new-tokens N] [--top-p P] [--temperature T] [--greedy] [--domain NAME] [--seed S]

PYNATIVE mode: the prompt runs once through the model, then one token per
step reuses the cached keys and values (PanguSigmaModel.forward_with_cache).
"""
import os
import sys

import numpy as np
import mindspore as ms
from mindspore import Tensor

from locmoe.errors import ConfigError, OneLineArgumentParser, run_cli
from pangu_sigma.training import checkpoint
from pangu_sigma.training.run_identity import split_fields
from pangu_sigma.build import build_model, dataset_meta, set_device, single_process_topology
from pangu_sigma.config import load_config


def sample_next(logits, rng, top_p, temperature, greedy):
    """Nucleus (top-p) sampling from one logit vector [V]; greedy takes the argmax."""
    if greedy:
        return int(np.argmax(logits))
    scaled = (logits - logits.max()) / max(temperature, 1e-6)
    probs = np.exp(scaled) / np.exp(scaled).sum()
    order = np.argsort(-probs, kind="stable")
    cumulative = np.cumsum(probs[order])
    keep = order[: int(np.searchsorted(cumulative, top_p)) + 1]
    return int(rng.choice(keep, p=probs[keep] / probs[keep].sum()))


def generate_ids(model, prompt_ids, domain_id, max_new_tokens, seq_length, top_p=0.9, temperature=1.0,
                 greedy=False, seed=0, eos_id=None):
    """Token ids of the continuation (prompt excluded)."""
    rng = np.random.RandomState(seed)
    room = seq_length - max_new_tokens
    prompt_ids = list(prompt_ids)[-room:]
    domains = Tensor(np.array([domain_id], np.int32))
    logits, cache = model.forward_with_cache(Tensor(np.array([prompt_ids], np.int32)), domains, None, 0)
    position = len(prompt_ids)
    new_ids = []
    for _ in range(max_new_tokens):
        token = sample_next(logits.asnumpy()[0, -1], rng, top_p, temperature, greedy)
        new_ids.append(token)
        if token == eos_id or position >= seq_length:
            break
        logits, cache = model.forward_with_cache(Tensor(np.array([[token]], np.int32)), domains, cache, position)
        position += 1
    return new_ids


def main(argv=None):
    parser = OneLineArgumentParser(description="Continue a prompt with a trained PanGu-Sigma.")
    parser.add_argument("--config", required=True)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--greedy", action="store_true")
    parser.add_argument("--domain", default=None, help="domain name (default: the first one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--allow-config-change", action="append", default=[], metavar="FIELD[,FIELD]",
                        help="config or dataset fields allowed to differ from the checkpoint's run")
    args = parser.parse_args(argv)
    def run():
        import sentencepiece as spm

        cfg = load_config(args.config, args.set)
        meta = dataset_meta(cfg)
        if not 1 <= args.max_new_tokens < cfg.model.seq_length:
            raise ConfigError("--max-new-tokens", args.max_new_tokens, f"in [1, {cfg.model.seq_length - 1}]")
        if not 0 < args.top_p <= 1:
            raise ConfigError("--top-p", args.top_p, "a number in (0, 1]")
        if args.temperature <= 0:
            raise ConfigError("--temperature", args.temperature, "a number > 0")
        domains = meta["domains"]
        domain = domains[0] if args.domain is None else args.domain
        if domain not in domains:
            raise ConfigError("--domain", domain, f"one of {domains}")
        tokenizer = spm.SentencePieceProcessor(model_file=os.path.join(cfg.data.dataset_dir, meta["tokenizer"]))
        prompt_ids = tokenizer.encode(args.prompt)
        if not prompt_ids:
            raise ConfigError("--prompt", args.prompt, "text that tokenizes to at least one token")
        room = cfg.model.seq_length - args.max_new_tokens
        if len(prompt_ids) > room:
            shown = args.prompt if len(args.prompt) <= 40 else args.prompt[:37] + "..."
            raise ConfigError("--prompt", shown, f"at most {room} tokens (model.seq_length {cfg.model.seq_length} - "
                              f"--max-new-tokens {args.max_new_tokens}); it has {len(prompt_ids)}: shorten it or "
                              f"lower --max-new-tokens")
        set_device(cfg, mode=ms.PYNATIVE_MODE)
        net = build_model(cfg, meta, single_process_topology(cfg), reads_by_placement=False)
        allowed = split_fields(args.allow_config_change)
        checkpoint.load_model_for_inference(net, cfg, args.checkpoint, allowed)
        net.set_train(False)
        new_ids = generate_ids(net.model, prompt_ids, domains.index(domain), args.max_new_tokens,
                               cfg.model.seq_length, args.top_p, args.temperature, args.greedy, args.seed,
                               tokenizer.eos_id())
        print(args.prompt + tokenizer.decode(new_ids))

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
