"""`onnxcomp compress | validate | inspect | presets`: exit 0 ok, 1 accuracy budget not met, 2 bad input."""
from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import click

from .errors import AccuracyBudgetError, InternalError, OnnxCompError


def _run(debug: bool, fn: Callable[[], Any]) -> None:
    """Turn onnxcomp errors into one clear line and an exit code; tracebacks only with --debug."""
    try:
        fn()
    except OnnxCompError as e:
        if debug:
            traceback.print_exc()
        hint = " (run with --debug for the traceback)" if isinstance(e, InternalError) and not debug else ""
        click.echo(f"error: {e}{hint}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except click.ClickException:  # a usage error found inside the command (bad --shape, -o = input): exit 2
        raise
    except Exception as e:  # an internal bug: say so plainly, keep the traceback for --debug
        if debug:
            traceback.print_exc()
        click.echo(f"internal error: {type(e).__name__}: {e} (run with --debug for the traceback)", err=True)
        sys.exit(3)


def _check_report_paths(paths: Sequence[str]) -> None:
    """Before any work: each --report names a format by its suffix."""
    for path in paths:
        if Path(path).suffix.lower() not in (".html", ".htm", ".json", ".md"):
            raise click.BadParameter(f"report must end in .html, .json or .md, got {path}", param_hint="--report")


def _write_report(report: Any, paths: Sequence[str]) -> None:
    """Write the report to each path, in the format its suffix names."""
    _check_report_paths(paths)
    for path in paths:
        _write_one(report, Path(path))


def _write_one(report: Any, p: Path) -> None:
    if p.suffix.lower() in (".html", ".htm"):
        report.to_html(p)
    elif p.suffix.lower() == ".json":
        from .ir import atomic_write

        atomic_write(p, report.to_json().encode())
    elif p.suffix.lower() == ".md":
        from .ir import atomic_write

        atomic_write(p, report.to_markdown().encode())
    click.echo(f"report written to {p}")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="onnxcomp")
def main() -> None:
    """Compress ONNX models (quantize, sparsify, factorize) and validate them in ONNX Runtime."""


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="where to write the model")
@click.option("--recipe", "recipe", default=None,
              help="recipe .yaml/.yml/.json (default: cleanup + dynamic int8)")
@click.option("--preset", default=None, help="a shipped preset instead of --recipe: fast, small, int8, "
              "int4-weights, lossless (`onnxcomp presets` lists them)")
@click.option("--objective", type=click.Choice(["latency", "size"]), default=None,
              help="what the auto search minimises (with --preset fast/small or a `preset: auto` recipe)")
@click.option("--budget", "budget", multiple=True, metavar="METRIC=VALUE",
              help="accuracy budget, e.g. cosine=0.99, rel_l2_err=0.05, max_abs_err=0.1 (repeatable)")
@click.option("--max-seconds", type=float, default=None, help="time budget of the auto search")
@click.option("--calibration", default=None, help=".npz file or directory of .npz feeds")
@click.option("--validation", default=None,
              help="feeds for validation (default: every 5th calibration sample, held back from calibration)")
@click.option("--shape", "shapes", multiple=True, metavar="INPUT=D1,D2,...",
              help="shape of a generated input when no data is given, e.g. input_ids=1,128 (repeatable; inputs "
              "sharing a symbolic dim follow)")
@click.option("--report", "report_path", multiple=True,
              help="also write the report (.html, .json or .md; repeat for several)")
@click.option("--provider", "providers", multiple=True, help="ORT execution provider(s) for validation")
@click.option("--no-validate", is_flag=True, help="skip running both models in ONNX Runtime")
@click.option("--explain", is_flag=True, help="print per-rule match/rejection statistics")
@click.option("--debug", is_flag=True, help="show tracebacks")
def compress(model: str, output: str, recipe: Optional[str], preset: Optional[str], objective: Optional[str],
             budget: tuple, max_seconds: Optional[float], calibration: Optional[str], validation: Optional[str],
             shapes: tuple, report_path: tuple, providers: tuple, no_validate: bool, explain: bool,
             debug: bool) -> None:
    """Compress MODEL with a recipe or preset and write the result to -o (the input file is never modified)."""

    def go() -> None:
        from .api import compress as _compress

        if Path(output).resolve() == Path(model).resolve():
            raise click.BadParameter("output must differ from the input model (the input is never overwritten)")
        _check_report_paths(report_path)
        chosen = _recipe_from_options(recipe, preset, objective, budget, max_seconds)
        try:
            result = _compress(model, chosen, calibration_data=calibration, validation_data=validation,
                               providers=list(providers) or None, progress=True, validate=not no_validate,
                               input_shapes=_parse_shapes(shapes))
        except AccuracyBudgetError as e:
            res = getattr(e, "result", None)
            if res is not None:
                click.echo(str(res.report))
                _write_report(res.report, report_path)
            raise
        result.save(output)
        click.echo(str(result.report))
        if explain:
            for p in result.report.passes:
                rw = p.details.get("rewrites")
                if rw:
                    click.echo(f"\n[{p.name}] rule statistics:")
                    for name, s in rw["rules"].items():
                        click.echo(f"  {name}: {s['applied']} applied of {s['tried']} candidates")
                        for reason, k in sorted(s["rejected"].items(), key=lambda kv: -kv[1])[:5]:
                            click.echo(f"      {k:6d} x {reason}")
        click.echo(f"wrote {output}")
        _write_report(result.report, report_path)

    _run(debug, go)


def _parse_shapes(items: tuple) -> Optional[dict[str, list[int]]]:
    """--shape input_ids=1,128 (repeatable) -> {"input_ids": [1, 128]}; a malformed one is a usage error."""
    out: dict[str, list[int]] = {}
    for item in items:
        name, sep, dims = item.partition("=")
        try:
            if not sep or not name:
                raise ValueError
            out[name] = [int(d) for d in dims.replace("x", ",").split(",") if d.strip()]
        except ValueError:
            raise click.BadParameter(f"{item!r}: expected INPUT=D1,D2,... (e.g. input_ids=1,128)",
                                     param_hint="--shape") from None
    return out or None


def _recipe_from_options(recipe: Optional[str], preset: Optional[str], objective: Optional[str], budget: tuple,
                         max_seconds: Optional[float]):
    """The recipe the options describe: --recipe or --preset, with --objective/--budget/--max-seconds applied."""
    import dataclasses

    from .errors import RecipeError
    from .recipe import Recipe, presets

    if recipe and preset:
        raise RecipeError("give --recipe or --preset, not both")
    if preset is not None and preset not in presets():
        raise RecipeError(f"--preset: unknown preset {preset!r}; valid: {', '.join(presets())}")
    rec = Recipe.parse(preset or recipe)
    if (objective or max_seconds) and rec.auto is None:
        raise RecipeError("--objective and --max-seconds apply to the auto search (--preset fast/small, or a "
                          "recipe with `preset: auto`)")
    if objective or max_seconds:
        auto = dataclasses.replace(rec.auto, **({"objective": objective} if objective else {}),
                                   **({"max_seconds": max_seconds} if max_seconds else {}))
        rec = dataclasses.replace(rec, auto=auto)
    if budget:
        bounds = {}
        for item in budget:
            key, sep, value = item.partition("=")
            try:
                bounds[key.strip()] = float(value)
            except ValueError:
                raise RecipeError(f"--budget {item!r}: expected METRIC=NUMBER, e.g. cosine=0.99") from None
        rec = Recipe.parse({**rec.to_dict(), "accuracy_budget": bounds})  # to_dict carries preset: auto too
    return rec


@main.group()
def data() -> None:
    """Make calibration/validation feeds from sentences or images, checked against the model."""


def _write_feeds(feeds: list, output: str) -> None:
    from .data import to_npz

    path = to_npz(feeds, output)
    shapes = {k: sorted({tuple(f[k].shape) for f in feeds}) for k in feeds[0]}
    desc = "; ".join(f"{k} {v[0] if len(v) == 1 else f'{len(v)} shapes, e.g. {v[0]}'}" for k, v in shapes.items())
    click.echo(f"wrote {len(feeds)} feed(s) to {path} ({desc})")


@data.command("texts")
@click.argument("texts_file", type=click.Path(dir_okay=False))
@click.option("--tokenizer", required=True, type=click.Path(dir_okay=False), help="Hugging Face tokenizer.json")
@click.option("--model", "model_path", default=None, type=click.Path(dir_okay=False),
              help="check the feeds against this model's inputs (names, dtypes, ranks)")
@click.option("-o", "--output", required=True, help="a .npz file (needs one shape: --pad-to), or a folder")
@click.option("--max-length", type=int, default=128, show_default=True, help="truncate to this many tokens")
@click.option("--pad-to", type=int, default=None, help="pad every sentence to this many tokens")
@click.option("--batch-size", type=int, default=1, show_default=True)
@click.option("--debug", is_flag=True, help="show tracebacks")
def data_texts(texts_file: str, tokenizer: str, model_path: Optional[str], output: str, max_length: int,
               pad_to: Optional[int], batch_size: int, debug: bool) -> None:
    """Tokenize TEXTS_FILE (one sentence per line) into feeds."""

    def go() -> None:
        from .data import from_texts

        feeds = from_texts(texts_file, tokenizer=tokenizer, model=model_path, max_length=max_length,
                           batch_size=batch_size, pad_to=pad_to)
        _write_feeds(feeds, output)

    _run(debug, go)


@data.command("images")
@click.argument("images", type=click.Path())
@click.option("--model", "model_path", default=None, type=click.Path(dir_okay=False),
              help="take the size/channels from this model's input and check the feeds against it")
@click.option("-o", "--output", required=True, help="a .npz file, or a folder (one .npz per feed)")
@click.option("--size", type=int, nargs=2, default=None, help="height width (default: the model input's)")
@click.option("--mean", type=float, multiple=True, help="per-channel mean after scaling (repeat per channel)")
@click.option("--std", type=float, multiple=True, help="per-channel std after scaling (repeat per channel)")
@click.option("--scale", type=float, default=1 / 255, show_default=True, help="pixel values are multiplied by it")
@click.option("--layout", type=click.Choice(["NCHW", "NHWC"]), default="NCHW", show_default=True)
@click.option("--input", "input_name", default=None, help="the model input the images feed")
@click.option("--batch-size", type=int, default=1, show_default=True)
@click.option("--debug", is_flag=True, help="show tracebacks")
def data_images(images: str, model_path: Optional[str], output: str, size, mean: tuple, std: tuple, scale: float,
                layout: str, input_name: Optional[str], batch_size: int, debug: bool) -> None:
    """Decode the image files under IMAGES (a folder or one file) into feeds."""

    def go() -> None:
        from .data import from_images

        feeds = from_images(images, model=model_path, size=tuple(size) if size else None,
                            mean=list(mean) or 0.0, std=list(std) or 1.0, scale=scale, layout=layout,
                            input=input_name, batch_size=batch_size)
        _write_feeds(feeds, output)

    _run(debug, go)


@main.command()
def presets() -> None:
    """List the shipped presets (use one with `compress --preset NAME`)."""
    from .recipe import presets as _presets

    for name, line in _presets().items():
        click.echo(f"{name:<14} {line}")


@main.command()
@click.argument("reference", type=click.Path(dir_okay=False))
@click.argument("candidate", type=click.Path(dir_okay=False))
@click.option("--inputs", default=None, help=".npz file or directory of .npz feeds (default: generated)")
@click.option("--provider", "providers", multiple=True, help="ORT execution provider(s)")
@click.option("--shape", "shapes", multiple=True, metavar="INPUT=D1,D2,...",
              help="shape of a generated input when no data is given, e.g. input_ids=1,128 (repeatable; inputs "
              "sharing a symbolic dim follow)")
@click.option("--no-latency", is_flag=True, help="skip the latency measurement")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@click.option("--debug", is_flag=True, help="show tracebacks")
def validate(reference: str, candidate: str, inputs: Optional[str], providers: tuple, shapes: tuple,
             no_latency: bool, as_json: bool, debug: bool) -> None:
    """Compare CANDIDATE with REFERENCE in ONNX Runtime: error per output, latency and size ratios."""

    def go() -> None:
        from .api import validate as _validate

        rep = _validate(reference, candidate, inputs=inputs, providers=list(providers) or None,
                        latency=not no_latency, input_shapes=_parse_shapes(shapes))
        click.echo(json.dumps(rep.to_dict(), indent=2) if as_json else str(rep))

    _run(debug, go)


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@click.option("--debug", is_flag=True, help="show tracebacks")
def inspect(model: str, as_json: bool, debug: bool) -> None:
    """Print MODEL's ops, parameters and bytes by op type, opsets, inputs/outputs, and what cleanup would do."""

    def go() -> None:
        from . import ir
        from .passes import Cleanup
        from .pipeline import Pipeline
        from .summary import format_summary, summarize

        proto = ir.load_proto(model)
        ir.check_proto(proto, full=False, what=model)
        s = summarize(proto)
        _, recs = Pipeline().run(proto, [Cleanup()])
        could: dict = {r.name: {"nodes_removed": r.nodes_before - r.nodes_after, "ops_removed": r.ops_removed,
                                "bytes_saved": r.bytes_before - r.bytes_after} for r in recs}
        could["sparsify_channel"] = _channel_candidates(proto)
        could["lowrank"] = _lowrank_candidates(proto)
        could["palettize"] = _palettize_candidates(proto)
        if as_json:
            click.echo(json.dumps({**s, "passes": could}, indent=2))
            return
        click.echo(format_summary(s))
        click.echo("\nwhat passes could do:")
        c = could.pop("cleanup")
        click.echo(f"  cleanup: remove {c['nodes_removed']} nodes {c['ops_removed'] or ''}, "
                   f"save {c['bytes_saved']:,} bytes (outputs unchanged)")
        ch = could["sparsify_channel"]
        click.echo(f"  sparsify (pattern channel): {len(ch['groups'])} prunable channel group(s) with "
                   f"{sum(g['channels'] for g in ch['groups'])} channels, {ch['attention_blocks']} attention "
                   f"block(s) for head pruning; {len(ch['not_prunable'])} layer(s) not prunable")
        for r in ch["not_prunable"][:5]:
            click.echo(f"      {r['layer']}: {r['reason']}")
        from .auto import candidates, model_facts

        tried = [c.name for c in candidates(model_facts(proto), "latency", has_data=True)]
        click.echo(f"  auto (--preset fast, with calibration data) starts from: {', '.join(tried)}; then raises "
                   "or lowers the channel-pruning level and composes what met the budget with the best int8")
        lr = could["lowrank"]
        click.echo(f"  lowrank: {len(lr)} MatMul/Gemm/Conv layer(s) large enough to factorize "
                   f"({sum(r['params'] for r in lr):,} weights); a rank saves weights below k*n/(k+n):")
        for r in lr[:5]:
            click.echo(f"      {r['layer']}: [{r['k']} x {r['n']}], break-even rank {r['break_even_rank']}")
        pal = could["palettize"]
        total = sum(r["bytes"] for r in pal["weights"])
        click.echo(f"  palettize: {len(pal['weights'])} weight(s) of {total:,} bytes "
                   f"({sum(r['op'] == 'Gather' for r in pal['weights'])} embedding table(s)) can share 2**bits "
                   f"values each: about {total * 5 // 32:,} bytes at 5 bits, {total * 9 // 64:,} at 4 (with a "
                   "float16 scale per 32 weights); decoded when "
                   "the session is created, so the model runs as fast as before (calibration data: "
                   "activation-weighted codebooks and bits per weight by sensitivity)")

    _run(debug, go)


def _palettize_candidates(proto) -> dict:
    """Weights palettize (default options) would share, and the candidates it would leave in float."""
    from . import ir
    from .passes.palettize import candidates

    found, left = candidates(ir.Model.from_proto(proto))
    return {"weights": found, "left_float": [{"node": n, "reason": r} for n, r in sorted(left.items())
                                             if not r.startswith("no match")][:50]}


def _channel_candidates(proto) -> dict:
    """Structured-pruning groups sparsify(pattern: channel) would find, without changing anything."""
    from . import ir
    from .algorithms.channels import find_groups

    model = ir.Model.from_proto(proto)
    groups, refused = find_groups(model, heads=True)
    return {"groups": [{"producer": g.producer.name, "consumers": [c.name for c in g.consumers],
                        "channels": g.channels, **({"joined": [e.name for e in g.extra]} if g.extra else {})}
                       for g in groups if g.attention is None],
            "attention_blocks": sum(g.attention is not None for g in groups),
            "not_prunable": refused}


def _lowrank_candidates(proto) -> list:
    """Layers the lowrank pass would consider (default min_weight_elements), with their break-even rank."""
    from . import ir
    from .algorithms.select import find_weight_layers
    from .passes.lowrank import Lowrank

    model = ir.Model.from_proto(proto)
    rows = []
    for layer in find_weight_layers(model, ops=("MatMul", "Gemm", "Conv"),
                                    min_elements=Lowrank().min_weight_elements):
        k, n = layer.matrix().shape
        rows.append({"layer": layer.name, "op": layer.op, "k": int(k), "n": int(n), "params": int(k * n),
                     "break_even_rank": int(k * n // (k + n))})
    return rows


if __name__ == "__main__":
    main()
