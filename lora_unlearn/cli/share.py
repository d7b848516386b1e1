"""Sharing and serving adapters: card, push, export, serve."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..errors import UserError
from .common import Base, Overwrite, Quant, _quiet_libraries, err_console, out_console, user_errors


@user_errors
def card(folder: Annotated[Path, typer.Argument(help="An adapter folder.")],
         force: Annotated[bool, typer.Option("--force", help="Replace a README.md that lora-unlearn did not write.")] = False,
         eval_: Annotated[Path | None, typer.Option("--eval", help="An `eval --out` folder (or its results.json) to "
                          "show; default: beside the adapter, else the newest under the run folder that evaluated it.")] = None):
    """(Re)write FOLDER/README.md, the model card: lineage, risks, and the adapter's evaluation."""
    from ..hub.cards import kind_of, write_card

    path = write_card(folder, force=force, results=eval_)
    err_console.print(f"wrote {path} ({kind_of(folder).kind} adapter)", soft_wrap=True)


@user_errors
def push(folder: Annotated[Path, typer.Argument(help="An adapter folder.")],
         repo_id: Annotated[str, typer.Argument(help="Hub repository, OWNER/NAME.")],
         private: Annotated[bool, typer.Option("--private", help="Create the repository as private.")] = False,
         allow_forget_adapter: Annotated[bool, typer.Option(
             "--allow-forget-adapter", help="Publish a forget or negated adapter anyway: adding it back restores "
             "the knowledge it removes.")] = False,
         message: Annotated[str | None, typer.Option("--message", "-m", help="Commit message.")] = None):
    """Upload an adapter (its PEFT files, lineage and card) to the Hugging Face Hub."""
    from ..hub.push import push as push_adapter

    url = push_adapter(folder, repo_id, private=private, allow_forget_adapter=allow_forget_adapter,
                       commit_message=message)
    out_console.print(url)


@user_errors
def export(folder: Annotated[Path, typer.Argument(help="An adapter folder.")],
           out: Annotated[Path, typer.Argument(help="Output folder.")],
           merged: Annotated[bool, typer.Option("--merged", help="Write base + dW as a full model (float32).")] = False,
           for_server: Annotated[str | None, typer.Option("--for", help="Make a multi-LoRA server accept it: vllm.")] = None,
           max_rank: Annotated[int | None, typer.Option("--max-rank", help="--for: the server's rank limit (vllm: 16).")] = None,
           dtype: Annotated[str | None, typer.Option("--dtype", help="Store A and B as float32, bfloat16 or float16.")] = None,
           base: Annotated[str | None, typer.Option("--base", help="--merged: the base (default: the adapter's own).")] = None,
           check_forget: Annotated[str | None, typer.Option("--check-forget", help="--merged: data the adapter "
                                   "forgets; report its probability unmerged and merged-then-nf4.")] = None,
           overwrite: Overwrite = False):
    """Export an adapter: merged into its base (--merged), servable (--for vllm), or cast (--dtype)."""
    from ..hub.export import export_cast, export_merged, export_servable

    if merged and (for_server or dtype or max_rank):
        raise UserError("--merged writes a float32 model: it takes no --for, --dtype or --max-rank")
    if not (merged or for_server or dtype):
        raise UserError("say what to export: --merged (a full model), --for vllm (a servable adapter) "
                        "or --dtype bfloat16 (a cast copy)")
    if max_rank is not None and not for_server:
        raise UserError("--max-rank goes with --for")
    if check_forget is not None and not merged:
        raise UserError("--check-forget goes with --merged")
    if merged:
        from ..training.sources import load_source

        _quiet_libraries()
        rows = load_source(check_forget) if check_forget is not None else None
        if rows is not None and not rows:
            raise UserError(f"--check-forget {check_forget}: no rows")
        report = export_merged(folder, out, base=base, overwrite=overwrite, check_forget=rows)
        err_console.print(f"wrote {out}: {report.base} + the adapter, merged in float32; logits against the "
                          f"unmerged adapter on {report.probes} probes: max |diff| {report.max_abs_logit_diff:.2e}, "
                          f"mean {report.mean_abs_logit_diff:.2e}", soft_wrap=True)
        if report.forget_rows:
            err_console.print(f"forget probability ({report.forget_rows} rows): unmerged "
                              f"{report.forget_unmerged_nf4:.4g}, merged-nf4 {report.forget_merged_nf4:.4g}",
                              soft_wrap=True)
    elif for_server:
        report = export_servable(folder, out, server=for_server, max_rank=max_rank, dtype=dtype, overwrite=overwrite)
        table = Table("check", "status", "detail", title=f"{folder} for {report.server} (max rank {report.max_rank})")
        for c in report.checks:
            table.add_row(c.name, c.status, c.detail)
        out_console.print(table)
        worst = sorted(report.errors.items(), key=lambda kv: -kv[1])[:5]
        out_console.print("largest relative errors of dW: "
                          + ", ".join(f"{name} {err:.2e}" for name, err in worst), soft_wrap=True)
        err_console.print(f"wrote {out} (rank {report.rank})")
    else:
        result = export_cast(folder, out, dtype, overwrite=overwrite)
        err_console.print(f"wrote {out} ({len(result.modules)} modules as {dtype})")


@user_errors
def serve(adapter: Annotated[list[str] | None, typer.Option(
              "--adapter", help="NAME=DIR[:DEFAULT] (a folder or Hub id), repeatable; DEFAULT is the strength a "
              "request gets when it does not set one (0 = off; auto = the scope saved beside DIR decides). A scope "
              "beside DIR is loaded with it, so requests may send \"auto\".")] = None,
          base: Base = "smollm2-135m", quantization: Quant = "nf4",
          host: Annotated[str, typer.Option("--host", help="Address to bind; anything but loopback needs --api-key.")] = "127.0.0.1",
          port: Annotated[int, typer.Option("--port")] = 8000,
          api_key: Annotated[str | None, typer.Option("--api-key", envvar="LORA_UNLEARN_API_KEY",
                                                      help="Require 'Authorization: Bearer KEY'.")] = None,
          max_tokens_limit: Annotated[int, typer.Option("--max-tokens-limit", help="Largest max_tokens a request may ask.")] = 256,
          max_prompt_chars: Annotated[int, typer.Option("--max-prompt-chars", help="Longest prompt, in characters.")] = 8000,
          max_batch: Annotated[int, typer.Option("--max-batch", help="Rows generated together.")] = 8,
          batch_window_ms: Annotated[float, typer.Option("--batch-window-ms", help="Wait for more requests this long.")] = 5.0,
          max_strength: Annotated[float, typer.Option("--max-strength", help="Largest |forget strength| a request or "
                                                      "default may set (the recipes select <= 3).")] = 8.0):
    """Serve OpenAI-style completions with per-request forget strengths ("forget": {"NAME": 1.0})."""
    from ..serving.app import LOOPBACK
    from ..serving.app import serve as run_server
    from ..serving.registry import parse_adapter_spec
    from ..serving.runtime import ForgetRuntime
    from ..serving.schemas import Limits

    if not 1 <= port <= 65535:
        raise UserError(f"--port must be in 1..65535, got {port}")
    if host not in LOOPBACK and not api_key:
        raise UserError(f"--host {host} exposes the server beyond this machine: set --api-key "
                        "(or LORA_UNLEARN_API_KEY), or bind 127.0.0.1")
    for flag, value in (("--max-tokens-limit", max_tokens_limit), ("--max-prompt-chars", max_prompt_chars),
                        ("--max-batch", max_batch)):
        if value < 1:
            raise UserError(f"{flag} must be a positive integer, got {value}")
    limits = Limits(max_tokens=max_tokens_limit, max_prompt_chars=max_prompt_chars, max_batch=max_batch,
                    batch_window_ms=batch_window_ms, max_strength=max_strength)
    limits.validate()
    specs = [parse_adapter_spec(s) for s in adapter or []]
    names = [name for name, _, _ in specs]
    if len(set(names)) != len(names):
        raise UserError(f"--adapter names must be unique, got {', '.join(names)}")
    _quiet_libraries()
    runtime = ForgetRuntime.from_base(base, quantization, max_strength=max_strength)
    err_console.print(f"serving {base} ({quantization}) with {', '.join(names) or 'no adapters'} on "
                      f"http://{host}:{port}{' (API key required)' if api_key else ''}", soft_wrap=True)
    run_server(runtime, host=host, port=port, api_key=api_key, limits=limits, adapters=specs, log_level="warning")
