"""`switchhead-rewrite generate DIR --prompt "..."`: generate text with a saved converted decoder
(switchhead.convert_decoder, then save), tokenized by its model file's tokenizer, streaming the
text to stdout as the tokens come."""

from __future__ import annotations

import traceback
from pathlib import Path

import click
import torch

from switchhead.cli.common import PROG, CliError, Command, ExitCode
from switchhead.decoder import CachedLM
from switchhead.errors import SwitchHeadError
from switchhead.io import LoadError, load, read_manifest
from switchhead.model_file import tokenizer_of_file

EPILOG = """\b
Example:
  switchhead-rewrite generate out/ --prompt "def fibonacci(n):" --max-new-tokens 40

\b
DIR holds a decoder saved by switchhead.save(switchhead.convert_decoder(model), DIR).
The tokenizer is the model file's `tokenizer` or `get_tokenizer()`; the model file
is the one DIR was converted from (report.json's "source") unless --model-file says.

\b
Exit codes: 0 ok, 1 model or tokenizer failed, 2 bad options, 4 DIR unreadable.
"""


@click.command(cls=Command, epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
@click.option("--prompt", "-p", required=True, help="Text to continue.")
@click.option("--max-new-tokens", "-n", type=int, default=32, show_default=True, help="Tokens to generate at most.")
@click.option("--sample", is_flag=True, help="Sample instead of greedy decoding.")
@click.option("--temperature", type=float, default=1.0, show_default=True, help="With --sample: softmax temperature.")
@click.option("--top-k", type=int, default=None, help="With --sample: keep the k most likely tokens.")
@click.option("--top-p", type=float, default=None, help="With --sample: keep the most likely tokens up to this mass.")
@click.option("--seed", type=int, default=0, show_default=True, help="With --sample: the sampling seed.")
@click.option("--model-file", type=click.Path(path_type=Path, dir_okay=False), help="Model file whose tokenizer to use.")
@click.option("--traceback", "show_traceback", is_flag=True, help="Show the Python traceback of an error.")
def generate_main(directory: Path, prompt: str, max_new_tokens: int, sample: bool, temperature: float,
                  top_k: int | None, top_p: float | None, seed: int, model_file: Path | None,
                  show_traceback: bool) -> int:
    """Continue PROMPT with the converted decoder saved in DIRECTORY, printing the text as it comes."""
    try:
        if max_new_tokens < 1:
            raise CliError(f"--max-new-tokens must be at least 1, got {max_new_tokens}", ExitCode.USAGE)
        if not sample and (top_k is not None or top_p is not None or temperature != 1.0):
            raise CliError("--temperature / --top-k / --top-p need --sample", ExitCode.USAGE)
        try:
            model = load(directory)
            source = model_file or read_manifest(directory).get("source")
        except LoadError as exc:
            raise CliError(str(exc), ExitCode.OUTPUT) from None
        if not isinstance(model, CachedLM):
            raise CliError(f"{directory} holds a model converted without a KV cache: convert it with "
                           "switchhead.convert_decoder(model) and save that to generate", ExitCode.USAGE)
        if source is None:
            raise CliError(f"{directory} does not name its model file: pass --model-file for the tokenizer", ExitCode.USAGE)
        tokenizer = tokenizer_of_file(Path(source))
        if tokenizer is None:
            raise CliError(f"{source} defines no `tokenizer` or `get_tokenizer()` to encode the prompt with", ExitCode.MODEL)
        ids = torch.tensor([list(tokenizer(prompt, add_special_tokens=False)["input_ids"])], dtype=torch.long)
        if ids.numel() == 0:
            raise CliError("the prompt encodes to no tokens", ExitCode.USAGE)
        eos = getattr(tokenizer, "eos_token_id", None)
        stream = TextStream(tokenizer)
        click.echo(prompt, nl=False)
        model.generate(ids, max_new_tokens=max_new_tokens, do_sample=sample, temperature=temperature, top_k=top_k,
                       top_p=top_p, eos_token_id=eos, generator=torch.Generator().manual_seed(seed),
                       streamer=stream)
        click.echo("")
        return ExitCode.OK
    except (CliError, SwitchHeadError) as exc:
        if show_traceback:
            traceback.print_exception(exc)
        code = exc.code if isinstance(exc, CliError) else ExitCode.MODEL
        click.echo(f"{PROG} generate: error: {exc}", err=True)
        return code


class TextStream:
    """Prints the text of the tokens generated so far as each one comes: the decoded whole minus
    what was printed (a token may end inside a multi-byte character: held back until complete)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.printed = tokenizer, [], ""

    def __call__(self, tokens: torch.Tensor) -> None:
        self.ids.append(int(tokens[0]))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        click.echo(text[len(self.printed):], nl=False)
        self.printed = text
