"""The ``tunebench`` command line: Typer + Rich. Progress and messages go to stderr, ``--json`` to stdout."""

from __future__ import annotations

import json
import logging
import math
import sys
from importlib import resources
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..config import DEFAULT_STORE, StudyConfig
from ..config.metrics import headline_metrics
from ..runner import load_study
from ..errors import TunebenchError
from ..progress import StudyReporter

app = typer.Typer(help="Prompt engineering or fine-tuning? Run the adaptation ladder on your own data.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
err = Console(stderr=True)
out = Console()
if not out.is_terminal:  # piped or captured: do not squeeze tables into 80 columns
    out = Console(width=140)
if not err.is_terminal:
    err = Console(stderr=True, width=140)

EXIT_OK, EXIT_TRIALS_FAILED, EXIT_USER_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130

StoreOpt = typer.Option(None, "--store", help=f"Results directory (default: the study's 'store', else ./{DEFAULT_STORE}).")
JsonOpt = typer.Option(False, "--json", help="Print one JSON document to stdout and nothing else.")
VerboseOpt = typer.Option(False, "--verbose", "-v", help="Log what the library does (to stderr).")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=err, show_path=False, show_time=False)], force=True)
    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    for noisy in ("httpx", "urllib3", "filelock", "peft"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    logging.getLogger("tunebench.data").setLevel(logging.ERROR)  # the CLI prints data warnings itself


class RichReporter(StudyReporter):
    """Draws an overall trials bar and a bar for the current epoch or evaluation."""

    def __init__(self, console: Console):
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=console, transient=False)
        self.console = console
        self.trials_task = None
        self.step_task = None
        self.current = ""

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def trial_started(self, index, total, label):
        if self.trials_task is None:
            self.trials_task = self.progress.add_task("trials", total=total)
        self.current = label
        self.progress.update(self.trials_task, completed=index - 1, description=f"trial {index}/{total}")

    def trial_finished(self, row):
        m, c = row["metrics"], row["cost"]
        shown = ", ".join(f"{k.replace('_', '-')} {m[k]:.3f}" for k in headline_metrics(m))
        if m.get("format_failure_rate"):
            shown += f", format failures {m['format_failure_rate']:.1%}"
        self.progress.console.print(
            f"[green]✓[/] {row['label']} seed={row['seed']} n={row['train_size']}: {shown}, {c['adapt_seconds']:.1f}s")
        self.progress.advance(self.trials_task)

    def trial_failed(self, label, error):
        self.progress.console.print(f"[red]✗[/] {label}: {type(error).__name__}: {error}")
        self.progress.advance(self.trials_task)

    def start(self, label, total):
        text = f"  {self.current}: {label}"
        if self.step_task is None:
            self.step_task = self.progress.add_task(text, total=total)
        else:
            self.progress.reset(self.step_task, total=total, description=text)

    def advance(self, n=1):
        if self.step_task is not None:
            self.progress.advance(self.step_task, n)


def _fail(exc: TunebenchError) -> None:
    err.print(f"[bold red]error:[/] {exc}", highlight=False)
    raise typer.Exit(exc.exit_code)


def _fmt_params(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def print_leaderboard(name: str, rows: list[dict], metric: str, console: Console) -> None:
    from ..analysis.leaderboard import leaderboard

    board = leaderboard(rows, metric)
    table = Table(title=f"{name}: {metric} on test (mean ± std over seeds)", title_justify="left")
    table.add_column("strategy", overflow="fold", min_width=12, max_width=40)
    table.add_column("family", no_wrap=True)
    second = board[0]["secondary"] if board else "macro_f1"
    cv = next((e for e in board if "cv_mean" in e), None)
    cv_cols = [f"cv {cv['cv_metric']} ({cv['cv_k']}-fold)"] if cv else []
    for col in ("train n", "seeds", metric, second, *cv_cols, "train s", "p50 ms", "tokens/req", "trainable"):
        table.add_column(col, justify="right", no_wrap=True)
    for e in board:
        q = f"{e['quality_mean']:.3f} ± {e['quality_std']:.3f}" if len(e["seeds"]) > 1 else f"{e['quality_mean']:.3f}"
        f1 = f"{e['secondary_mean']:.3f}"
        tokens = e.get("tokens_per_request")
        cv_cell = [f"{e['cv_mean']:.3f} ± {e['cv_std']:.3f}" if "cv_mean" in e else "-"] if cv else []
        table.add_row(e["label"], e["family"], str(e["train_size"] or "-"), str(len(e["seeds"])), q, f1, *cv_cell,
                      f"{e['train_seconds']:.1f}", f"{e['latency_ms_p50']:.1f}",
                      "-" if tokens is None or tokens != tokens else f"{tokens:.0f}", _fmt_params(e["trainable_params"]))
    console.print(table)


def _run_study(cfg: StudyConfig, base: Path, source: str, store: Optional[Path], as_json: bool,
               with_report: bool = False) -> None:
    from ..store.results import Store
    from ..runner.study import Study, trial_json

    study_store = Store(store if store is not None else cfg.store_path(base))
    with RichReporter(err) as reporter:
        study = Study(cfg, base_dir=base, store=study_store, reporter=reporter, source=source)
        for w in study.data.warnings:
            reporter.console.print(f"[yellow]warning:[/] {w}", highlight=False)
        try:
            rows = study.run()
        except KeyboardInterrupt:
            reporter.progress.stop()
            err.print("[yellow]interrupted[/]: finished trials are saved; run the same command again to resume.")
            raise typer.Exit(EXIT_INTERRUPTED) from None
    report = None
    if with_report and rows:
        from ..analysis.evidence import analyze
        from ..analysis.recommend import Constraints

        report = _write_report(analyze(study_store, cfg.name), Constraints(), None, study_store.root)
    if as_json:
        data = {"checks": study.data.checks, "warnings": study.data.warnings, "labels": study.data.label_names}
        doc = {"study": cfg.name, "store": str(study_store.root), "data": data,
               "trials": [trial_json(r) for r in rows]}
        if report is not None:
            doc["report"] = {k: str(v) for k, v in report["paths"].items()}
            doc["recommendation"] = report["recommendation"]
        sys.stdout.write(json.dumps(doc, default=_json_default) + "\n")
    else:
        from ..analysis.leaderboard import default_metric

        print_leaderboard(cfg.name, rows, default_metric(rows), out)
        out.print(f"Results: {study_store.db_path} (artifacts in {study_store.root / 'artifacts'}); "
                  f"`tunebench show {cfg.name}` shows them again.")
        if report is not None:
            rec = report["recommendation"]
            out.print(f"[bold]{rec['verdict']}[/]: {rec['summary']}", highlight=False)
            out.print(f"Report: {report['paths']['html']}", highlight=False)
    if study.failures:
        err.print(f"[red]{len(study.failures)} trial(s) failed[/]; see the messages above. Rerun to retry them.")
        raise typer.Exit(EXIT_TRIALS_FAILED)


def _json_default(o):
    if isinstance(o, float) and math.isnan(o):
        return None
    return str(o)


@app.command()
def run(study: Path = typer.Argument(..., help="Study YAML."), store: Optional[Path] = StoreOpt,
        as_json: bool = JsonOpt, verbose: bool = VerboseOpt) -> None:
    """Run every pending trial of a study (finished trials are skipped: a rerun resumes)."""
    _setup_logging(verbose)
    try:
        cfg, base = load_study(study)
        _run_study(cfg, base, str(study), store, as_json)
    except TunebenchError as exc:
        _fail(exc)


def demo_study_path() -> Path:
    return Path(str(resources.files("tunebench") / "examples" / "demo.yaml"))


@app.command()
def demo(store: Optional[Path] = StoreOpt, as_json: bool = JsonOpt, verbose: bool = VerboseOpt) -> None:
    """Run the bundled demo: customer-support intents, every strategy, the embedded default model, offline; ends by
    writing the HTML report and printing its path."""
    _setup_logging(verbose)
    try:
        cfg, base = load_study(demo_study_path())
        if not as_json:
            err.print(f"[bold]tunebench demo[/]: {len(cfg.strategies)} strategies on 400 customer-support messages "
                      f"(8 intents) with all-MiniLM-L6-v2, on CPU. Study file: {demo_study_path()}")
        _run_study(cfg, base, str(demo_study_path()), store, as_json, with_report=True)
    except TunebenchError as exc:
        _fail(exc)


def _resolve_study_name(study: str, store: Optional[Path]) -> tuple[str, Path]:
    path = Path(study)
    if path.suffix in (".yaml", ".yml"):
        cfg, base = load_study(path)
        return cfg.name, store or cfg.store_path(base)
    return study, store or Path(DEFAULT_STORE)


METRICS = ("accuracy", "macro_f1", "exact_match", "token_f1", "rouge_l", "bleu", "chrf")


def print_trial_ids(rows: list[dict], metric: str, console: Console) -> None:
    table = Table(title=f"trials ({metric} on test)", title_justify="left")
    for col in ("id", "strategy", "seed", "train n", metric):
        table.add_column(col, overflow="fold", justify="right" if col in ("seed", "train n", metric) else "left")
    for r in sorted(rows, key=lambda r: (r["label"], r["train_size"], r["seed"])):
        value = r["metrics"].get(metric)
        table.add_row(r["key"][:8], r["label"], str(r["seed"]), str(r["train_size"] or "-"),
                      "-" if value is None else f"{value:.3f}")
    console.print(table)


def print_prompts(rows: list[dict], console: Console) -> None:
    """Each prompting trial's exact template and one rendered example (the first test input)."""
    seen = set()
    shown = 0
    for r in rows:
        info = r["record"].get("prompt")
        if not info or r["label"] in seen:
            continue
        seen.add(r["label"])
        shown += 1
        if "label_template" in info:  # an encoder prompt search: what it embeds and how it compares
            how = f"soft nearest neighbour, tau {info.get('tau')}" if info.get("scorer") == "kernel" else "prototypes"
            console.rule(f"[bold]{r['label']}[/] (encoder prompt search: demonstrations {info.get('demos')} "
                         f"({info.get('demonstrations')}) as {how}, label-prompt weight {info.get('weight')}, "
                         f"centred: {'yes' if info.get('calibrate') else 'no'})")
            console.print("[bold]label prompt[/]", highlight=False)
            console.print(info["label_template"], markup=False, highlight=False)
            continue
        console.rule(f"[bold]{r['label']}[/] ({info.get('mode')}, demonstrations: {info.get('demonstrations')}, "
                     f"chat template: {'yes' if info.get('chat_template') else 'no'})")
        if info.get("instruction"):
            console.print("[bold]instruction[/]", highlight=False)
            console.print(info["instruction"], markup=False, highlight=False)
        console.print("[bold]template[/]", highlight=False)
        console.print(info["template"], markup=False, highlight=False)
        if "example" in info:
            console.print("[bold]rendered (first test example)[/]", highlight=False)
            console.print(info["example"], markup=False, highlight=False)
    if not shown:
        console.print("no trial of this study used a prompt (prompts are stored for causal-model trials)")


@app.command()
def show(study: str = typer.Argument(..., help="Study name or study YAML."), store: Optional[Path] = StoreOpt,
         metric: Optional[str] = typer.Option(None, help=f"One of {', '.join(METRICS)} (default: accuracy, or "
                                              "exact_match for generation)."),
         prompts: bool = typer.Option(False, "--prompts", help="Print each trial's template and a rendered example."),
         ids: bool = typer.Option(False, "--ids", help="List every trial with its id (for serve and export)."),
         as_json: bool = JsonOpt) -> None:
    """Leaderboard of a study: quality mean ± std over seeds, train time, latency, tokens, trainable parameters."""
    _setup_logging(False)
    from ..analysis.leaderboard import default_metric, leaderboard
    from ..store.results import Store
    from ..runner.study import trial_json

    try:
        if metric is not None and metric not in METRICS:
            raise TunebenchError(f"--metric: '{metric}' is not one of {', '.join(METRICS)}")
        name, root = _resolve_study_name(study, store)
        st = Store(root, create=False)
        rows = st.trials(name, st.current_keys(name))
    except TunebenchError as exc:
        _fail(exc)
    metric = metric or default_metric(rows)
    if rows and metric not in rows[0]["metrics"]:
        _fail(TunebenchError(f"--metric: this study's trials have no '{metric}' "
                             f"(they have {', '.join(k for k in METRICS if k in rows[0]['metrics'])})"))
    if prompts and not as_json:
        print_prompts(rows, out)
        return
    if ids and not as_json:
        print_trial_ids(rows, metric, out)
        return
    if as_json:
        sys.stdout.write(json.dumps({"study": name, "leaderboard": leaderboard(rows, metric),
                                     "trials": [trial_json(r) for r in rows]}, default=_json_default) + "\n")
        return
    if not rows:
        err.print(f"study '{name}' has no finished trial yet")
        return
    print_leaderboard(name, rows, metric, out)


VolumeOpt = typer.Option(None, "--volume", help="Expected requests per day, e.g. 50000/day or 50k (default: the "
                         "study's costs.volume_per_day).")
HorizonOpt = typer.Option(None, "--horizon", help="Days the cost is counted over, e.g. 90d or 12w (default: the "
                          "study's costs.horizon_days).")
LatencyOpt = typer.Option(None, "--latency-p95", help="Most p95 latency per request, e.g. 100ms.")
MinQualityOpt = typer.Option(None, "--min-accuracy", "--min-quality",
                             help="Least acceptable value of the study's metric (accuracy, or exact match), e.g. 0.9.")
BudgetOpt = typer.Option(None, "--budget", help="Most total cost over the horizon (training + serving), e.g. 200.")
ChangesOpt = typer.Option(False, "--changes-often", help="The task changes often: tuned models are retrained "
                          "once a month over the horizon, prompts are edited.")
TrainRateOpt = typer.Option(None, "--train-per-hour", help="Override costs.train_per_hour (training hardware, per hour).")
ServeRateOpt = typer.Option(None, "--serve-per-hour", help="Override costs.serve_per_hour (serving hardware, per hour).")
ConcurrencyOpt = typer.Option(None, "--concurrency", help="Override costs.concurrency (requests served at once).")
ApiPriceOpt = typer.Option(None, "--api-price", help="MODEL=IN/OUT: price a model by tokens, per 1M input/output "
                           "tokens (repeatable), e.g. gpt-4o-mini=0.15/0.60.")


def _evidence_and_constraints(study: str, store: Optional[Path], metric: Optional[str], volume, horizon, latency,
                              min_quality, budget, changes_often, train_rate, serve_rate, concurrency, api_price):
    """Open the store, analyse the study with the (overridden) cost table, parse the constraints."""
    from ..analysis.evidence import analyze
    from ..config import ApiPrice, CostConfig
    from ..analysis.recommend import Constraints, parse_amount
    from ..store.results import Store

    if metric is not None and metric not in METRICS:
        raise TunebenchError(f"--metric: '{metric}' is not one of {', '.join(METRICS)}")

    def amount(flag: str, text: Optional[str], unit: str, example: str) -> Optional[float]:
        if text is None:
            return None
        try:
            return parse_amount(text, unit)
        except ValueError:
            raise TunebenchError(f"{flag}: cannot read '{text}'; write it like {example}") from None

    name, root = _resolve_study_name(study, store)
    st = Store(root, create=False)
    cfg = st.study_config(name)["config"]
    costs = CostConfig(**(cfg.get("costs") or {}))
    update: dict = {}
    if train_rate is not None:
        update["train_per_hour"] = train_rate
    if serve_rate is not None:
        update["serve_per_hour"] = serve_rate
    if concurrency is not None:
        update["concurrency"] = concurrency
    if api_price:
        api = dict(costs.api)
        for item in api_price:
            try:
                model, prices = item.split("=", 1)
                inp, _, outp = prices.partition("/")
                api[model.strip()] = ApiPrice(input_per_1m=float(inp), output_per_1m=float(outp or 0))
            except (ValueError, TypeError):
                raise TunebenchError(f"--api-price: cannot read '{item}'; write MODEL=IN/OUT, e.g. "
                                     "gpt-4o-mini=0.15/0.60 (per 1M tokens)") from None
        unknown = sorted(set(api) - set(costs.api))
        update["api"] = api
    try:
        costs = CostConfig(**{**costs.model_dump(), **update})
    except Exception as exc:  # pydantic: a negative rate, a zero concurrency
        raise TunebenchError(f"cost flags: {exc}") from None
    constraints = Constraints(
        volume_per_day=amount("--volume", volume, "volume", "50000/day or 50k"),
        horizon_days=amount("--horizon", horizon, "days", "90d"),
        latency_p95_ms=amount("--latency-p95", latency, "ms", "100ms"),
        min_quality=amount("--min-accuracy", min_quality, "money", "0.9"),
        budget=amount("--budget", budget, "money", "200"), changes_often=changes_often)
    if constraints.horizon_days == 0:
        raise TunebenchError("--horizon: give a positive number of days, e.g. 90d")
    evidence = analyze(st, name, metric=metric, costs=costs)
    if api_price:
        names = sorted({g.model for g in evidence.groups})
        unknown = [u for u in unknown if u not in names]
        if unknown:
            raise TunebenchError(f"--api-price: no model named {', '.join(repr(u) for u in unknown)} in study "
                                 f"'{name}' (its models: {', '.join(names)})")
    return evidence, constraints, st


def _write_report(evidence, constraints, out_dir: Optional[Path], store_root: Path) -> dict:
    from .. import report
    from ..analysis.recommend import recommend as make_recommendation

    rec = make_recommendation(evidence, constraints)
    target = out_dir or store_root / "reports" / evidence.study
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TimeElapsedColumn(), console=err,
                  transient=True) as progress:
        progress.add_task("writing the report (statistics, plots)", total=None)
        paths = report.write(evidence, rec, target)
    return {"recommendation": rec, "paths": paths}


@app.command("report")
def report_cmd(study: str = typer.Argument(..., help="Study name or study YAML."), store: Optional[Path] = StoreOpt,
               out_dir: Optional[Path] = typer.Option(None, "--out", help="Directory for report.html, report.md and "
                                                      "report.json (default: STORE/reports/STUDY)."),
               metric: Optional[str] = typer.Option(None, help="Metric to judge by (default: accuracy, or exact_match)."),
               volume: Optional[str] = VolumeOpt, horizon: Optional[str] = HorizonOpt,
               latency: Optional[str] = LatencyOpt, min_quality: Optional[str] = MinQualityOpt,
               budget: Optional[str] = BudgetOpt, changes_often: bool = ChangesOpt,
               train_rate: Optional[float] = TrainRateOpt, serve_rate: Optional[float] = ServeRateOpt,
               concurrency: Optional[int] = ConcurrencyOpt, api_price: Optional[list[str]] = ApiPriceOpt,
               as_json: bool = JsonOpt) -> None:
    """Write the study's report from the store (no trial is rerun): HTML (self-contained), Markdown and JSON."""
    _setup_logging(False)
    try:
        ev, constraints, st = _evidence_and_constraints(study, store, metric, volume, horizon, latency, min_quality,
                                                        budget, changes_often, train_rate, serve_rate, concurrency,
                                                        api_price)
        result = _write_report(ev, constraints, out_dir, st.root)
    except TunebenchError as exc:
        _fail(exc)
    paths = result["paths"]
    if as_json:
        sys.stdout.write(json.dumps({"study": ev.study, **{k: str(v) for k, v in paths.items()},
                                     "verdict": result["recommendation"]["verdict"],
                                     "recommended": result["recommendation"].get("recommended")}) + "\n")
        return
    rec = result["recommendation"]
    out.print(f"[bold]{rec['verdict']}[/]: {rec['summary']}", highlight=False)
    out.print(f"Report: {paths['html']} (also {paths['md'].name} and {paths['json'].name})", highlight=False)


@app.command("recommend")
def recommend_cmd(study: str = typer.Argument(..., help="Study name or study YAML."), store: Optional[Path] = StoreOpt,
                  metric: Optional[str] = typer.Option(None, help="Metric to judge by (default: accuracy, or "
                                                       "exact_match)."),
                  volume: Optional[str] = VolumeOpt, horizon: Optional[str] = HorizonOpt,
                  latency: Optional[str] = LatencyOpt, min_quality: Optional[str] = MinQualityOpt,
                  budget: Optional[str] = BudgetOpt, changes_often: bool = ChangesOpt,
                  train_rate: Optional[float] = TrainRateOpt, serve_rate: Optional[float] = ServeRateOpt,
                  concurrency: Optional[int] = ConcurrencyOpt, api_price: Optional[list[str]] = ApiPriceOpt,
                  as_json: bool = JsonOpt) -> None:
    """Which approach to ship under your constraints, ranked, with reasons; says 'tie' or 'not enough evidence'
    when that is the truth."""
    _setup_logging(False)
    from ..analysis.recommend import recommend as make_recommendation

    try:
        ev, constraints, _ = _evidence_and_constraints(study, store, metric, volume, horizon, latency, min_quality,
                                                       budget, changes_often, train_rate, serve_rate, concurrency,
                                                       api_price)
        rec = make_recommendation(ev, constraints)
    except TunebenchError as exc:
        _fail(exc)
    if as_json:
        sys.stdout.write(json.dumps(rec, default=_json_default) + "\n")
        return
    colour = {"recommend": "green", "tie": "yellow", "not enough evidence": "yellow"}.get(rec["verdict"], "red")
    out.print(f"[bold {colour}]{rec['verdict'].upper()}[/]" + (f": [bold]{rec['recommended']}[/]"
                                                               if rec.get("recommended") else ""))
    out.print(rec["summary"], highlight=False)
    for r in rec["ranking"]:
        mark = "[green]✓[/]" if r["feasible"] else "[red]✗[/]"
        out.print(f"\n{r['rank']}. {mark} [bold]{r['label']}[/] ({r['family'].replace('_', ' ')})", highlight=False)
        for line in r["problems"]:
            out.print(f"   [red]- {line}[/]", highlight=False)
        for line in r["doubts"]:
            out.print(f"   [yellow]- {line}[/]", highlight=False)
        for line in r["reasons"]:
            out.print(f"   - {line}", highlight=False)


@app.command()
def serve(study: Optional[str] = typer.Argument(None, help="Study name or study YAML (omit with --model)."),
          trial: Optional[str] = typer.Option(None, "--trial", help="Trial id (or its first 6+ characters; "
                                              "`tunebench show --ids` lists them)."),
          best: bool = typer.Option(False, "--best", help="Serve the top trial of the study's leaderboard."),
          model_path: Optional[str] = typer.Option(None, "--model", help="Serve a plain causal LM (local directory) "
                                                   "instead of a trial: completions and prompt log-probabilities."),
          raw: bool = typer.Option(False, "--raw", help="Serve a causal trial's tuned LM as a plain model (no prompt)."),
          name: Optional[str] = typer.Option(None, "--name", help="Model id for --model (default: the directory name)."),
          host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
          port: int = typer.Option(8000, "--port", help="Port to listen on."),
          api_key_file: Optional[Path] = typer.Option(None, "--api-key-file", help="File of accepted API keys, one "
                                                      "per line (also: $TUNEBENCH_API_KEY, comma-separated)."),
          no_auth: bool = typer.Option(False, "--no-auth", help="No API key (allowed on a loopback address only)."),
          max_batch: int = typer.Option(32, "--max-batch", min=1, help="Most inputs run together in a micro-batch."),
          window_ms: float = typer.Option(5.0, "--batch-window-ms", min=0, help="How long the first request of a "
                                          "batch waits for others (ms)."),
          max_body: int = typer.Option(1 << 20, "--max-body-bytes", min=1024, help="Largest request body."),
          max_input_tokens: int = typer.Option(4096, "--max-input-tokens", min=1, help="Most tokens per input."),
          max_tokens: int = typer.Option(1024, "--max-tokens-limit", min=1, help="Largest max_tokens a request may "
                                         "ask for."),
          max_inputs: int = typer.Option(64, "--max-inputs", min=1, help="Most inputs (prompts) in one request."),
          threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads for the model (default: "
                                                "PyTorch's, one per core); leave cores free for whatever shares the "
                                                "machine."),
          store: Optional[Path] = StoreOpt, verbose: bool = VerboseOpt) -> None:
    """Serve a trial (or a causal LM) with the OpenAI API: /v1/models, /v1/chat/completions, /v1/completions
    (streaming too), /v1/classify and /health, micro-batched, behind bearer API keys."""
    _setup_logging(verbose)
    import uvicorn

    from ..serve import Limits, api_keys, create_app, lm_engine, trial_engine

    try:
        if (model_path is None) == (study is None):
            raise TunebenchError("give a STUDY with --trial ID or --best, or --model PATH (not both)")
        if study is not None and (trial is None) == (not best):
            raise TunebenchError("say which trial: --trial ID or --best (one of them)")
        keys = api_keys(api_key_file, no_auth=no_auth, host=host)
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TimeElapsedColumn(), console=err,
                      transient=True) as progress:
            progress.add_task("loading the model", total=None)
            if model_path is not None:
                engine = lm_engine(model_path, name)
            else:
                name_, root = _resolve_study_name(study, store)
                engine = trial_engine(root, name_, trial, best=best, raw=raw)
    except TunebenchError as exc:
        _fail(exc)
    limits = Limits(max_body_bytes=max_body, max_input_tokens=max_input_tokens, max_tokens=max_tokens,
                    max_batch_inputs=max_inputs)
    app_ = create_app(engine, api_keys=keys, limits=limits, max_batch=max_batch, window_ms=window_ms, threads=threads)
    info = engine.describe()
    what = f"{info.get('label', '')} ({info.get('strategy', '')})" if engine.kind == "trial" else info["base_model"]
    shown = f"[{host}]" if ":" in host else host
    err.print(f"Serving [bold]{engine.id}[/]: {what}", highlight=False)
    err.print(f"  http://{shown}:{port}/v1  (chat/completions, completions, classify, models; /health)", highlight=False)
    err.print("  auth: " + ("[yellow]off (loopback only)[/]" if keys is None else f"{len(keys)} API key(s)"),
              highlight=False)
    uvicorn.run(app_, host=host, port=port, log_level="info" if verbose else "warning",
                timeout_graceful_shutdown=30)


@app.command()
def validate(study: Path = typer.Argument(..., help="Study YAML."), as_json: bool = JsonOpt) -> None:
    """Check a study's config and data without training anything."""
    _setup_logging(False)
    from ..runner.study import Study

    from ..store.results import Store

    try:
        cfg, base = load_study(study)
        try:  # with a store at hand, prompt: references are checked against its registry
            study_store = Store(cfg.store_path(base), create=False)
        except TunebenchError:
            study_store = _NoStore()
        st = Study(cfg, base_dir=base, store=study_store)
        trials = st.plan()
        data = st.data
    except TunebenchError as exc:
        _fail(exc)
    summary = {"study": cfg.name, "valid": True, "labels": data.label_names, "unchecked_prompts": st.unchecked_prompts,
               "splits": {s.name: len(s) for s in (data.train, data.dev, data.test)},
               "checks": data.checks, "warnings": data.warnings, "trials": len(trials),
               "strategies": sorted({t.strategy for t in trials})}
    if as_json:
        sys.stdout.write(json.dumps(summary) + "\n")
        return
    for w in data.warnings:
        err.print(f"[yellow]warning:[/] {w}", highlight=False)
    for ref in st.unchecked_prompts:
        err.print(f"[yellow]warning:[/] {ref}: not checked (no results store at {cfg.store_path(base)} yet)",
                  highlight=False)
    out.print(f"[green]✓[/] {study}: valid. {len(data.label_names)} labels; train {len(data.train)}, "
              f"dev {len(data.dev)}, test {len(data.test)}; {len(trials)} trials "
              f"({', '.join(summary['strategies'])}).", highlight=False)


class _NoStore:
    """Stand-in store for ``validate``: planning needs none."""


@app.command("ls")
def list_studies(store: Optional[Path] = StoreOpt, as_json: bool = JsonOpt) -> None:
    """List the studies in a results store."""
    _setup_logging(False)
    from ..store.results import Store

    try:
        st = Store(store or Path(DEFAULT_STORE), create=False)
    except TunebenchError as exc:
        _fail(exc)
    studies = st.studies()
    if as_json:
        sys.stdout.write(json.dumps({"store": str(st.root), "studies": studies}) + "\n")
        return
    table = Table(title=f"studies in {st.root}", title_justify="left")
    for col in ("study", "finished trials", "source"):
        table.add_column(col)
    for s in studies:
        table.add_row(s["name"], str(s["trials"]), s["source"] or "")
    out.print(table)


@app.command()
def strategies() -> None:
    """List the registered strategies and their parameters."""
    import dataclasses

    from ..strategies import registry

    for name, cls in registry.all().items():
        out.print(f"[bold]{name}[/] ({cls.family}): {(cls.config_cls.__doc__ or '').strip()}")
        defaults = cls.config_cls()
        for f in dataclasses.fields(cls.config_cls):
            out.print(f"    {f.name} = {getattr(defaults, f.name)!r}  {f.metadata.get('help', '')}", highlight=False)


@app.command("export")
def export_cmd(study: str = typer.Argument(..., help="Study name or study YAML."),
               trial: Optional[str] = typer.Option(None, "--trial", help="Trial id (or its first 6+ characters; "
                                                   "`tunebench show --ids` lists them)."),
               best: bool = typer.Option(False, "--best", help="Export the top trial of the study's leaderboard."),
               fmt: str = typer.Option(..., "--format", help="hf: the adapter alone (PEFT) or head / prompt; merged: "
                                       "weights merged into the base model (plain transformers); onnx: encoder "
                                       "classifiers as ONNX fp32 + int8."),
               out_dir: Optional[Path] = typer.Option(None, "--out", help="Output directory (default: "
                                                      "exports/STUDY-ID-FORMAT); must not exist or be empty."),
               force: bool = typer.Option(False, "--force", help="Replace an earlier tunebench export in --out."),
               per_channel: bool = typer.Option(True, "--per-channel/--per-tensor", help="onnx: int8 weight "
                                                "scales per output channel (more accurate) or one per tensor."),
               store: Optional[Path] = StoreOpt, as_json: bool = JsonOpt, verbose: bool = VerboseOpt) -> None:
    """Export a trial: its adapter (PEFT), its weights merged into the base model, or ONNX with int8 quantization;
    each export carries a model card (README.md) with the trial's task, metrics and config."""
    _setup_logging(verbose)
    from ..analysis.selection import find_trial, load_trial
    from ..export import FORMATS, check_format, check_out_dir, default_out_dir, export_trial
    from ..store.results import Store

    try:
        if fmt not in FORMATS:
            raise TunebenchError(f"--format: '{fmt}' is not one of {', '.join(FORMATS)}")
        if (trial is None) == (not best):
            raise TunebenchError("say which trial: --trial ID or --best (one of them)")
        name, root = _resolve_study_name(study, store)
        st = Store(root, create=False)
        row = find_trial(st, name, trial, best=best)
        try:  # check the format before the (slow) model load; load_trial reports a config that no longer fits
            models = {m.name: m for m in StudyConfig.model_validate(st.study_config(name)["config"]).all_models()}
            model = models.get(row["record"].get("model")) or next(iter(models.values()))
        except Exception:
            model = None
        if model is not None:
            check_format(row["strategy"], row.get("params"), model.backend, fmt, f"trial {row['key'][:8]}")
        target = out_dir or default_out_dir(name, row["key"], fmt)
        check_out_dir(target, force)
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TimeElapsedColumn(), console=err,
                      transient=True) as progress:
            task = progress.add_task(f"loading trial {row['key'][:8]} ({row['label']})", total=None)
            loaded = load_trial(root, name, row["key"])
            result = export_trial(loaded, target, fmt, force=force, per_channel=per_channel,
                                  status=lambda msg: progress.update(task, description=msg))
    except TunebenchError as exc:
        _fail(exc)

    def size(n: int) -> str:
        for unit, div in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
            if n >= div:
                return f"{n / div:.1f} {unit}"
        return f"{n} B"

    total = sum(f["bytes"] for f in result.files)
    if as_json:
        sys.stdout.write(json.dumps({"study": name, "trial": row["key"], "label": row["label"], "format": fmt,
                                     "path": str(result.path), "files": result.files, "bytes": total}) + "\n")
        return
    out.print(f"[green]✓[/] exported trial [bold]{row['key'][:8]}[/] ({row['label']}) of study '{name}' as "
              f"[bold]{fmt}[/] to {result.path}", highlight=False)
    table = Table(show_header=True, title_justify="left")
    table.add_column("file", overflow="fold")
    table.add_column("size", justify="right", no_wrap=True)
    for f in result.files:
        table.add_row(f["path"], size(f["bytes"]))
    table.add_row("[bold]total[/]", f"[bold]{size(total)}[/]")
    out.print(table)
    out.print(f"Model card: {result.path / 'README.md'} (how to load and predict)", highlight=False)


prompts_app = typer.Typer(help="The prompt registry: every template trials used, versioned by content, with the "
                          "trials and scores of each version.", no_args_is_help=True)
app.add_typer(prompts_app, name="prompts")
RegistryStoreOpt = typer.Option(None, "--store", help=f"Results directory (default: ./{DEFAULT_STORE}).")


def _registry(store: Optional[Path], create: bool = False):
    """The store's registry, with trials stored before the registry existed linked to their templates."""
    from ..store.prompts import PromptRegistry, backfill
    from ..store.results import Store

    st = Store(store or Path(DEFAULT_STORE), create=create)
    backfill(st)
    return PromptRegistry(st)


def _when(ts: float) -> str:
    from datetime import datetime

    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M")


def _score(use: dict) -> str:
    return "-" if use["score"] is None else f"{use['score']:.3f} {use['metric']}"


def _uses_table(uses: list[dict], title: str | None = None) -> Table:
    table = Table(title=title, title_justify="left")
    for col in ("study", "trial", "strategy", "seed", "train n", "test", "dev"):
        table.add_column(col, overflow="fold", justify="right" if col in ("seed", "train n") else "left")
    for u in uses:
        dev = ", ".join(f"{k[4:]} {v:.3f}" for k, v in u["dev"].items() if isinstance(v, (int, float))) or "-"
        table.add_row(u["study"], u["key"][:8], u["label"], str(u["seed"]), str(u["train_size"] or "-"), _score(u),
                      dev)
    return table


@prompts_app.command("list")
def prompts_list(store: Optional[Path] = RegistryStoreOpt, as_json: bool = JsonOpt) -> None:
    """Every registered name: latest version, number of versions, kinds, trials that used it, best test score."""
    _setup_logging(False)
    try:
        reg = _registry(store)
        rows = reg.summary()
    except TunebenchError as exc:
        _fail(exc)
    if as_json:
        sys.stdout.write(json.dumps({"store": str(reg.store.root), "prompts": rows}, default=_json_default) + "\n")
        return
    if not rows:
        out.print(f"no prompts registered in {reg.store.root} yet: trials register the templates they use, "
                  "`tunebench prompts import FILE` adds one", highlight=False)
        return
    table = Table(title=f"prompts in {reg.store.root}", title_justify="left")
    for col in ("name", "latest", "versions", "kinds", "trials", "best (test)"):
        table.add_column(col, overflow="fold", justify="right" if col in ("latest", "versions", "trials") else "left")
    for r in rows:
        best = r["best"]
        shown = "-" if best is None else f"{_score(best)} (@{best['version']}, {best['label']})"
        table.add_row(r["name"], str(r["latest"]), str(r["versions"]), ", ".join(r["kinds"]), str(r["trials"]), shown)
    out.print(table)


@prompts_app.command("show")
def prompts_show(ref: str = typer.Argument(..., help="NAME, NAME@VERSION, NAME@latest or NAME@#HASH."),
                 store: Optional[Path] = RegistryStoreOpt, as_json: bool = JsonOpt) -> None:
    """One version: its exact template text, hash, date, source and the trials that used it."""
    _setup_logging(False)
    try:
        reg = _registry(store)
        pv = reg.get(ref)
        uses = reg.uses(pv.name, pv.version)
    except TunebenchError as exc:
        _fail(exc)
    if as_json:
        sys.stdout.write(json.dumps({**pv.to_dict(), "trials": uses}, default=_json_default) + "\n")
        return
    out.rule(f"[bold]{pv.ref}[/] #{pv.short} ({pv.kind})")
    out.print(f"created {_when(pv.created)}; source: {pv.source or '-'}; sha256 {pv.hash}", highlight=False)
    out.print(pv.template, markup=False, highlight=False)
    out.rule()
    if uses:
        out.print(_uses_table(uses, f"trials that used {pv.ref}"))
    else:
        out.print(f"no stored trial used {pv.ref}", highlight=False)


@prompts_app.command("diff")
def prompts_diff(a: str = typer.Argument(..., help="A reference, e.g. support-intent@1."),
                 b: str = typer.Argument(..., help="Another, e.g. support-intent@2 or other@3 (a bare number is a "
                                         "version of A's name)."),
                 context: int = typer.Option(3, "--context", "-U", min=0, help="Unchanged lines shown around changes."),
                 store: Optional[Path] = RegistryStoreOpt) -> None:
    """Unified diff of two versions' template text."""
    import difflib

    from rich.text import Text

    _setup_logging(False)
    try:
        reg = _registry(store)
        first = reg.get(a)
        second = reg.get(f"{first.name}@{b}" if b.isdigit() else b)
    except TunebenchError as exc:
        _fail(exc)
    if first.hash == second.hash:
        out.print(f"{first.ref} and {second.ref} are identical (#{first.short})", highlight=False)
        return
    lines = list(difflib.unified_diff(first.template.splitlines(), second.template.splitlines(),
                                      f"{first.ref} #{first.short}", f"{second.ref} #{second.short}", n=context,
                                      lineterm=""))
    if not lines:
        out.print(f"{first.ref} and {second.ref} differ only in line endings or a final newline", highlight=False)
        return
    styles = {"+++": "bold", "---": "bold", "@@": "cyan", "+": "green", "-": "red"}
    for line in lines:
        style = next((v for k, v in styles.items() if line.startswith(k)), "")
        out.print(Text(line, style=style), soft_wrap=True)


@prompts_app.command("log")
def prompts_log(name: str = typer.Argument(..., help="A registered name."), store: Optional[Path] = RegistryStoreOpt,
                as_json: bool = JsonOpt) -> None:
    """History of a name, newest first: each version's hash, date and source, with the trials that used it, their
    test score and, where they selected on dev, their dev score."""
    _setup_logging(False)
    try:
        reg = _registry(store)
        reg.get(name.partition("@")[0])  # an unknown name fails with the known ones
        versions = reg.versions(name.partition("@")[0])
        uses = reg.uses(versions[0].name)
    except TunebenchError as exc:
        _fail(exc)
    by_version: dict[int, list[dict]] = {}
    for u in uses:
        by_version.setdefault(u["version"], []).append(u)
    if as_json:
        doc = {"name": versions[0].name, "versions": [{**v.to_dict(), "trials": by_version.get(v.version, [])}
                                                      for v in reversed(versions)]}
        sys.stdout.write(json.dumps(doc, default=_json_default) + "\n")
        return
    for v in reversed(versions):
        out.print(f"[bold yellow]{v.ref}[/] #{v.short}  {_when(v.created)}  {v.kind}  {v.source or ''}",
                  highlight=False)
        if v.version in by_version:
            out.print(_uses_table(by_version[v.version]))
        else:
            out.print("  no stored trial used this version")


@prompts_app.command("export")
def prompts_export(ref: Optional[str] = typer.Argument(None, help="NAME or NAME@VERSION (default version: latest)."),
                   out_dir: Path = typer.Option(Path("."), "--out", help="Directory to write into (a name with / "
                                                "becomes folders)."),
                   all_: bool = typer.Option(False, "--all", help="Export the latest version of every name."),
                   force: bool = typer.Option(False, "--force", help="Replace existing files with different content."),
                   store: Optional[Path] = RegistryStoreOpt) -> None:
    """Write NAME@V.jinja (the exact template text) and NAME@V.yaml (name, version, hash, kind, source) for review
    in version control; `tunebench prompts import` reads them back."""
    import yaml

    _setup_logging(False)
    try:
        if (ref is None) == (not all_):
            raise TunebenchError("say what to export: NAME[@VERSION] or --all (one of them)")
        reg = _registry(store)
        chosen = [reg.get(n) for n in reg.names()] if all_ else [reg.get(ref)]
        if not chosen:
            out.print("no prompts are registered in this store yet (trials register the templates they use)")
            return
        files = []
        for pv in chosen:
            base = out_dir / f"{pv.ref}.jinja"
            meta = {"name": pv.name, "version": pv.version, "hash": pv.hash, "kind": pv.kind, "source": pv.source}
            for path, data in ((base, pv.template.encode("utf-8")),
                               (base.with_suffix(".yaml"), yaml.safe_dump(meta, sort_keys=False).encode("utf-8"))):
                if path.exists() and path.read_bytes() != data and not force:
                    raise TunebenchError(f"{path} exists with different content; --force replaces it")
                files.append((pv, path, data))
        for pv, path, data in files:  # every file checked before any is written
            unchanged = path.exists() and path.read_bytes() == data
            if not unchanged:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
            if path.suffix == ".jinja":
                out.print(f"[green]✓[/] {pv.ref} #{pv.short} → {path}{' (unchanged)' if unchanged else ''}",
                          highlight=False)
    except OSError as exc:
        _fail(TunebenchError(f"cannot write the export: {exc}"))
    except TunebenchError as exc:
        _fail(exc)


@prompts_app.command("import")
def prompts_import(files: list[Path] = typer.Argument(..., help="Template files (e.g. NAME@V.jinja from export)."),
                   name: Optional[str] = typer.Option(None, "--name", help="Register under this name (default: the "
                                                      "sidecar NAME@V.yaml's name, else the file name before '@')."),
                   kind: Optional[str] = typer.Option(None, "--kind", help="prompt, label or instruction (default: "
                                                      "the sidecar's, "
                                                      "else prompt)."),
                   store: Optional[Path] = RegistryStoreOpt, as_json: bool = JsonOpt) -> None:
    """Register the text of template files: new text becomes a new version, text already there gives its version."""
    import yaml

    from ..store.prompts import content_hash
    from ..prompts import PromptTemplate

    _setup_logging(False)
    results = []
    try:
        reg = _registry(store, create=True)
        for file in files:
            try:
                text = file.read_bytes().decode("utf-8")
            except OSError as exc:
                raise TunebenchError(f"{file}: cannot read it ({exc.strerror or exc})") from None
            except UnicodeDecodeError as exc:
                raise TunebenchError(f"{file}: not valid UTF-8 (byte {exc.start}); save it as UTF-8") from None
            sidecar = file.with_suffix(".yaml")
            meta = {}
            if sidecar != file and sidecar.is_file():
                try:
                    meta = yaml.safe_load(sidecar.read_text(encoding="utf-8")) or {}
                except (yaml.YAMLError, UnicodeDecodeError) as exc:
                    raise TunebenchError(f"{sidecar}: not a readable sidecar ({exc}); fix or delete it") from None
                if not isinstance(meta, dict):
                    raise TunebenchError(f"{sidecar}: a sidecar is a mapping of name, version, hash, kind, source")
            target = name or meta.get("name") or (file.name.split("@")[0] if "@" in file.name else file.stem)
            the_kind = kind or meta.get("kind") or "prompt"
            if the_kind == "prompt":
                PromptTemplate(text, str(file))  # a syntax error names the file and line
            before = {v.hash for v in reg.versions(str(target))}
            pv = reg.register(str(target), text, the_kind, f"file {file.name}")
            edited = bool(meta.get("hash")) and meta["hash"] != content_hash(text)
            results.append({**pv.to_dict(), "file": str(file), "new": pv.hash not in before, "edited": edited})
    except TunebenchError as exc:
        _fail(exc)
    if as_json:
        sys.stdout.write(json.dumps({"store": str(reg.store.root), "imported": results}) + "\n")
        return
    for r in results:
        what = "new version" if r["new"] else "already registered"
        if r["edited"]:
            what += ", edited since it was exported"
        out.print(f"[green]✓[/] {r['file']} → [bold]{r['ref']}[/] #{r['hash'][:12]} ({what})", highlight=False)


def main() -> None:  # pragma: no cover
    app()
