"""The `smallm` command: parses arguments and calls the library. One function pair per verb.

Every verb's problems that a person can fix arrive as SmallmError and leave as one line on stderr with
exit code 1; Ctrl-C outside training exits with 130 and no traceback.
"""

from __future__ import annotations

import argparse
import sys

from smallm.errors import SmallmError


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (`smallm train: error: ...`, exit 2) instead of a usage dump."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="smallm",
        description="Train a small GPT on TinyStories, then sample, evaluate, export and serve it.",
        formatter_class=_Formatter,
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for add_verb in VERBS:
        add_verb(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args) or 0
    except SmallmError as e:
        print(f"smallm {args.verb}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"smallm {args.verb}: interrupted", file=sys.stderr)
        return 130


# ---- verbs: each adds its subparser and sets `run` to the function that does the work -----------------


def add_prepare(sub):
    p = sub.add_parser(
        "prepare",
        help="tokenize TinyStories (or any text) into uint16 token files",
        description="Tokenize a Hugging Face dataset (default roneneldan/TinyStories) or local text files "
        "into OUT/train.bin and OUT/validation.bin (GPT-2 ids, or those of a BPE trained on the text; "
        "<|endoftext|> after every story) and OUT/meta.json, in parallel. A finished OUT with the same "
        "inputs is reused.",
        formatter_class=_Formatter,
    )
    p.add_argument(
        "--dataset",
        metavar="NAME_OR_DIR",
        default="roneneldan/TinyStories",
        help="a Hugging Face Hub dataset or a local directory in its layout (not with --text-files)",
    )
    p.add_argument(
        "--text-files",
        nargs="+",
        metavar="PATH",
        help="plain text files: TinyStories format (stories separated by <|endoftext|> lines) or one "
        "document per file",
    )
    p.add_argument("--column", default="text", help="the dataset column holding the text")
    p.add_argument("--out", default="data/tinystories", help="output directory (written atomically)")
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.005,
        help="share of documents held out for validation when the source has no validation split",
    )
    p.add_argument("--workers", type=int, default=0, help="tokenizer processes (0: one per core)")
    p.add_argument("--seed", type=int, default=1337, help="seed of the validation split")
    p.add_argument("--force", action="store_true", help="rebuild even if OUT already holds these inputs")
    p.add_argument(
        "--tokenizer",
        default="gpt2",
        metavar="gpt2|bpe:N|PATH",
        help="gpt2; bpe:N trains a byte-level BPE of N tokens (at most 65536) on the training split and "
        "keeps it as OUT/tokenizer.json; PATH: an existing tokenizer.json, or a checkpoint holding one",
    )
    p.set_defaults(run=run_prepare)


def run_prepare(args):
    from smallm.data import DEFAULT_DATASET, prepare

    if args.text_files and args.dataset != DEFAULT_DATASET:
        raise SmallmError("use either --dataset or --text-files, not both")
    meta = prepare(
        out_dir=args.out,
        dataset=args.dataset,
        text_files=args.text_files,
        column=args.column,
        val_fraction=args.val_fraction,
        workers=args.workers,
        seed=args.seed,
        force=args.force,
        tokenizer=args.tokenizer,
    )
    if meta["reused"]:
        print(f"{args.out} already holds these inputs: reusing it (--force rebuilds)")
    if meta["tokenizer_seconds"] is not None:
        print(
            f"{args.out}/tokenizer.json: a {meta['vocab_size']:,}-token byte-level BPE trained in "
            f"{meta['tokenizer_seconds']:.1f} s"
        )
    for split, info in meta["splits"].items():
        print(
            f"{args.out}/{split}.bin: {info['tokens']:,} tokens, {info['documents']:,} documents, "
            f"{info['bytes']:,} bytes of text"
        )


def add_train(sub):
    from smallm.train_config import FIELDS, PRESETS

    p = sub.add_parser(
        "train",
        help="train a GPT on prepared data (the seed recipe by default)",
        description="Train on a `smallm prepare` directory. The config is a preset, then --config FILE.yaml, "
        "then the field flags, each on top of the last. Writes RUN/config.yaml, metrics.jsonl, loss.png, "
        "best/ and last/. Ctrl-C saves last/; --resume continues from it. Under torchrun it trains with DDP.",
        formatter_class=_Formatter,
        allow_abbrev=False,  # --learning-rat is a typo, not --learning-rate
    )
    keep_out = argparse.SUPPRESS  # absent from args unless given (the help says the real default)
    p.add_argument("--data", default=keep_out, help="prepared data (default: data/tinystories, or the run's)")
    p.add_argument("--out", default=keep_out, help="run directory (default: runs/<timestamp> + runs/latest)")
    p.add_argument("--preset", default=keep_out, help=f"named config: {', '.join(PRESETS)} (default: seed)")
    p.add_argument("--config", metavar="FILE.yaml", default=keep_out, help="YAML mapping of config fields")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last/")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    fields = p.add_argument_group("config fields (dashes or underscores; seed values shown)")
    for name, f in FIELDS.items():
        flags = [f"--{name.replace('_', '-')}"] + ([f"--{name}"] if "_" in name else [])
        kind = f.type.split()[0]  # "int", "float", "bool", "str"
        extra = dict(metavar=kind.upper())
        if kind == "bool":
            extra = dict(nargs="?", const="true", metavar="BOOL")  # `--compile` alone means true
        seed = "max_iters" if name == "lr_decay_iters" else f.default
        help = f"{f.metadata['help']} [seed: {seed}]".replace("%", "%%")  # argparse formats help with %
        fields.add_argument(*flags, dest=name, default=keep_out, help=help, **extra)
    p.set_defaults(run=run_train)


def run_train(args):
    import dataclasses
    import os

    from smallm.train_config import FIELDS, build_config, config_to_yaml, plan_steps, resume_config

    overrides = {name: getattr(args, name) for name in FIELDS if hasattr(args, name)}
    data, out = getattr(args, "data", None), getattr(args, "out", None)
    preset, config_file = getattr(args, "preset", None), getattr(args, "config", None)
    if args.resume:
        if out is None:
            raise SmallmError("--resume needs --out RUN, the run to continue")
        if preset or config_file:
            raise SmallmError("--resume continues with the run's saved config; drop --preset/--config")
        config, saved_data = resume_config(out, overrides)
        data = data or saved_data
    else:
        config = build_config(preset or "seed", config_file, overrides)
        data = data or "data/tinystories"
    if args.print_config:
        if config.tokens:  # a token budget's plan is known now (a time budget's only once training runs)
            config = dataclasses.replace(config, **plan_steps(config, config.tokens))
        print(config_to_yaml(config), end="")
        return 0

    from smallm.train import train

    result = train(config, data, out, resume=args.resume)
    if result["interrupted"]:
        return 130
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 speaks
        val = "" if result["val_loss"] is None else f", val loss {result['val_loss']:.4f}"
        print(f"done: {result['step']} steps{val} in {result['out_dir']}")
    return 0


# keep this list last, in the order: prepare, train, generate, eval, export, serve


def _add_run_dir(p):
    """The RUN positional of generate, eval, export and serve: what resolve_checkpoint accepts."""
    p.add_argument(
        "run_dir", metavar="RUN", help="run directory (its best/; runs/latest works) or a checkpoint"
    )


def _add_dtype(p):
    """--dtype of generate, eval and serve: the dtype the weights are cast to."""
    p.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="weights' dtype; auto is float32 (bfloat16 halves the bytes read per token, but changes some "
        "greedy text)",
    )


def add_generate(sub):
    p = sub.add_parser(
        "generate",
        help="sample text from a trained model",
        description="Print PROMPT followed by a sampled continuation from RUN/best (or a checkpoint "
        "directory), streaming it as it is produced. The same --seed gives the same text; an empty prompt "
        "starts from <|endoftext|>.",
        formatter_class=_Formatter,
    )
    _add_run_dir(p)
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=200, help="most tokens to add to each sample")
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy; higher is more random")
    p.add_argument("--top-k", type=int, default=200, help="sample from the k most likely tokens (1 = greedy)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: smallest set with prob >= p")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: different every run)")
    p.add_argument(
        "--num-samples", type=int, default=1, help="how many samples to print (generated as one batch)"
    )
    p.add_argument(
        "--stop-at-eot",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="end a sample at <|endoftext|> (the end of a story)",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cuda > mps > cpu)")
    _add_dtype(p)
    p.set_defaults(run=run_generate)


def run_generate(args):

    from smallm.generate import generate_text, load_for_inference
    from smallm.tokenizer import get_tokenizer

    if args.max_new_tokens < 0 or args.num_samples < 1:
        raise SmallmError("--max-new-tokens must be >= 0 and --num-samples >= 1")
    model, checkpoint = load_for_inference(args.run_dir, args.device, args.dtype)
    tty = sys.stdout.isatty()

    def write(text):
        sys.stdout.write(text)
        if tty:
            sys.stdout.flush()

    generate_text(
        model,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        num_samples=args.num_samples,
        stop_at_eot=args.stop_at_eot,
        write=write,
        tokenizer=get_tokenizer(checkpoint),
    )
    write("\n")


def add_eval(sub):
    p = sub.add_parser(
        "eval",
        help="loss, perplexity and bits per byte over a whole data split",
        description="Evaluate RUN/best (or a checkpoint directory) on every token of a prepared split, in "
        "non-overlapping windows of block_size. Prints one JSON line {val_loss, perplexity, bits_per_byte, "
        "tokens} on stdout and a summary on stderr.",
        formatter_class=_Formatter,
    )
    _add_run_dir(p)
    p.add_argument("--data", default="data/tinystories", help="directory written by `smallm prepare`")
    p.add_argument("--split", default="validation", help="which split to evaluate")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cuda > mps > cpu)")
    _add_dtype(p)
    p.set_defaults(run=run_eval)


def run_eval(args):
    import json

    from smallm.evaluate import evaluate
    from smallm.generate import load_for_inference

    model, checkpoint = load_for_inference(args.run_dir, args.device, args.dtype)
    progress = sys.stderr.isatty()
    result = evaluate(model, args.data, args.split, args.batch_size, progress, checkpoint=checkpoint)
    print(json.dumps(result))
    bpb = "n/a" if result["bits_per_byte"] is None else f"{result['bits_per_byte']:.4f}"
    print(
        f"{checkpoint} on {args.data} ({args.split}, {result['tokens']:,} tokens): "
        f"loss {result['val_loss']:.4f}, perplexity {result['perplexity']:.2f}, {bpb} bits per byte",
        file=sys.stderr,
    )


def add_export(sub):
    p = sub.add_parser(
        "export",
        help="write a checkpoint as a Hugging Face GPT-2 directory",
        description="Write RUN/best (or a checkpoint directory) as a GPT2LMHeadModel + GPT-2 tokenizer that "
        "transformers' AutoModelForCausalLM / AutoTokenizer load offline.",
        formatter_class=_Formatter,
    )
    _add_run_dir(p)
    p.add_argument("--format", choices=["hf"], default="hf", help="output format: Hugging Face transformers")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--force", action="store_true", help="replace --out even if it is not an earlier export")
    p.set_defaults(run=run_export)


def run_export(args):
    from smallm.export import export_hf

    out = export_hf(args.run_dir, args.out, force=args.force)
    print(f"exported to {out}: load with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")


def add_serve(sub):
    p = sub.add_parser(
        "serve",
        help="serve a web page and an OpenAI-style /v1/completions endpoint",
        description="Serve RUN/best (or a checkpoint directory): GET / is a page to write stories with, "
        "POST /v1/completions is OpenAI-compatible (the `openai` client works), GET /health.",
        formatter_class=_Formatter,
    )
    _add_run_dir(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 exposes it to the network")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--max-tokens-cap", type=int, default=512, help="largest max_tokens a request may ask for")
    p.add_argument(
        "--max-batch", type=int, default=8, help="requests generated together, one batch per decode step"
    )
    p.add_argument(
        "--max-queue", type=int, default=32, help="requests waiting for the batch; beyond, 503 + Retry-After"
    )
    _add_dtype(p)
    p.set_defaults(run=run_serve)


def run_serve(args):
    from smallm.serve import serve

    serve(args.run_dir, args.host, args.port, args.max_tokens_cap, args.max_batch, args.max_queue, args.dtype)


VERBS = [add_prepare, add_train, add_generate, add_eval, add_export, add_serve]
