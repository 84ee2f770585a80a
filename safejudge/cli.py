"""`safejudge` command line: thin commands over the library. Errors: one readable line, exit code 2."""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import typer

from safejudge.constitution import ConstitutionError, load_constitution, validation_summary
from safejudge.images import ImageLimits
from safejudge.shipped import CONSTITUTIONS

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Judge images against a safety constitution.")
constitution_app = typer.Typer(no_args_is_help=True, help="Validate, lint and author constitutions.")
build_app = typer.Typer(no_args_is_help=True, help="Offline builds: compiled constitutions, encoders, engines.")
app.add_typer(constitution_app, name="constitution")


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"safejudge {version('safejudge')}")
        raise typer.Exit()


@app.callback()
def main(
    show_version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="print the version")
) -> None:
    """Judge images against a safety constitution."""
app.add_typer(build_app, name="build")


def fail(message: str, code: int = 2) -> NoReturn:
    """Print one readable error line (several for multi-problem files) and exit."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@constitution_app.command("check")
def constitution_check(files: list[Path] = typer.Argument(..., help="constitution YAML files")) -> None:
    """Validate constitution files; exit 2 with file:line messages if any is invalid."""
    failed = False
    for path in files:
        try:
            constitution = load_constitution(path)
        except ConstitutionError as exc:
            typer.echo(str(exc), err=True)
            failed = True
            continue
        rules = constitution.rules
        chains = sum(len(rule.preconditions) for rule in rules)
        typer.echo(f"{path}: ok ({constitution.name} v{constitution.version}: {len(rules)} rules, {chains} precondition items)")
    if failed:
        raise typer.Exit(2)


@constitution_app.command("lint")
def constitution_lint(files: list[Path] = typer.Argument(..., help="constitution YAML files")) -> None:
    """Flag subjective or not-visible wording and overlong preconditions; exit 1 on findings, 2 on invalid files."""
    from safejudge.authoring import lint

    invalid = found = False
    for path in files:
        try:
            findings = lint(load_constitution(path))
        except ConstitutionError as exc:
            typer.echo(str(exc), err=True)
            invalid = True
            continue
        for finding in findings:
            typer.echo(finding.format(str(path)))
        found = found or bool(findings)
        typer.echo(f"{path}: {len(findings)} finding(s)" if findings else f"{path}: ok (no findings)")
    if invalid or found:
        raise typer.Exit(2 if invalid else 1)


LLM_OPTION = typer.Option(
    None, "--llm", envvar="SAFEJUDGE_LLM", help="openai:<base_url>:<model> or gguf:<path> (env SAFEJUDGE_LLM)"
)


@constitution_app.command("objectify")
def constitution_objectify(
    rule: str = typer.Option(..., "--rule", help="the rule text to make objective"),
    llm: str | None = LLM_OPTION,
    target: float = typer.Option(9, min=1, max=10, help="stop once the objectiveness rating reaches this"),
    max_rounds: int = typer.Option(4, min=0, help="most rewrites"),
) -> None:
    """Rate a rule's objectiveness 1-10, rewrite until it reaches the target; print YAML with the log.

    Exit 1 when the target was not reached within max-rounds.
    """
    import yaml

    from safejudge.authoring import objectify
    from safejudge.llm import LLMError, llm_from_spec

    try:
        result = objectify(rule, llm_from_spec(llm), target=target, max_rounds=max_rounds)
    except (LLMError, ValueError) as exc:  # ValueError: an empty rule or an unreadable LLM answer
        fail(str(exc))
    typer.echo(yaml.safe_dump(result.model_dump(mode="json"), sort_keys=False, allow_unicode=True, width=100))
    if not result.reached_target:
        raise typer.Exit(1)


@constitution_app.command("preconditions")
def constitution_preconditions(
    rule: str = typer.Option(..., "--rule", help="the objective rule text"),
    rule_id: str = typer.Option("new-rule", "--id", help="the rule id in the printed YAML"),
    category: str = typer.Option("general", "--category"),
    title: str | None = typer.Option(None, "--title"),
    llm: str | None = LLM_OPTION,
) -> None:
    """Extract a rule's precondition chain (AND of OR items, central objects); print it as constitution YAML."""
    from pydantic import ValidationError

    from safejudge.authoring import LLMAnswerError, draft_rule, rule_yaml
    from safejudge.llm import LLMError, llm_from_spec

    try:
        drafted = draft_rule(rule, llm_from_spec(llm), rule_id=rule_id, category=category, title=title)
    except ValidationError as exc:
        error = exc.errors()[0]
        fail(f"invalid rule: {error['loc'][0]}: {error['msg']}")
    except (LLMError, LLMAnswerError) as exc:
        fail(str(exc))
    typer.echo(rule_yaml(drafted), nl=False)


DEMO_SPEC = "demo:toy"


def _announce_demo_models(directory: Path) -> None:
    """The demo models know only the toy world: say so, and which constitutions they will refuse."""
    from safejudge.backends.onnx_demo import TOY_WARNING, inexpressible
    from safejudge.compiled import all_statements
    from safejudge.constitution import load_directory

    typer.echo(f"NOTE: serving the demo models: {TOY_WARNING}. For real images use --mllm hf:<model> (README).")
    try:
        constitutions = load_directory(directory)
    except ConstitutionError as exc:
        typer.echo(f"  {exc}")
        return
    for name, constitution in constitutions.items():
        problems = inexpressible(all_statements(constitution.enabled_rules))
        if problems:
            typer.echo(
                f"  constitution {name!r} is refused (INVALID_ARGUMENT): {len(problems)} preconditions use words "
                f"the demo vocabulary cannot express, e.g. {problems[0]}"
            )


def _optional_spec(value: str | None) -> str | None:
    return None if value is None or value.lower() == "none" else value


# The model flags of `serve`, shared with `judge --local` and `explain --local`.
MLLM_OPTION = typer.Option(
    DEMO_SPEC,
    help="MLLM: demo:toy (toy-world demo) | hf:<hub id or dir> | tiny:qwen2-vl | tiny:idefics3 | trtllm:<dir> (GPU)",
)
RELEVANCE_OPTION = typer.Option(
    "auto", help="relevance encoder: auto (matches --mllm) | onnx:<dir> | tiny:clip | demo:toy | none"
)
DETECTOR_OPTION = typer.Option(
    "auto", help="Strategy 2 detector: auto (matches --mllm) | owlv2:<hub id or dir> | tiny:owlv2 | demo:toy | none"
)
DTYPE_OPTION = typer.Option("float32", help="float32 | bfloat16")
CONSTITUTIONS_OPTION = typer.Option(CONSTITUTIONS, help="directory of constitution YAML files (default: the shipped ones)")


def _model_spec(mllm: str, relevance: str, detector: str, dtype: str):
    """The ModelSpec the model flags name, and one line per companion chosen for the user."""
    from pydantic import ValidationError

    from safejudge.backends.registry import ModelSpecError, coherent_spec

    try:
        return coherent_spec(mllm, _optional_spec(relevance), _optional_spec(detector), dtype=dtype)
    except ValidationError as exc:
        fail(_validation_message(exc))
    except ModelSpecError as exc:
        fail(str(exc))


def _load_models(mllm: str, relevance: str, detector: str, dtype: str):
    """The models the flags name, loaded in this process; says which were chosen."""
    from safejudge.backends.registry import ModelSpecError, load_models

    spec, notes = _model_spec(mllm, relevance, detector, dtype)
    typer.echo(f"models: mllm {mllm}")
    for note in notes:
        typer.echo(f"  {note}")
    try:
        return load_models(spec)
    except ModelSpecError as exc:
        fail(str(exc))


@app.command("serve")
def serve(
    grpc_port: int = typer.Option(8001, help="gRPC port (0: any free port)"),
    http_port: int = typer.Option(8000, help="HTTP port (0: any free port)"),
    metrics_port: int = typer.Option(8002, help="Prometheus metrics port (0: any free port)"),
    host: str = typer.Option("127.0.0.1", help="address to bind; 0.0.0.0 serves other machines"),
    http_host: str = typer.Option(None, help="address of the HTTP endpoint (no TLS; health probes) [default: --host]"),
    mllm: str = MLLM_OPTION,
    relevance: str = RELEVANCE_OPTION,
    detector: str = DETECTOR_OPTION,
    dtype: str = DTYPE_OPTION,
    constitutions: Path = CONSTITUTIONS_OPTION,
    judge_instances: int = typer.Option(
        None, help="safety_judge processes, each with its own copy of the models and cores / instances threads "
        "[default: cores / the model's threads: 1 for a real model]",
    ),
    max_batch: int = typer.Option(8, help="requests one instance judges side by side, their MLLM calls merged"),
    batch_delay_us: int = typer.Option(
        0, help="microseconds the batcher waits for more requests (requests queued meanwhile batch anyway)"
    ),
    max_queue: int = typer.Option(64, help="requests that may wait per stage; more are refused with UNAVAILABLE"),
    request_timeout: float = typer.Option(
        60.0, help="seconds a request may take when its client sets no deadline (then UNAVAILABLE)"
    ),
    frames: int = typer.Option(8, help="frames judged per animated image (first, last, evenly spaced)"),
    max_request_frames: int = typer.Option(32, help="most frames a request may ask for (OPTIONS frames)"),
    reasoning_calls: int = typer.Option(8, help="reasoning calls per image unless a request says otherwise"),
    max_request_reasoning_calls: int = typer.Option(64, help="most reasoning calls a request may ask for"),
    allow_lenient_options: bool = typer.Option(
        False, "--allow-lenient-options",
        help="let requests judge more leniently than the constitution (OPTIONS fail_closed/strategy2 false, a "
        "threshold moved in its lenient direction); by default a request may only make the judgement stricter",
    ),
    max_image_bytes: int = typer.Option(ImageLimits().max_bytes, help="largest encoded image accepted"),
    max_image_pixels: int = typer.Option(ImageLimits().max_pixels, help="most pixels per frame"),
    max_image_side: int = typer.Option(ImageLimits().max_side, help="longest side per frame, in pixels"),
    max_image_frames: int = typer.Option(ImageLimits().max_frames, help="most frames (pages) in one file"),
    max_image_decoded_pixels: int = typer.Option(
        ImageLimits().max_decoded_pixels,
        help="most pixels decoded to produce an image's sampled frames (GIF/APNG/WebP: every frame up to the last "
        "sampled one), checked before decoding",
    ),
    tls_cert: Path = typer.Option(None, help="serve gRPC over TLS with this PEM certificate (with --tls-key)"),
    tls_key: Path = typer.Option(None, help="the certificate's PEM private key"),
    tls_ca: Path = typer.Option(None, help="mutual TLS: clients need a certificate signed by this PEM CA"),
    auth_token_file: Path = typer.Option(
        None, help="inference requests must carry 'authorization: Bearer <token in this file>' (health stays open)"
    ),
    ready_timeout: float = typer.Option(300.0, help="seconds to wait for every model to load"),
    probe_interval: float = typer.Option(
        10.0, help="seconds between the supervisor's liveness probes of the judge stage (0: no probes)"
    ),
    probe_deadline: float = typer.Option(
        None, help="a probe unanswered this long, with no batch finished meanwhile, is missed; two in a row restart "
        "the stage [default: --request-timeout + 30]",
    ),
    tritonserver: str = typer.Option(
        "auto", help="auto (the container's /opt/tritonserver if present, else the nvidia-pytriton wheel's) | wheel | PATH"
    ),
) -> None:
    """Serve the `safety_judge` model on Triton (gRPC) until Ctrl-C or SIGTERM."""
    import signal

    from pydantic import ValidationError

    from safejudge.pipeline import RequestLimits
    from safejudge.server import ServerError, ServeSettings, find_triton

    models, notes = _model_spec(mllm, relevance, detector, dtype)
    try:
        settings = ServeSettings(
            models=models,
            constitutions=constitutions,
            host=host,
            http_host=http_host,
            grpc_port=grpc_port,
            http_port=http_port,
            metrics_port=metrics_port,
            judge_instances=judge_instances,
            max_batch=max_batch,
            batch_delay_us=batch_delay_us,
            max_queue=max_queue,
            limits=RequestLimits(
                image=ImageLimits(
                    max_bytes=max_image_bytes, max_pixels=max_image_pixels, max_side=max_image_side,
                    max_frames=max_image_frames, max_decoded_pixels=max_image_decoded_pixels,
                ),
                frames=frames,
                max_request_frames=max_request_frames,
                reasoning_calls=reasoning_calls,
                max_request_reasoning_calls=max_request_reasoning_calls,
                request_timeout_s=request_timeout,
                allow_lenient_options=allow_lenient_options,
            ),
            tls_cert=tls_cert,
            tls_key=tls_key,
            tls_ca=tls_ca,
            auth_token_file=auth_token_file,
            ready_timeout=ready_timeout,
            probe_interval_s=probe_interval,
            probe_deadline_s=probe_deadline,
            tritonserver=tritonserver,
        )
        server = settings.server()
    except ValidationError as exc:
        fail(_validation_message(exc))
    except ServerError as exc:
        fail(str(exc))

    def stop_on_sigterm(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop_on_sigterm)
    try:
        typer.echo(f"models: mllm {mllm}")
        for note in notes:
            typer.echo(f"  {note}")
        typer.echo(f"starting {find_triton(tritonserver).origin} (models load in the background; up to "
                   f"{ready_timeout:.0f} s) ...")
        server.start()
        server.supervisor.on_event = lambda message: typer.echo(f"supervisor: {message}", err=True)
        security = "TLS" + (" (mutual)" if tls_ca else "") if tls_cert else "no TLS"
        security += ", token required" if auth_token_file else ", no token"
        typer.echo(f"ready: gRPC {server.url} ({security})  HTTP {server.http_url}  metrics {server.metrics_url}")
        typer.echo("model: safety_judge (IMAGE, CONSTITUTION, OPTIONS -> VERDICT); Ctrl-C stops")
        typer.echo(f"server log: {server.log_path}  shared memory: /dev/shm/{server.shm_prefix}*")
        if mllm.startswith("demo:"):
            _announce_demo_models(constitutions)
        code = server.wait()
        fail(f"tritonserver exited with code {code}; last log lines:\n{server.log_tail()}", code=1)
    except ServerError as exc:
        fail(str(exc), code=1)
    except KeyboardInterrupt:
        typer.echo("stopping ...")
    finally:
        server.stop()
    typer.echo("stopped")


def _validation_message(exc) -> str:
    return validation_summary(exc, "settings")


@build_app.command("constitution")
def build_constitution(
    files: list[Path] = typer.Argument(..., help="constitution YAML files"),
    mllm: str = typer.Option("tiny:qwen2-vl", help="MLLM spec, e.g. hf:Qwen/Qwen2-VL-2B-Instruct"),
    relevance: str = typer.Option("tiny:clip", help="relevance encoder spec, or 'none'"),
    dtype: str = typer.Option("float32", help="float32 | bfloat16 (priors depend on it)"),
    cache_dir: Path = typer.Option(None, help="compiled-constitution cache [default: $SAFEJUDGE_CACHE/compiled]"),
) -> None:
    """Compile constitutions (priors M(None,c), rule embeddings) into the cache the server reads."""
    import time

    from pydantic import ValidationError

    from safejudge.backends.base import Models
    from safejudge.backends.registry import ModelSpec, load_mllm, load_relevance
    from safejudge.store import cache_path, compile_cached, default_cache_dir

    constitutions = []
    for path in files:
        try:
            constitutions.append((path, load_constitution(path)))
        except ConstitutionError as exc:
            fail(str(exc))
    try:
        spec = ModelSpec(mllm=mllm, relevance=None if relevance.lower() == "none" else relevance, dtype=dtype)
    except ValidationError as exc:
        fail("invalid model spec: " + "; ".join(f"--{e['loc'][0]}: {e['msg'].removeprefix('Value error, ')}" for e in exc.errors()))
    try:
        models = Models(mllm=load_mllm(spec), relevance=load_relevance(spec))  # no detector: not compiled
    except (ValueError, OSError) as exc:
        fail(f"cannot load models: {exc}")
    cache_dir = cache_dir or default_cache_dir()
    for path, constitution in constitutions:
        started = time.perf_counter()
        compiled, cached = compile_cached(constitution, models, cache_dir)
        how = "already cached" if cached else f"compiled in {time.perf_counter() - started:.1f} s"
        typer.echo(
            f"{path}: {constitution.name} v{constitution.version}, {len(compiled.priors)} statements, {how} -> "
            f"{cache_path(cache_dir, constitution, models)}"
        )


def _read_token(path: Path) -> str:
    """The token in --token-file, without the newline an editor or `echo` adds."""
    try:
        token = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"cannot read --token-file: {exc}")
    if not token:
        fail(f"--token-file {path} is empty")
    return token


DEFAULT_URL = "127.0.0.1:8001"
TIMEOUT_OPTION = typer.Option(120.0, help="seconds per image")
RETRIES_OPTION = typer.Option(None, min=0, help="extra attempts while the server is unavailable (default 6)")
TOKEN_FILE_OPTION = typer.Option(None, "--token-file", help="file holding the server's access token")
TLS_CA_OPTION = typer.Option(None, "--tls-ca", help="PEM root certificates of the server (any --tls-*: TLS)")
TLS_CERT_OPTION = typer.Option(None, "--tls-cert", help="PEM client certificate chain (mutual TLS, with --tls-key)")
TLS_KEY_OPTION = typer.Option(None, "--tls-key", help="PEM private key of --tls-cert")


def _client(
    url: str, timeout: float, retries: int | None, token_file: Path | None,
    tls_ca: Path | None, tls_cert: Path | None, tls_key: Path | None,
):
    """A JudgeClient from the client flags of `judge`, `explain` and `eval`, or one readable error."""
    from safejudge_client import JudgeClient

    try:
        return JudgeClient(url, timeout_s=timeout, **_client_arguments(retries, token_file, tls_ca, tls_cert, tls_key))
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))


def _client_arguments(
    retries: int | None, token_file: Path | None, tls_ca: Path | None, tls_cert: Path | None, tls_key: Path | None
) -> dict:
    """The keyword arguments of JudgeClient / AsyncJudgeClient that the client flags give (any --tls-*: TLS)."""
    tls = {"root_certificates": tls_ca, "certificate_chain": tls_cert, "private_key": tls_key}
    given = {name: str(path) for name, path in tls.items() if path is not None}
    if token_file is not None:
        given["token"] = _read_token(token_file)
    if retries is not None:  # else the client's default
        given["retries"] = retries
    return {**given, "ssl": bool(given.keys() & tls.keys())}


def _server_failure(url: str, exc: Exception) -> NoReturn:
    """Fail on what no other image could fix: the server is unreachable or refuses the credentials."""
    from safejudge_client import ServerUnavailable

    what = " unavailable" if isinstance(exc, ServerUnavailable) else ""
    fail(f"server at {url}{what}: {' '.join(str(exc).split())}")


REMOTE_ONLY = ("url", "retries", "token_file", "tls_ca", "tls_cert", "tls_key", "concurrency", "max_outage")
LOCAL_ONLY = ("mllm", "relevance", "detector", "dtype", "constitutions")


@app.command("judge")
def judge(
    ctx: typer.Context,
    images: list[str] = typer.Argument(
        ..., help="image files, folders (searched recursively), glob patterns, or - (paths on stdin, one a line)"
    ),
    constitution: str = typer.Option(
        ..., "--constitution", "-c", help="name of a constitution the server serves (with --local: in --constitutions)"
    ),
    url: str = typer.Option(DEFAULT_URL, help="the server's gRPC address (host:port)"),
    options: str = typer.Option(None, help='request options as JSON, e.g. \'{"evidence": "none"}\''),
    timeout: float = TIMEOUT_OPTION,
    out: Path = typer.Option(
        None, help="write one line per input: JSON Lines, or CSV if it ends in .csv; run again to resume"
    ),
    concurrency: int = typer.Option(4, min=1, help="requests in flight"),
    include: list[str] = typer.Option(
        [], "--include", help="also judge files with these extensions in folders (repeat or comma-separate: "
        "--include .jfif,.heic); files with other extensions are counted in the summary",
    ),
    max_outage: float = typer.Option(
        600.0, min=0, help="seconds to wait for a server that became unavailable (restart, rolling update), retrying "
        "with backoff, before the run stops (run it again to resume)",
    ),
    as_json: bool = typer.Option(False, "--json", help="print the lines judged as JSON Lines on stdout (as --out)"),
    retries: int = RETRIES_OPTION,
    token_file: Path = TOKEN_FILE_OPTION,
    tls_ca: Path = TLS_CA_OPTION,
    tls_cert: Path = TLS_CERT_OPTION,
    tls_key: Path = TLS_KEY_OPTION,
    local: bool = typer.Option(False, "--local", help="judge in this process (one image at a time), no server"),
    mllm: str = MLLM_OPTION,
    relevance: str = RELEVANCE_OPTION,
    detector: str = DETECTOR_OPTION,
    dtype: str = DTYPE_OPTION,
    constitutions: Path = CONSTITUTIONS_OPTION,
) -> None:
    """Judge images on a running server, or in process with --local.

    Exit 0: all safe, 1: any unsafe, 2: any input errored or bad arguments, 130: interrupted (Ctrl-C).
    """
    import json
    import sys

    from pydantic import ValidationError

    from safejudge import batch
    from safejudge.backends.registry import ModelSpecError

    # By name: typer ships its own copy of click, whose ParameterSource is not click's.
    misplaced = [
        name for name in (REMOTE_ONLY if local else LOCAL_ONLY) if ctx.get_parameter_source(name).name != "DEFAULT"
    ]
    if misplaced:
        flags = ", ".join(f"--{name.replace('_', '-')}" for name in misplaced)
        fail(f"{flags}: only without --local" if local else f"{flags}: only with --local")
    try:
        request_options = json.loads(options) if options is not None else None
    except json.JSONDecodeError as exc:
        fail(f"--options is not valid JSON: {exc}")
    if request_options is not None and not isinstance(request_options, dict):
        fail("--options must be a JSON object")
    try:
        extensions = batch.IMAGE_EXTENSIONS | batch.normalise_extensions(include)
        inputs = batch.expand_inputs(images, sys.stdin, extensions)
        if local:
            spec, notes = _model_spec(mllm, relevance, detector, dtype)
            for note in notes:
                typer.echo(note, err=True)
            if spec.mllm.startswith("demo:"):
                from safejudge.backends.onnx_demo import TOY_WARNING

                typer.echo(f"NOTE: {TOY_WARNING}.", err=True)
            judges = batch.in_process(spec, constitutions, constitution, request_options, timeout)
        else:
            judges = batch.on_server(
                url, constitution, request_options, concurrency, timeout_s=timeout,
                **_client_arguments(retries, token_file, tls_ca, tls_cert, tls_key),
            )
        summary = batch.run(inputs, judges, out, as_json, max_outage_s=max_outage)
    except ValidationError as exc:
        fail(_validation_message(exc))
    except (batch.BatchError, ModelSpecError) as exc:
        fail(str(exc))
    raise typer.Exit(summary.exit_code)


@app.command("status")
def status(
    url: str = typer.Option("127.0.0.1:8001", help="the server's gRPC address (host:port)"),
    metrics_url: str = typer.Option(None, help="its metrics endpoint [default: http://<host>:8002/metrics]"),
    token_file: Path = typer.Option(None, help="the token, when the server requires one"),
    tls_ca: Path = typer.Option(None, help="PEM CA that signed the server's certificate (TLS)"),
    as_json: bool = typer.Option(False, "--json", help="print the status as JSON"),
) -> None:
    """Health, models, constitutions (compile state, calibration) and limits of a running server.
    Exit 0 when it is ready, 1 when it is not."""
    from rich.console import Console
    from rich.table import Table

    from safejudge.status import server_status

    token = None if token_file is None else _read_token(token_file)
    tls = {"ssl": True, "root_certificates": str(tls_ca)} if tls_ca else {}
    metrics_url = metrics_url or f"http://{url.rsplit(':', 1)[0]}:8002/metrics"
    found = server_status(url, metrics_url, token, **tls)
    if as_json:
        typer.echo(found.model_dump_json(indent=1))
        raise typer.Exit(0 if found.ready else 1)
    console = Console(width=120)
    console.print(f"{url}: live {found.live}, ready {found.ready}")
    models = Table("model", "ready", "instances", "max batch", "max queue")
    for model in found.models:
        models.add_row(model.name, str(model.ready), str(model.instances), str(model.max_batch_size),
                       str(model.max_queue_size))
    console.print(models)
    if found.settings is not None:
        spec, limits = found.settings.models, found.settings.limits
        console.print(f"models: mllm {spec.mllm}, relevance {spec.relevance}, detector {spec.detector}, {spec.dtype}")
        console.print(
            f"limits: frames {limits.frames} (request max {limits.max_request_frames}), reasoning calls "
            f"{limits.reasoning_calls} (request max {limits.max_request_reasoning_calls}), request timeout "
            f"{limits.request_timeout_s:g} s, image {limits.image.max_bytes} bytes / {limits.image.max_pixels} "
            f"pixels / {limits.image.max_side} px side / {limits.image.max_frames} frames / "
            f"{limits.image.max_decoded_pixels} decoded pixels"
        )
        console.print("policy: requests may " + ("also loosen the judgement (--allow-lenient-options)"
                                                 if limits.allow_lenient_options else "only make the judgement stricter"))
    constitutions = Table("constitution", "version", "state", "calibrated")
    for constitution in found.constitutions:
        constitutions.add_row(constitution.name, constitution.version, constitution.state,
                              "yes" if constitution.calibrated else "no")
    console.print(constitutions if found.constitutions else "constitutions: none reported yet (first request compiles)")
    for problem in found.problems:
        console.print(f"[yellow]{problem}[/yellow]")
    raise typer.Exit(0 if found.ready else 1)


@app.command("explain")
def explain(
    image: Path = typer.Argument(..., help="image file"),
    constitution: str = typer.Option(
        ..., "--constitution", "-c", help="name of a constitution the server serves (--local: in --constitutions)"
    ),
    url: str = typer.Option(None, help=f"the server's gRPC address, host:port (default {DEFAULT_URL})"),
    local: bool = typer.Option(False, "--local", help="judge in process with the model flags below, no server"),
    html: Path = typer.Option(None, "--html", help="also write the explanation as one self-contained HTML page"),
    mllm: str = MLLM_OPTION,
    relevance: str = RELEVANCE_OPTION,
    detector: str = DETECTOR_OPTION,
    dtype: str = DTYPE_OPTION,
    constitutions: Path = CONSTITUTIONS_OPTION,
    timeout: float = TIMEOUT_OPTION,
    retries: int = RETRIES_OPTION,
    token_file: Path = TOKEN_FILE_OPTION,
    tls_ca: Path = TLS_CA_OPTION,
    tls_cert: Path = TLS_CERT_OPTION,
    tls_key: Path = TLS_KEY_OPTION,
) -> None:
    """One verdict made readable: every rule's relevance, every precondition's scores and deciding test, the
    Strategy 2 views and the reasoning. On a server (--url) or in process (--local, with the model flags of
    `serve`). Exit 0: safe, 1: unsafe, 2: errors."""
    from pydantic import ValidationError
    from rich.console import Console

    from safejudge.backends.base import UnsupportedQuestion
    from safejudge.backends.registry import ModelSpecError, coherent_spec
    from safejudge.explain import ExplainError, explain_local, explain_served, html_page, terminal_view
    from safejudge.images import ImageError
    from safejudge.store import UnknownConstitution
    from safejudge_client import AuthenticationError, JudgeError, ServerUnavailable

    if local and url is not None:
        fail("--url and --local exclude each other: judge on a server or in process")
    try:
        data = image.read_bytes()
    except OSError as exc:
        fail(f"cannot read {image}: {exc}")
    try:
        if local:
            spec, notes = coherent_spec(mllm, _optional_spec(relevance), _optional_spec(detector), dtype=dtype)
            for note in notes:
                typer.echo(f"models: {note}", err=True)
            if mllm.startswith("demo:"):
                from safejudge.backends.onnx_demo import TOY_WARNING

                typer.echo(f"NOTE: {TOY_WARNING}.", err=True)
            explained = explain_local(data, constitution, spec, constitutions)
        else:
            url = url or DEFAULT_URL
            with _client(url, timeout, retries, token_file, tls_ca, tls_cert, tls_key) as client:
                explained = explain_served(data, constitution, client)
    except ValidationError as exc:
        fail(_validation_message(exc))
    except (ServerUnavailable, AuthenticationError) as exc:
        _server_failure(url, exc)
    except (
        ModelSpecError, UnknownConstitution, ImageError, UnsupportedQuestion, ExplainError, JudgeError,
        FileNotFoundError,
    ) as exc:
        fail(" ".join(str(exc).split()))
    Console().print(terminal_view(explained.verdict))
    if html is not None:
        try:
            html.write_text(html_page(explained.verdict, explained.frames), encoding="utf-8")
        except OSError as exc:
            fail(f"cannot write --html {html}: {exc}")
        typer.echo(f"wrote {html}")
    raise typer.Exit(0 if explained.verdict.safe else 1)


TOY_CONSTITUTION_OPTION = typer.Option(None, "--constitution", help="a toy-world constitution (default: constitutions/toy-world.yaml)")


def _toy_setup(constitution_path: Path | None) -> tuple:
    """The toy constitution and the demo models, or one readable error."""
    from safejudge.backends.onnx_demo import load_demo_models

    constitution = _constitution(constitution_path)
    try:
        return constitution, load_demo_models()
    except FileNotFoundError as exc:
        fail(str(exc))


@app.command("demo")
def demo(
    scenes: int = typer.Option(8, min=1, max=500, help="how many generated scenes to judge"),
    seed: int = typer.Option(0, help="scene generator seed"),
    constitution_path: Path | None = TOY_CONSTITUTION_OPTION,
    served: bool = typer.Option(
        False, "--served", help="start a Triton server with the demo models and judge over gRPC (the real path)"
    ),
) -> None:
    """Generate toy-world scenes and judge them with the toy demo models (batched CLUE), in process or
    through a real Triton server."""
    from rich.console import Console

    from safejudge.backends.onnx_demo import TOY_WARNING
    from safejudge.evaluation import demo_scenes, demo_table
    from safejudge.toyworld import ToyVocabularyError

    constitution, models = _toy_setup(constitution_path)
    console = Console(width=160)
    console.print(f"Note: {TOY_WARNING}.")
    try:
        items = demo_scenes(constitution, scenes, seed)
        if served:
            verdicts, title = _judge_served(constitution, [item.scene.image for item in items], console)
        else:
            from safejudge.compiled import compile_constitution
            from safejudge.evaluators import judge_batched

            compiled = compile_constitution(constitution, models)
            verdicts = [judge_batched(item.scene.image, compiled, models) for item in items]
            title = f"toy-world demo ({models.mllm.model_id}, batched CLUE in process)"
    except ToyVocabularyError as exc:
        fail(str(exc))
    table, correct, total = demo_table(items, verdicts, title)
    console.print(table)
    console.print(f"{correct}/{total} verdicts name exactly the truly violated rules.")


def _judge_served(constitution, images: list, console) -> tuple[list, str]:
    """Serve the demo models on free ports with this constitution, judge every image over gRPC, stop."""
    import io
    import tempfile

    import yaml

    from safejudge.backends.registry import ModelSpec
    from safejudge.server import ServerError, ServeSettings
    from safejudge_client import JudgeClient

    with tempfile.TemporaryDirectory(prefix="safejudge-demo-") as directory:
        Path(directory, f"{constitution.name}.yaml").write_text(
            yaml.safe_dump(constitution.model_dump(mode="json"), sort_keys=False)
        )
        settings = ServeSettings(
            models=ModelSpec(mllm=DEMO_SPEC, relevance=DEMO_SPEC, detector=DEMO_SPEC),
            constitutions=Path(directory), grpc_port=0, http_port=0, metrics_port=0,
        )
        console.print("starting a Triton server with the demo models ...")
        try:
            with settings.server() as server, JudgeClient(server.url, timeout_s=120) as client:
                console.print(f"ready on {server.url}; judging {len(images)} scenes over gRPC")
                verdicts = []
                for image in images:
                    buffer = io.BytesIO()
                    image.save(buffer, format="PNG")
                    verdicts.append(client.judge(buffer.getvalue(), constitution.name))
        except ServerError as exc:
            fail(str(exc), code=1)
    return verdicts, f"toy-world demo (served by Triton at {server.url}, batched CLUE)"


CONSTITUTION_FILE_OPTION = typer.Option(
    None, "--constitution", help="constitution YAML file [default: constitutions/toy-world.yaml, for the toy bench]"
)
IMAGES_OPTION = typer.Option(
    None, help="folder of your labelled images (with --labels) [default: a generated toy bench]"
)
LABELS_OPTION = typer.Option(
    None, help="labels of --images: .jsonl or .csv, one record per image (README: Measuring your model)"
)


def _constitution(path: Path | None):
    from safejudge.evaluation import TOY_CONSTITUTION

    try:
        return load_constitution(path or TOY_CONSTITUTION)
    except ConstitutionError as exc:
        fail(str(exc))


def _bench(constitution, images: Path | None, labels: Path | None, per_rule: int, benign: int, seed: int) -> tuple:
    """The labelled images of --images/--labels, or a generated toy bench; and its name for the report."""
    from safejudge.evaluation import BenchError, make_bench, toy_bench_name
    from safejudge.labels import load_labelled
    from safejudge.toyworld import ToyVocabularyError

    if (images is None) != (labels is None):
        fail("--images and --labels go together")
    try:
        if images is None:
            return make_bench(constitution, per_rule, benign, seed), toy_bench_name(per_rule, benign, seed)
        return load_labelled(images, labels, constitution), f"{labels} (images in {images})"
    except (BenchError, ToyVocabularyError) as exc:
        fail(str(exc))


def _served_report(constitution, bench: list, bench_name: str, url: str, concurrency: int, client):
    """Full CLUE as the server at `url` judges the bench: the one row that needs no direct model access."""
    from safejudge.evaluation import BenchError, EvalReport, run_served
    from safejudge_client import JudgeError

    try:
        with client:
            run, model_id = run_served(bench, client, constitution.name, concurrency)
    except BenchError as exc:
        fail(" ".join(str(exc).split()))
    except (JudgeError, OSError, ValueError) as exc:
        fail(f"server at {url}: {' '.join(str(exc).split())}")
    note = (
        f"--url: only full CLUE is measured, as the server at {url} judges it (its models, its copy of constitution "
        f"{constitution.name!r}, its thresholds and limits; ms/img is wall time at concurrency {concurrency}). The "
        "baselines and ablations need direct model access: run without --url, with the model flags."
    )
    return EvalReport.measured(constitution, model_id or url, bench, bench_name, {"clue-served": run}, [note])


@app.command("eval")
def evaluate_command(
    constitution_path: Path | None = CONSTITUTION_FILE_OPTION,
    images: Path | None = IMAGES_OPTION,
    labels: Path | None = LABELS_OPTION,
    per_rule: int = typer.Option(50, min=1, help="toy bench: violating and (as many) borderline-safe scenes per rule"),
    benign: int = typer.Option(50, min=0, help="toy bench: benign scenes (over-sensitivity split)"),
    seed: int = typer.Option(1, help="toy bench generator seed (calibrate on another seed)"),
    mllm: str = MLLM_OPTION,
    relevance: str = RELEVANCE_OPTION,
    detector: str = DETECTOR_OPTION,
    dtype: str = DTYPE_OPTION,
    url: str | None = typer.Option(
        None, help="measure full CLUE on this running server (gRPC host:port) instead of models in this process"
    ),
    concurrency: int = typer.Option(4, min=1, help="with --url: requests in flight"),
    timeout: float = typer.Option(120.0, help="with --url: seconds per image"),
    token_file: Path = TOKEN_FILE_OPTION,
    tls_ca: Path = TLS_CA_OPTION,
    tls_cert: Path = TLS_CERT_OPTION,
    tls_key: Path = TLS_KEY_OPTION,
    calibration: Path | None = typer.Option(None, help="a `safejudge calibrate` file: adds the calibrated method"),
    json_out: Path | None = typer.Option(None, "--json", help="also write the report as JSON"),
) -> None:
    """Compare the paper's methods (Table-2-style report) on your labelled images (--images, --labels) or on
    a generated toy bench."""
    from rich.console import Console

    from safejudge.backends.onnx_demo import TOY_WARNING
    from safejudge.calibration import Calibration
    from safejudge.evaluation import BenchError, evaluate, methods, report_tables
    from safejudge.toyworld import ToyVocabularyError

    constitution = _constitution(constitution_path)
    bench, bench_name = _bench(constitution, images, labels, per_rule, benign, seed)
    if url is not None:
        if calibration is not None:
            fail("--calibration needs the models in this process; a server applies its own calibration files")
        client = _client(url, timeout, None, token_file, tls_ca, tls_cert, tls_key)
        report = _served_report(constitution, bench, bench_name, url, concurrency, client)
    else:
        models = _load_models(mllm, relevance, detector, dtype)
        fitted = None
        if calibration is not None:
            try:
                fitted = Calibration.load(calibration)
                fitted.check(constitution, models.mllm.model_id)
            except (OSError, ValueError) as exc:
                fail(f"{calibration}: {exc}")
        try:
            report = evaluate(constitution, models, bench, methods(fitted), bench_name)
        except (BenchError, ToyVocabularyError) as exc:
            fail(str(exc))
        if mllm.startswith("demo:"):
            report.notes.append(f"{TOY_WARNING}.")
    console = Console(width=200)
    for table in report_tables(report):
        console.print(table)
    for note in report.notes:
        console.print(f"Note: {note}")
    if json_out is not None:
        json_out.write_text(report.model_dump_json(indent=1))


@app.command("calibrate")
def calibrate_command(
    out: Path = typer.Option(
        ..., help="where to write the calibration JSON; <constitutions dir>/<name>.calibration.json is served"
    ),
    constitution_path: Path | None = CONSTITUTION_FILE_OPTION,
    images: Path | None = IMAGES_OPTION,
    labels: Path | None = LABELS_OPTION,
    per_rule: int = typer.Option(30, min=1, help="toy bench: dev split size per rule (violating and borderline each)"),
    benign: int = typer.Option(30, min=0, help="toy bench: benign scenes"),
    seed: int = typer.Option(2, help="toy bench: dev split seed; evaluate on a different one"),
    mllm: str = MLLM_OPTION,
    relevance: str = RELEVANCE_OPTION,
    detector: str = DETECTOR_OPTION,
    dtype: str = DTYPE_OPTION,
    plot: Path | None = typer.Option(None, help="precision-recall PNG of the threshold grid (needs matplotlib)"),
) -> None:
    """Fit CLUE thresholds for (model, constitution) on a labelled dev split: your images (--images, --labels)
    or a generated toy bench."""
    from safejudge.evaluation import BenchError, calibrate, plot_precision_recall
    from safejudge.toyworld import ToyVocabularyError

    constitution = _constitution(constitution_path)
    bench, bench_name = _bench(constitution, images, labels, per_rule, benign, seed)
    models = _load_models(mllm, relevance, detector, dtype)
    try:
        fitted, points = calibrate(constitution, models, bench, bench_name, seed if images is None else None)
    except (BenchError, ToyVocabularyError) as exc:
        fail(str(exc))
    out.write_text(fitted.model_dump_json(indent=1))
    typer.echo(f"{out}: thresholds {fitted.thresholds}: dev F1 {fitted.dev_f1:.3f} (defaults {fitted.default_f1:.3f}), "
               f"{fitted.dev_reasoning_calls_per_image:.2f} reasoning calls per image")
    if plot is not None:
        try:
            plot_precision_recall(points, fitted, plot)
        except RuntimeError as exc:
            fail(str(exc))
        typer.echo(f"{plot}: precision-recall of {len(points)} threshold settings")


@app.command("bench")
def bench_command(
    mllm: str = typer.Option("tiny:qwen2-vl", help="MLLM spec; tiny:qwen2-vl-2b-shape or -7b-shape for real-size cost"),
    dtype: str = typer.Option("float32", help="float32 | bfloat16"),
    constitution: Path = typer.Option(CONSTITUTIONS / "os-bench.yaml", help="constitution YAML"),
    constitution_rules: int = typer.Option(None, help="judge only the first N rules of the constitution"),
    images: int = typer.Option(6, help="distinct images for the engine and the server"),
    sequential_images: int = typer.Option(2, help="images for the sequential reference (slow)"),
    image_size: int = typer.Option(448, help="image side in pixels"),
    concurrency: str = typer.Option("1,2,4,8", help="served concurrency levels"),
    requests: int = typer.Option(32, help="requests per concurrency level"),
    rules: str = typer.Option("5,14,30,60", help="constitution sizes for the growth curve"),
    sizes: str = typer.Option("224,448,896", help="image sides for the growth curve"),
    served: bool = typer.Option(True, help="also measure the engine served through Triton"),
    judge_instances: int = typer.Option(None, help="safety_judge processes on the server [default: serve's]"),
    regimes: str = typer.Option(
        "worst,best,mixed", help="outcome plans for the loop-vs-engine comparison (safejudge/bench.py REGIMES)"
    ),
    seed: int = typer.Option(0, help="seed of the outcome plans"),
    schedules: str = typer.Option(
        "", help="engine schedules to run in each regime, e.g. all,waves (default: the engine's default only)"
    ),
    results: Path = typer.Option(Path("benchmarks/RESULTS.md"), help="Markdown file the report is appended to"),
    json_out: Path | None = typer.Option(None, "--json", help="also write the per-regime figures as JSON"),
) -> None:
    """The paper's loop vs the engine in process (in best, worst and mixed outcome regimes) vs the engine
    served, same model and images; fails if the paths disagree or a regime judges every image alike."""
    from pydantic import ValidationError

    from safejudge.backends.registry import ModelSpec
    from safejudge.bench import BenchInvalid, BenchSettings, run_bench

    def numbers(text: str, name: str) -> list[int]:
        try:
            return [int(part) for part in text.split(",") if part.strip()]
        except ValueError:
            fail(f"--{name} must be comma-separated integers, not {text!r}")

    try:
        settings = BenchSettings(
            models=ModelSpec(mllm=mllm, relevance=None, dtype=dtype),
            constitution=constitution,
            constitution_rules=constitution_rules,
            images=images,
            sequential_images=sequential_images,
            image_size=image_size,
            concurrency=numbers(concurrency, "concurrency"),
            requests_per_level=requests,
            rule_counts=numbers(rules, "rules"),
            image_sizes=numbers(sizes, "sizes"),
            served=served,
            judge_instances=judge_instances,
            regimes=[part.strip() for part in regimes.split(",") if part.strip()],
            seed=seed,
            schedules=[part.strip() for part in schedules.split(",") if part.strip()],
            results=results,
            plots=results.parent,
            json_out=json_out,
        )
        typer.echo(run_bench(settings, log=lambda line: typer.echo(line, err=True)))
    except (ValidationError, ConstitutionError) as exc:
        fail(str(exc))
    except BenchInvalid as exc:
        fail(f"benchmark invalid ({type(exc).__name__}): {exc}", code=1)


@app.command("perf-analyzer")
def perf_analyzer(
    url: str = typer.Option(None, help="a running server's gRPC host:port; default: start one"),
    mllm: str = typer.Option("tiny:qwen2-vl", help="MLLM spec of the started server"),
    relevance: str = typer.Option("tiny:clip", help="relevance encoder of the started server | none"),
    constitution: str = typer.Option("os-bench", help="name of the served constitution"),
    images: int = typer.Option(4, help="distinct images perf_analyzer cycles through"),
    image_size: int = typer.Option(224, help="image side in pixels"),
    concurrency_range: str = typer.Option("1:4", help="perf_analyzer --concurrency-range start[:end[:step]]"),
    measurement_interval: int = typer.Option(3000, help="milliseconds per measurement window"),
    stability_percentage: float = typer.Option(25.0, help="allowed variation between windows (shared machine)"),
    timeout: float = typer.Option(600.0, help="seconds the perf_analyzer run may take"),
    results: Path = typer.Option(Path("benchmarks/RESULTS.md"), help="Markdown file the report is appended to"),
    note: str = typer.Option(None, help="printed beside the numbers, e.g. 'shared machine, others training'"),
) -> None:
    """Triton's perf_analyzer 2.51 against `safety_judge` (installed by the set-up: scripts/setup.sh, or
    `python -m safejudge.perf install`)."""
    import signal

    from pydantic import ValidationError

    from safejudge.backends.registry import ModelSpec
    from safejudge.perf import PerfAnalyzerError, PerfSettings, run
    from safejudge.server import ServerError
    from safejudge_client import JudgeError

    try:
        settings = PerfSettings(
            url=url,
            models=ModelSpec(mllm=mllm, relevance=_optional_spec(relevance)),
            constitution=constitution,
            images=images,
            image_size=image_size,
            concurrency_range=concurrency_range,
            measurement_interval_ms=measurement_interval,
            stability_percentage=stability_percentage,
            timeout_s=timeout,
            results=results,
            note=note,
        )
    except ValidationError as exc:
        fail(str(exc))
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so a started server is stopped, not orphaned.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        typer.echo(run(settings, log=lambda line: typer.echo(line, err=True)))
    except (PerfAnalyzerError, ServerError, JudgeError) as exc:
        fail(str(exc), code=1)


if __name__ == "__main__":
    app()
