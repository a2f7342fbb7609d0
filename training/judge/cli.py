"""``trajguard judge``: evaluate the judges, or fit and save the learned harm judge."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from training.data.labelled import load_labelled_generations
from training.data.prompt_files import load_prompt_file
from training.judge.attack_judge import fit_attack_judge
from training.judge.evaluate import AFTER, EvaluationReport, JudgeScores, run_evaluation
from training.judge.exclusion import evaluation_prompts, select_records
from training.judge.selection import C_GRID

app = typer.Typer(help="Harm and refusal judges.", no_args_is_help=True)
console = Console()

DataDirOption = Annotated[
    Path | None, typer.Option(help="Data directory (default: $TRAJGUARD_DATA or ../shared/data).")
]
DEFAULT_C_GRID = ",".join(f"{c:g}" for c in C_GRID)
PromptsOption = Annotated[
    Path | None,
    typer.Option(
        "--prompts",
        help="CSV/JSONL of extra evaluation prompts (as an attack's --prompts FILE) to keep out "
        "of the judge's training data, besides the default split's test and dev parts.",
    ),
]
CGridOption = Annotated[
    str,
    typer.Option("--C-grid", help="Comma-separated candidate values of C, chosen by dev F1."),
]


def _table(title: str, rows: tuple[JudgeScores, ...]) -> Table:
    table = Table(title=title)
    for column in ("judge", "subset", "n", "pos", "accuracy", "precision", "recall", "F1"):
        if column in ("judge", "subset"):
            table.add_column(column, overflow="fold")
        else:
            table.add_column(column, justify="right", no_wrap=True)
    for s in rows:
        table.add_row(
            s.judge,
            s.subset,
            str(s.n),
            str(s.n_positive),
            *(f"{v:.3f}" for v in (s.accuracy, s.precision, s.recall, s.f1)),
        )
    return table


def _parse_grid(text: str) -> tuple[float, ...]:
    """``"0.25,1,4"`` -> ``(0.25, 1.0, 4.0)``."""
    try:
        grid = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise typer.BadParameter(f"not a comma-separated list of numbers: {text!r}") from None
    if not grid or min(grid) <= 0:
        raise typer.BadParameter("the C grid needs at least one positive value")
    return grid


def _extra_prompts(path: Path | None) -> list[str] | None:
    return load_prompt_file(path) if path is not None else None


def _print_report(report: EvaluationReport) -> None:
    held_out = report.params.get("held_out_C_selection", {})
    console.print(
        f"split seed {report.seed}: train {report.n_train} (dev {report.n_dev} of them) / "
        f"test {report.n_test} labelled generations (grouped by behaviour); "
        f"C={held_out.get('chosen')} chosen on dev"
    )
    console.print(_table("Harm judges vs labels, held-out test split", report.harm))
    if report.attack_judge:
        after = report.params.get("attack_judge", {}).get("after", {})
        console.print(
            f"attack judge: trained on {after.get('n_records')} records, "
            f"{after.get('excluded', {}).get('n_records')} of evaluation behaviours excluded, "
            f"C={after.get('C')} chosen on dev; 'before' = all records, C=4 (in-sample)"
        )
        console.print(
            _table("Attack judge vs labels on the evaluation behaviours", report.attack_judge)
        )
    console.print(_table("Refusal judges vs XSTest labels (full/partial refusal)", report.refusal))


@app.command("eval")
def eval_command(
    data_dir: DataDirOption = None,
    seed: Annotated[int, typer.Option(help="Train/dev/test split seed.")] = 0,
    C_grid: CGridOption = DEFAULT_C_GRID,
    prompts: PromptsOption = None,
    out: Annotated[Path | None, typer.Option(help="Write the report as JSON here.")] = None,
) -> None:
    """Score the harm judges on held-out data and the attack judge on the evaluation behaviours."""
    logging.basicConfig(level=logging.WARNING)
    report = run_evaluation(
        data_dir, seed=seed, C_grid=_parse_grid(C_grid), extra_prompts=_extra_prompts(prompts)
    )
    _print_report(report)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report.to_dict(), indent=2), encoding="utf-8")
        console.print(f"wrote {out}")
    attack = {s.judge: s for s in report.attack_judge if s.subset.count("/") == 0}
    if AFTER in attack:
        console.print(f"attack judge F1 on evaluation behaviours: {attack[AFTER].f1:.2f}")
    console.print(f"harm judge F1: {report.learned_f1:.2f}")


@app.command("fit")
def fit_command(
    out_dir: Annotated[Path, typer.Argument(help="Directory to save the judge into.")],
    data_dir: DataDirOption = None,
    C_grid: CGridOption = DEFAULT_C_GRID,
    prompts: PromptsOption = None,
) -> None:
    """Fit the attack harm judge (evaluation behaviours held out, C by dev F1) and save it."""
    logging.basicConfig(level=logging.WARNING)
    eval_prompts = evaluation_prompts(data_dir, _extra_prompts(prompts))
    selection = select_records(load_labelled_generations(data_dir), eval_prompts)
    judge = fit_attack_judge(selection, eval_prompts, grid=_parse_grid(C_grid))
    judge.save(out_dir)
    console.print(
        f"saved harm judge trained on {len(selection.kept)} generations "
        f"({len(selection.excluded)} of evaluation behaviours excluded, C={judge.C:g}) "
        f"to {out_dir}"
    )


if __name__ == "__main__":
    app()
