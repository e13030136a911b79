"""Command line: `python -m data_gen generate|niah|convert|shards ...` (see --help of each)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
from collections.abc import Iterator, Sequence
from typing import Annotated, Literal

import tyro

from data_gen.convert import FORMATS, convert
from data_gen.niah import NiahConfig, generate_niah
from data_gen.records import existing_outputs, file_sha256
from data_gen.shards import (DEFAULT_BUCKETS, MANIFEST, ShardError, examples_from_jsonl, format_padding_report,
                             write_shards)
from data_gen.tasks import PRESETS, TaskConfig, generate
from data_gen.tokenizer import MISTRAL, TokenizerIdentity, get_tokenizer

PresetName = Literal[tuple(PRESETS)]  # type: ignore[valid-type]


@dataclasses.dataclass(frozen=True)
class GenerateCommand:
    """Generate a synthetic retrieval dataset: OUT/train.jsonl, OUT/eval.jsonl (chat JSONL with per-sample
    metadata) and OUT/generation.json. `--preset` picks the defaults of every other option; same options and
    seed give byte-identical files. Presets: paper-simple (the paper's Mistral setting), paper-multisubkey,
    demo-simple (tiny, for the CPU demo). Token counts (--max-tokens, meta num_tokens) are those of
    --tokenizer's chat encoding."""

    out: pathlib.Path
    """output directory"""
    preset: PresetName = "paper-simple"
    """named configuration whose values are the defaults of the options below"""
    seed: int = 0
    """random seed (the paper uses 0, 1, 2)"""
    overwrite: bool = False
    """replace existing train.jsonl / eval.jsonl in OUT"""
    progress: bool = True
    """show progress bars"""
    tokenizer: str = MISTRAL
    """'mistral' (Mistral 7B's, built in) or a Hugging Face model/tokenizer folder: tokens are counted with its
    chat template"""
    config: Annotated[TaskConfig, tyro.conf.arg(name="")] = PRESETS["paper-simple"]


@dataclasses.dataclass(frozen=True)
class NiahCommand:
    """Generate needle-in-a-haystack finetuning data (a baseline of the paper): OUT/train.jsonl, OUT/eval.jsonl
    (chat JSONL) and OUT/generation.json. Each example hides "The special magic number of <city> is <number>."
    at a chosen depth of real text (--haystack mdqa:DIR, the distractor passages of Lost-in-the-Middle files,
    never their questions, answers or gold passages; or txt:DIR, *.txt files) cut to --context-tokens tokens of
    --tokenizer, and asks for the number. Same options, corpus and seed give byte-identical files."""

    out: pathlib.Path
    """output directory"""
    seed: int = 0
    """random seed"""
    overwrite: bool = False
    """replace existing train.jsonl / eval.jsonl in OUT"""
    progress: bool = True
    """show progress bars"""
    tokenizer: str = MISTRAL
    """'mistral' (Mistral 7B's, built in) or a Hugging Face model/tokenizer folder: tokens are counted with it"""
    config: Annotated[NiahConfig, tyro.conf.arg(name="")] = NiahConfig(haystack=tyro.MISSING)


@dataclasses.dataclass(frozen=True)
class ConvertCommand:
    """Convert a published long-context training set (a baseline of the paper) into chat JSONL: OUT/train.jsonl
    and OUT/generation.json, for `python -m data_gen shards`. Formats: multidocqa (Yu 2024's multi-document QA:
    'messages', or 'context' + 'questions'/'answers') and in2 (An et al. 2024, FILM's 'prompt' + 'completion', or
    'context' + 'question' + 'answer'); docs/data_gen.md lists the fields. A row that cannot be converted stops
    with a one-line error naming file:line."""

    format: Literal[tuple(FORMATS)]  # type: ignore[valid-type]
    """which training set the files hold"""
    input: tuple[pathlib.Path, ...]
    """one or more JSONL files (.jsonl or .jsonl.gz)"""
    out: pathlib.Path
    """output directory"""
    num_samples: int | None = None
    """keep a uniform random sample of this many examples (in input order); default: all"""
    max_tokens: int | None = None
    """leave out examples whose chat has more tokens than this (counted with --tokenizer)"""
    seed: int = 0
    """seed of the --num-samples sample"""
    overwrite: bool = False
    """replace an existing train.jsonl in OUT"""
    progress: bool = True
    """show progress bars"""
    tokenizer: str = MISTRAL
    """'mistral' (Mistral 7B's, built in) or a Hugging Face model/tokenizer folder: tokens are counted with it"""


@dataclasses.dataclass(frozen=True)
class ShardsCommand:
    """Tokenize chat JSONL files ({"messages": [...], "meta": {...}} a line; ours or any other dataset) with the
    chat format of --tokenizer (default Mistral-Instruct) into length-bucketed ArrayRecord shards plus
    OUT/manifest.json (tokenizer identity, checksums, counts, padding efficiency). A generation.json next to an
    input file is recorded in the manifest."""

    input: tuple[pathlib.Path, ...]
    """one or more chat JSONL files, written in this order"""
    out: pathlib.Path
    """output directory (must not hold shards yet)"""
    buckets: tuple[int, ...] = DEFAULT_BUCKETS
    """sequence-length bucket boundaries; each example goes to the smallest bucket that holds it"""
    overflow: Literal["reject", "truncate"] = "reject"
    """examples longer than the largest bucket: reject them (listed in the manifest) or cut prompt tokens from the left"""
    records_per_shard: int = 1000
    """records per ArrayRecord file"""
    tokenizer: str = MISTRAL
    """'mistral' (Mistral 7B's, built in) or a Hugging Face model/tokenizer folder: the model's tokenizer and
    chat template"""
    progress: bool = True
    """show progress bars"""


class _Counted:
    """An iterator with a length hint, so the progress bar shows a total."""

    def __init__(self, it: Iterator, n: int):
        self._it, self._n = it, n

    def __iter__(self):
        return self._it

    def __len__(self) -> int:
        return self._n


def _refuse_existing(out: pathlib.Path, splits: tuple[str, ...], overwrite: bool) -> None:
    if (existing := existing_outputs(out, splits)) and not overwrite:
        raise SystemExit(f"error: {existing[0]} exists; pass --overwrite to replace it")


def _print_splits(out: pathlib.Path, info: dict) -> None:
    for split in info["splits"].values():
        print(f"{out / split['file']}: {split['num_samples']} samples, "
              f"{split['min_tokens']}-{split['max_tokens']} tokens (mean {split['mean_tokens']})")


def run_generate(cmd: GenerateCommand) -> None:
    _refuse_existing(cmd.out, ("train", "eval"), cmd.overwrite)
    _print_splits(cmd.out, generate(cmd.config, cmd.seed, cmd.out, preset=cmd.preset, progress=cmd.progress,
                                    tokenizer=get_tokenizer(cmd.tokenizer)))


def run_niah(cmd: NiahCommand) -> None:
    _refuse_existing(cmd.out, ("train", "eval"), cmd.overwrite)
    _print_splits(cmd.out, generate_niah(cmd.config, cmd.seed, cmd.out, tokenizer=get_tokenizer(cmd.tokenizer),
                                         progress=cmd.progress))


def run_convert(cmd: ConvertCommand) -> None:
    _refuse_existing(cmd.out, ("train",), cmd.overwrite)
    info = convert(cmd.format, list(cmd.input), cmd.out, tokenizer=get_tokenizer(cmd.tokenizer),
                   num_samples=cmd.num_samples, max_tokens=cmd.max_tokens, seed=cmd.seed, progress=cmd.progress)
    if info["too_long"]:
        print(f"left out {info['too_long']} of {info['rows']} rows longer than {cmd.max_tokens} tokens")
    _print_splits(cmd.out, info)


def run_shards(cmd: ShardsCommand) -> None:
    if not cmd.input:
        raise SystemExit("error: --input needs at least one JSONL file")
    tokenizer = get_tokenizer(cmd.tokenizer)
    inputs = []
    for path in cmd.input:
        if not path.is_file():
            raise SystemExit(f"error: input file {path} not found")
        gen = path.parent / "generation.json"
        with open(path, "rb") as f:  # bytes: a line that is not UTF-8 is reported by file:line when tokenized
            lines = sum(1 for line in f if line.strip())
        try:
            generation = json.loads(gen.read_text()) if gen.is_file() else None
            entry = generation.get("tokenizer") if isinstance(generation, dict) else None
            counted = TokenizerIdentity.from_json(entry) if entry is not None else None
        except ValueError as e:
            raise SystemExit(f"error: {gen}: {e}") from None
        if counted and counted.sha256 != tokenizer.identity().sha256:
            print(f"note: the token budget of {path} was counted with tokenizer {counted.name!r}, not with "
                  f"{tokenizer.name!r}: its examples may be longer or shorter here")
        inputs.append({"path": str(path), "sha256": file_sha256(path), "num_lines": lines, "generation": generation})

    def examples():
        for path in cmd.input:
            yield from examples_from_jsonl(path, tokenizer)

    manifest = write_shards(
        _Counted(examples(), sum(i["num_lines"] for i in inputs)), cmd.out, buckets=cmd.buckets,
        overflow=cmd.overflow, records_per_shard=cmd.records_per_shard, metadata={"inputs": inputs},
        progress=cmd.progress, tokenizer=tokenizer)
    if not manifest["num_examples"]:
        (cmd.out / MANIFEST).unlink()  # an empty shard set trains nothing; free --out for the next attempt
        why = (f"all {manifest['num_rejected']} were longer than {max(cmd.buckets)} tokens (raise --buckets, or "
               "--overflow truncate)" if manifest["num_rejected"] else "the input holds none")
        raise SystemExit(f"error: {cmd.out}: no example was written: {why}")
    for b in manifest["buckets"]:
        print(f"bucket {b['max_len']:>6}: {b['num_examples']} examples, {b['num_tokens']} tokens, "
              f"{len(b['shards'])} file(s)")
    if manifest["num_rejected"]:
        ids = ", ".join(r["id"] for r in manifest["rejected"][:5])
        print(f"rejected {manifest['num_rejected']} examples longer than {max(cmd.buckets)} tokens "
              f"(e.g. {ids}); see 'rejected' in the manifest or use --overflow truncate")
    if manifest["num_truncated"]:
        print(f"truncated {manifest['num_truncated']} examples to {max(cmd.buckets)} tokens")
    print(format_padding_report(manifest))
    print(f"wrote {manifest['num_examples']} examples tokenized with {tokenizer.name!r} to {cmd.out}")


USAGE = """usage: python -m data_gen {generate,niah,convert,shards} [OPTIONS]

  generate   generate the synthetic key-value retrieval datasets (train.jsonl, eval.jsonl)
  niah       generate needle-in-a-haystack finetuning data over a text corpus (a baseline)
  convert    convert MultiDocQA or IN2 training files into chat JSONL (baselines)
  shards     tokenize chat JSONL into length-bucketed ArrayRecord shards with a manifest

Run `python -m data_gen <command> --help` for the options of a command."""


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return
    command, rest = args[0], args[1:]
    try:
        if command == "generate":
            pre = argparse.ArgumentParser(add_help=False)
            pre.add_argument("--preset", default="paper-simple")
            name = pre.parse_known_args(rest)[0].preset
            if name not in PRESETS:
                raise SystemExit(f"error: unknown --preset {name!r}; choose from {', '.join(PRESETS)}")
            default = GenerateCommand(out=tyro.MISSING, preset=name, config=PRESETS[name])
            run_generate(tyro.cli(GenerateCommand, default=default, args=rest, prog="python -m data_gen generate"))
        elif command == "niah":
            run_niah(tyro.cli(NiahCommand, args=rest, prog="python -m data_gen niah"))
        elif command == "convert":
            run_convert(tyro.cli(ConvertCommand, args=rest, prog="python -m data_gen convert"))
        elif command == "shards":
            run_shards(tyro.cli(ShardsCommand, args=rest, prog="python -m data_gen shards"))
        else:
            raise SystemExit(f"error: unknown command {command!r}\n\n{USAGE}")
    except (ValueError, ShardError) as e:  # config, budget and data errors: the message says what to fix
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
