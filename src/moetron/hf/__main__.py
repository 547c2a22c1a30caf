"""`python -m moetron.hf export|import SRC DST`: convert between moetron runs and Hugging Face DeepSeek-V3 directories."""

from __future__ import annotations

import argparse
import sys

from moetron.config import ConfigError

EXPORT_HELP = """\
Write a Hugging Face directory in the published DeepSeek-V3 layout from a moetron checkpoint:
config.json (DeepseekV3Config), model.safetensors or model-0000i-of-0000n.safetensors shards with
model.safetensors.index.json, per-expert weights (model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight)
and the MTP module(s) as layer num_hidden_layers(+k). transformers loads it with
DeepseekV3ForCausalLM.from_pretrained(DST) (which skips the MTP layer)."""

IMPORT_HELP = """\
Create a new moetron run directory from a Hugging Face DeepSeek-V3 directory (config.json + safetensors, the
published per-expert layout, transformers' fused mlp.experts.gate_up_proj/down_proj layout, or the published
block-scaled FP8 weights). Writes DST/config.yaml, DST/conf/model/NAME.yaml and a model-only checkpoint
DST/checkpoints/step_00000000; then train with the command it prints:
  python -m moetron.train --config-dir DST/conf model=NAME run.dir=DST [the same OVERRIDES]"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m moetron.hf",
        description="Convert between moetron checkpoints and Hugging Face DeepSeek-V3 directories.",
        epilog="Examples:\n"
               "  python -m moetron.hf export runs/tiny hf/tiny --dtype fp32\n"
               "  python -m moetron.hf import hf/tiny runs/tiny_ft --name tiny_hf train=tiny",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{export,import}")

    exp = sub.add_parser("export", help="moetron checkpoint -> Hugging Face directory", description=EXPORT_HELP,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    exp.add_argument("src", metavar="SRC", help="a run directory (its newest complete checkpoint is exported) or one "
                     "RUN/checkpoints/step_NNNNNNNN directory")
    exp.add_argument("dst", metavar="DST", help="the Hugging Face directory to write")
    exp.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"],
                     help="weight dtype in the safetensors files (default: bf16, as published; "
                          "e_score_correction_bias always stays fp32)")
    exp.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                     help="largest safetensors file before sharding, e.g. 5GB, 500MB, 2GiB (default: 5GB)")
    exp.add_argument("--overwrite", action="store_true", help="replace model files already in DST")
    exp.add_argument("--allow-routing-mismatch", action="store_true",
                     help="export even when transformers would route tokens differently (n_group > 1 with "
                          "num_experts_per_tok / topk_group != 2)")

    imp = sub.add_parser("import", help="Hugging Face directory -> new moetron run directory", description=IMPORT_HELP,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    imp.add_argument("src", metavar="SRC", help="a Hugging Face directory with config.json and safetensors weights")
    imp.add_argument("dst", metavar="DST", help="the new run directory (must not hold checkpoints yet)")
    imp.add_argument("overrides", nargs="*", metavar="OVERRIDE",
                     help="Hydra overrides of the train/data/run sections you will train with, e.g. train=tiny "
                          "train.seq_len=256 (the trainer refuses to resume with another train.seq_len or tokenizer)")
    imp.add_argument("--name", default="imported",
                     help="name of the imported model (model.name, and the Hydra option model=NAME; default: imported)")
    imp.add_argument("--mtp", default="auto", choices=["auto", "require", "drop"],
                     help="auto: import the MTP layer(s), initializing them fresh when SRC has none (transformers' "
                          "save_pretrained drops them); require: their absence is an error; drop: import without "
                          "MTP (default: auto)")
    imp.add_argument("--allow-routing-mismatch", action="store_true",
                     help="import even when moetron would route tokens differently from transformers")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may come after options (`import SRC DST --name x train=tiny`), which argparse leaves over.
    if args.command == "import" and not any(item.startswith("-") for item in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        from moetron.hf.convert import export_checkpoint, import_checkpoint

        if args.command == "export":
            report = export_checkpoint(args.src, args.dst, dtype=args.dtype, max_shard_size=args.max_shard_size,
                                       overwrite=args.overwrite, allow_routing_mismatch=args.allow_routing_mismatch)
        else:
            report = import_checkpoint(args.src, args.dst, overrides=args.overrides, name=args.name, mtp=args.mtp,
                                       allow_routing_mismatch=args.allow_routing_mismatch)
    except ConfigError as err:  # a user mistake: one paragraph, no traceback
        print(f"moetron: error: {err}", file=sys.stderr)
        sys.exit(2)
    for note in report.notes:
        print(f"moetron: note: {note}")
    shown = ", ".join(report.files[:4]) + (f" (+{len(report.files) - 4} more)" if len(report.files) > 4 else "")
    print(f"moetron: {args.command}ed {report.source} -> {report.destination}: {shown}")
    if report.next_command:
        print(f"moetron: continue training with: {report.next_command}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
