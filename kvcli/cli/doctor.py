"""kvcli doctor: can kvcli be trusted with this model and this llama.cpp build?"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from kvcli.cli.options import BundleOpt, JsonOpt, ThreadsOpt

HELP = """Check kvcli's KV path on this machine's llama.cpp and a model (default: the embedded
one): (a) parse then write of a real sequence state gives the same bytes; (b) the base's own
cache, parsed, un-roped, re-roped and written back, gives logits identical to the bit (flash
attention off); (c) numpy RoPE matches llama.cpp's own position shift. With --bundle: the
checks run on its base, its files are checked whole (sha256) and fit for each other, and a
prefix auxiliary run as a view of the base (the base's own weights, its graph stopped after
layer k-1) must cache exactly what the base caches in those layers, and the bundle checks
its own quality (kvp against truncation at the same TTFT and the auxiliary alone, on
held-out prose, code and a conversation; stored in its manifest, as `convert_gguf.py bundle`
does): a warning there does not fail the doctor, a failed exactness check does.
Exits non-zero when a check fails."""


def command(
    model: Annotated[Optional[Path], typer.Option("--model", "-m", help="GGUF model to check.")] = None,
    bundle: BundleOpt = None,
    prompts: Annotated[int, typer.Option("--prompts", help="Prompts for the exactness check.")] = 20,
    threads: ThreadsOpt = 0,
    quality: Annotated[
        bool,
        typer.Option("--quality/--no-quality", help="With --bundle: end with the bundle's quality check."),
    ] = True,
    json_out: JsonOpt = False,
) -> None:
    from kvcli.engine.bundle import embedded_model_path, load_bundle
    from kvcli.errors import KvcliError
    from kvcli.eval.doctor import check_bundle, check_view, run_doctor
    from kvcli.llama.library import llama_cpp_version

    if model is not None and bundle is not None:
        raise KvcliError("give either --bundle or --model, not both")
    if prompts < 1:
        raise KvcliError("--prompts must be >= 1")
    path = load_bundle(bundle).base if bundle is not None else model or embedded_model_path()
    results = run_doctor(path, n_prompts=prompts, threads=threads)
    if bundle is not None:
        results.append(check_bundle(bundle))
        if results[-1].ok and (view := check_view(bundle)) is not None:
            results.append(view)
    ok = all(r.ok for r in results)
    self_check = None
    if bundle is not None and quality and ok:
        from kvcli.bundles.make import check_bundle_itself
        from kvcli.cli import ui
        from kvcli.cli.common import show_measured

        with ui.progress_reporter() as report:
            made = check_bundle_itself(load_bundle(bundle), progress=report)
        show_measured(made, echo=False)
        self_check = made.check
    if json_out:
        typer.echo(
            json.dumps(
                {
                    "model": str(path),
                    "llama_cpp_python": llama_cpp_version(),
                    "ok": ok,
                    "checks": [r.as_dict() for r in results],
                    "self_check": self_check,
                    # where kvp pays, measured with the self-check (kvcli.eval.break_even)
                    "break_even": made.break_even if self_check else None,
                }
            )
        )
    else:
        from kvcli.cli import ui

        rows = [[r.name, "[green]ok[/green]" if r.ok else "[red]FAIL[/red]", r.detail] for r in results]
        if self_check is not None:
            from kvcli.eval.self_check import summary_line

            rows.append(
                [
                    "bundle quality (self-check)",
                    "[yellow]warn[/yellow]" if self_check["warning"] else "[green]ok[/green]",
                    summary_line(self_check),
                ]
            )
        ui.out.print(
            ui.table(
                f"kvcli doctor: {path.name} (llama-cpp-python {llama_cpp_version()})",
                ["check", "result", "detail"],
                rows,
            )
        )
    if not ok:
        raise typer.Exit(1)
