"""Scoring merged predictions and writing results: results.json and a readable results.md table, each written to a
temporary file and renamed (a killed run never leaves a half-written result)."""

import json
import os
import tempfile
from pathlib import Path

from ..json_io import parse_json
from .sources import RecordError, read_jsonl


def score_setting(task, samples, records: dict[str, dict]) -> dict:
    """Scores one setting's answers; failures (no answer, an error while answering, an answer naming no option) are
    counted and scored as wrong."""
    answers = {qid: r.get("text", "") for qid, r in records.items() if "error" not in r}
    errors = {qid: r["error"] for qid, r in records.items() if "error" in r}
    missing = sum(1 for s in samples if s.question_id not in records)
    scored = task.score(samples, answers)
    scored["failures"] = {"missing": missing, "errors": len(errors), "unparsed": scored.pop("unparsed", 0)}
    if errors:
        scored["failures"]["first_errors"] = list(errors.values())[:5]
    scored["samples"] = len(samples)
    return scored


def read_predictions(task, samples, path) -> dict[str, dict]:
    """A predictions file -> {question_id: {"text": ...}}: LLaVA's answer JSONL ({"question_id", "text"}; an
    MMBench `round_id` or a repeated id (MME's two questions per image) select the round / question; SEED-Bench's
    upload file's "prediction" is read too), this tool's own records, or the task's submission format (JSON)."""
    path = Path(path)
    known = {s.question_id for s in samples}
    if path.suffix == ".jsonl":
        out, seen = {}, {}
        for number, record in read_jsonl(path):
            at = f"{path}: line {number}"
            text = next((record[k] for k in ("text", "prediction", "answer") if isinstance(record.get(k), str)), None)
            if "question_id" not in record or text is None:
                raise RecordError(f"{at}: expected {{\"question_id\", \"text\"}} (LLaVA's answer format; "
                                  "\"prediction\" or \"answer\" are read too)")
            qid = str(record["question_id"])
            if "round_id" in record:
                key = f"{qid}#{record['round_id']}"
            elif qid in known:
                key = qid
            else:
                k = seen[qid] = seen.get(qid, -1) + 1
                key = f"{qid}#{k}"
            out[key] = {"question_id": key, "text": text}
        return out
    from ..json_io import read_text

    value = parse_json(read_text(path), str(path))
    answers = task.read_submission(value, str(path))
    if answers is None:
        raise RecordError(f"{path}: not a predictions file for task {task.name}: expected LLaVA's JSONL "
                          "({\"question_id\", \"text\"} per line) or the task's submission JSON")
    return {qid: {"question_id": qid, "text": text} for qid, text in answers.items()}


def write_atomic(path, text: str):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def _fmt(value, digits=2):
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def render_table(results: dict) -> str:
    """Markdown: one row per setting (score, failures, tokens, granularity distribution, speed), then the prompt
    and generation settings."""
    lines = [f"# {results['title']} ({results['task']})", "", f"data: `{results['data']}`", "",
             f"| setting | {results['metric']} | samples | failures (missing/errors/unparsed) | visual tokens / image "
             "| granularity distribution | prefill s | tokens/s |",
             "|---|---|---|---|---|---|---|---|"]
    for setting in results["settings"]:
        eff = setting.get("efficiency") or {}
        failures = setting["failures"]
        dist = eff.get("granularity_distribution") or {}
        total = sum(dist.values())
        dist_text = ", ".join(f"{k}: {100 * v / total:.0f}%" for k, v in dist.items()) if total else "-"
        lines.append(
            f"| {setting['name']} | {_fmt(setting['score'])} | {setting['samples']} | "
            f"{failures['missing']}/{failures['errors']}/{failures['unparsed']} | "
            f"{_fmt(eff.get('mean_visual_tokens_per_image'), 1)} | {dist_text} | "
            f"{_fmt(eff.get('prefill_seconds'), 4)} | {_fmt(eff.get('tokens_per_second'), 1)} |")
    for setting in results["settings"]:
        metrics = ", ".join(f"{k} {_fmt(v)}" for k, v in setting.get("metrics", {}).items())
        lines += ["", f"## {setting['name']}", "", f"metrics: {metrics}"]
        categories = setting.get("by_category") or {}
        if categories:
            lines.append("")
            lines.append("| category | score |")
            lines.append("|---|---|")
            for name, value in categories.items():
                if isinstance(value, dict):
                    shown = ", ".join(f"{k} {_fmt(v)}" for k, v in value.items())
                else:
                    shown = _fmt(value)
                lines.append(f"| {name} | {shown} |")
    generation = results.get("generation")
    lines += ["", "## Prompt and generation", "", f"prompt: {results['prompt_doc']}", ""]
    if results.get("example_prompt"):
        lines += ["first sample's full prompt:", "", "```", results["example_prompt"], "```", ""]
    if generation:
        lines.append("generation: " + ", ".join(f"{k}={v}" for k, v in generation.items()))
    return "\n".join(lines) + "\n"


def write_results(out_dir, results: dict):
    out_dir = Path(out_dir)
    write_atomic(out_dir / "results.json", json.dumps(results, indent=2) + "\n")
    write_atomic(out_dir / "results.md", render_table(results))


__all__ = ["read_predictions", "render_table", "score_setting", "write_atomic", "write_results"]
