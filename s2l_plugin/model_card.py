"""A "Privacy audit" section in a model folder's ``README.md`` (a Hugging Face model card).

:func:`write_model_card` writes the section between two HTML comment markers, so a rerun replaces
it in place, and adds the tag ``s2l-privacy-audit`` to the card's YAML front matter. Everything else
in the README stays byte for byte: the front matter is edited line by line (one tag added, nothing
re-serialised) and left alone when it cannot be edited safely; the prose is never touched. A
README without front matter gets one at the top; a folder without a README gets a new one.

The section holds the headline numbers of a saved audit (AUC with its 95% interval per model and
attack, ΔAUC after fine-tuning, extracted training images, the memorization score, metadata
findings), the attack settings, the privacy gate's verdict when a ``verdict.json`` lies beside
``result.json``, and links to the HTML report and the result.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

README = "README.md"
TAG = "s2l-privacy-audit"
START = "<!-- s2l-privacy-audit:start -->"
END = "<!-- s2l-privacy-audit:end -->"
_FRONT_RE = re.compile(r"\A---[ \t]*\r?\n(.*?\r?\n)?---[ \t]*(?:\r?\n|\Z)", re.S)


# -- front matter -------------------------------------------------------------------------------------


def _yaml_mapping(text: str) -> dict[str, Any] | None:
    try:
        import yaml
    except ImportError:  # pragma: no cover - PyYAML comes with huggingface_hub
        return None
    try:
        data = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError:
        return None
    return data if isinstance(data, dict) else None


def _with_tag(inner: str) -> str:
    """``inner`` (the YAML between the ``---`` lines) with :data:`TAG` added to ``tags``, line by line."""
    lines = inner.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    for i, line in enumerate(lines):
        match = re.match(r"tags[ \t]*:[ \t]*(.*?)[ \t]*(#.*)?\r?$", line.rstrip("\n"))
        if not match:
            continue
        value = match.group(1)
        if value.startswith("[") and value.endswith("]"):  # flow list: tags: [a, b]
            items = value[1:-1].strip()
            new = f"[{items}, {TAG}]" if items else f"[{TAG}]"
            lines[i] = line.replace(value, new, 1)
            return "".join(lines)
        if value:  # one scalar tag
            lines[i] = line.replace(value, f"[{value}, {TAG}]", 1)
            return "".join(lines)
        end, indent = i + 1, ""
        while end < len(lines) and (lines[end][:1] in (" ", "\t", "-") or not lines[end].strip()):
            item = re.match(r"([ \t]*)-", lines[end])
            if item and not indent:
                indent = item.group(1)
            end += 1
        while end > i + 1 and not lines[end - 1].strip():  # keep blank lines after the list where they were
            end -= 1
        lines.insert(end, f"{indent}- {TAG}\n")
        return "".join(lines)
    return "".join(lines) + f"tags:\n- {TAG}\n"


def _front_matter(text: str) -> str:
    """``text`` with :data:`TAG` in its front matter (added when missing; unchanged when it cannot be done safely)."""
    match = _FRONT_RE.match(text)
    if match is None:
        return f"---\ntags:\n- {TAG}\n---\n\n" + text
    inner = match.group(1) or ""
    before = _yaml_mapping(inner)
    if before is None:
        return text  # not a YAML mapping we can read: left exactly as it is
    tags = before.get("tags")
    if tags == TAG or (isinstance(tags, list) and TAG in tags):
        return text
    new_inner = _with_tag(inner)
    after = _yaml_mapping(new_inner)
    rest = {k: v for k, v in (after or {}).items() if k != "tags"}
    new_tags = (after or {}).get("tags")
    old_tags = tags if isinstance(tags, list) else ([] if tags is None else [tags])
    if after is None or rest != {k: v for k, v in before.items() if k != "tags"} or new_tags != [*old_tags, TAG]:
        return text  # the line edit would change something else: leave the front matter alone
    if match.group(1) is not None:
        start, end = match.start(1), match.end(1)
    else:  # "---" straight after "---": the tag goes between them
        start = end = text.index("\n") + 1
    return text[:start] + new_inner + text[end:]


# -- the section ---------------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _num(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "n/a"


def _ci(ci: Any) -> str:
    return f"[{_num(ci[0])}, {_num(ci[1])}]" if isinstance(ci, (list, tuple)) and len(ci) == 2 else ""


def _link(target: Path, folder: Path) -> str:
    return Path(os.path.relpath(target.resolve(), folder.resolve())).as_posix()


def _verdict_lines(verdict: dict[str, Any]) -> list[str]:
    outcome = str(verdict.get("verdict", "?"))
    lines = [f"**Privacy gate:** {outcome.upper()} — `{_cell(verdict.get('fail_on', ''))}`", ""]
    conditions = [c for c in verdict.get("conditions", []) if isinstance(c, dict)]
    if conditions:
        lines += ["| condition | status | model | measured [95% CI] |", "|---|---|---|---|"]
        for c in conditions:
            value = c.get("value")
            shown = _num(value) if isinstance(value, (int, float)) else ("n/a" if value is None else str(value))
            lines.append(f"| `{_cell(c.get('condition', ''))}` | {_cell(c.get('status', ''))} | "
                         f"{_cell(c.get('model') or '')} | {_cell(shown)} {_ci(c.get('interval'))} |")
        lines.append("")
    return lines


def section(result: Any, *, report_link: str | None = None, result_link: str | None = None,
            verdict: dict[str, Any] | None = None) -> str:
    """The "Privacy audit" section (markers included) for a :class:`~s2l_plugin.result.RunResult`."""
    lines = [START, "## Privacy audit", ""]
    version = result.versions.get("s2l_plugin") or result.versions.get("s2l-plugin") if isinstance(result.versions, dict) else None
    when = f" on {result.created[:10]}" if result.created else ""
    lines += [f"This model was audited for training-data leakage with s2l-plugin{f' {version}' if version else ''}{when}: "
              "membership inference (does the model recognise its training images?), training-data extraction "
              "and the memorization score, with the base model audited the same way for reference.", ""]
    if verdict is not None:
        lines += _verdict_lines(verdict)
    rows = [(a.model.label, att) for a in result.audits if a.membership is not None for att in a.membership.attacks]
    if rows:
        lines += ["Membership inference (AUC 0.5 = chance; higher = the model tells its training images apart):", "",
                  "| model | attack | AUC [95% CI] | TPR at 1% FPR |", "|---|---|---|---|"]
        from s2l_plugin.audit.metrics import tpr_resolvable
        from s2l_plugin.report.view import not_resolved

        def tpr(att: Any) -> str:  # a TPR at an FPR the non-members cannot resolve is not a number
            ok = tpr_resolvable(0.01, len(att.nonmember_scores) or None, att.tpr_at_1fpr_resolvable)
            return _num(att.tpr_at_1fpr) if ok else not_resolved(0.01)

        lines += [f"| {_cell(label)} | {_cell(att.attack)} | {_num(att.auc)} {_ci(att.auc_ci)} | {tpr(att)} |"
                  for label, att in rows]
        lines.append("")
    if result.comparisons:
        lines += ["Change after fine-tuning (ΔAUC = after − before, paired bootstrap 95% CI):", "",
                  "| method | attack | members | ΔAUC [95% CI] |", "|---|---|---|---|"]
        lines += [f"| {_cell(c.method)} | {_cell(c.attack)} | {_cell(c.subset)} | {c.delta_auc:+.3f} {_ci(c.delta_auc_ci)} |"
                  for c in result.comparisons]
        lines.append("")
    facts = []
    for a in result.audits:
        if a.extraction is not None:
            e = a.extraction
            facts.append(f"- Extracted training images ({_cell(a.model.label)}): **{e.extracted_total}** unique of "
                         f"{e.n_references} reference images, from {e.n_generations} generations")
        if a.memorization is not None and a.memorization.scores:
            scores = [s.score for s in a.memorization.scores]
            facts.append(f"- Memorization score ({_cell(a.model.label)}; Wen et al., higher = more memorized): max "
                         f"{_num(max(scores))}, mean {_num(sum(scores) / len(scores))} over {len(scores)} prompt(s)")
        if a.findings and a.model.label != "base":
            counts = {s: sum(f.severity == s for f in a.findings) for s in ("high", "medium", "low")}
            facts.append(f"- Metadata findings ({_cell(a.model.label)}): " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    if facts:
        lines += [*facts, ""]
    settings = _settings(result)
    if settings:
        lines += ["Attack settings: " + "; ".join(settings) + ".", ""]
    links = [f"[HTML report]({report_link})" if report_link else "", f"[result.json]({result_link})" if result_link else ""]
    if any(links):
        lines += ["Full report: " + " · ".join(x for x in links if x), ""]
    lines.append(END)
    return "\n".join(lines) + "\n"


def _settings(result: Any) -> list[str]:
    out: list[str] = []
    membership = next((a.membership for a in result.audits if a.membership is not None), None)
    if membership is not None:
        out.append(f"{membership.n_members} members vs {membership.n_nonmembers} non-members, attacks "
                   f"{', '.join(a.attack for a in membership.attacks)}, seed {membership.seed}")
    extraction = next((a.extraction for a in result.audits if a.extraction is not None), None)
    if extraction is not None:
        steps = extraction.params.get("num_inference_steps") or extraction.params.get("steps")
        guidance = extraction.params.get("guidance_scale") or extraction.params.get("guidance")
        extra = "".join([f", {steps} sampling steps" if steps else "", f", guidance {guidance}" if guidance else ""])
        out.append(f"extraction {extraction.n_per_prompt} generations per prompt over {len(extraction.prompts)} prompt(s)"
                   f"{extra}, match distance ≤ {_num(extraction.delta)}")
    memorization = next((a.memorization for a in result.audits if a.memorization is not None), None)
    if memorization is not None:
        out.append(f"memorization score over {memorization.n_generations} generation(s), {memorization.steps} step(s) scored")
    return out


# -- the README ----------------------------------------------------------------------------------------


def update_readme(text: str, body: str) -> str:
    """``text`` with :data:`TAG` in its front matter and ``body`` (a :func:`section`) in place of the
    marked section, or appended at the end when there is none."""
    text = _front_matter(text)
    start, end = text.find(START), text.find(END)
    if start != -1 and end > start:
        return text[:start] + body.rstrip("\n") + text[end + len(END):]
    if text and not text.endswith("\n"):
        text += "\n"
    return text + ("\n" if text.strip() and not text.endswith("\n\n") else "") + body


def write_model_card(artifact_dir: str | Path, result: Any, *, report_dir: str | Path | None = None,
                     verdict: dict[str, Any] | None = None) -> Path:
    """Write or update the "Privacy audit" section of ``artifact_dir/README.md``; returns its path.

    ``artifact_dir`` is the folder published with the model (a file's folder when a file is given).
    ``result`` is a :class:`~s2l_plugin.result.RunResult`, or the path of a ``result.json`` (or its
    folder), which is then also ``report_dir``: the folder with ``report.html``, ``result.json`` and,
    when a privacy gate ran, ``verdict.json`` (``verdict`` overrides it). The file is written whole,
    then renamed.
    """
    from s2l_plugin._io import atomic_write_text
    from s2l_plugin.result import RESULT_FILE, RunResult, load_result

    folder = Path(artifact_dir)
    if folder.is_file():
        folder = folder.parent
    if not isinstance(result, RunResult):
        path = Path(result)
        report_dir = report_dir if report_dir is not None else (path if path.is_dir() else path.parent)
        result = load_result(path)
    report = Path(report_dir) if report_dir is not None else None
    if verdict is None and report is not None and (report / "verdict.json").is_file():
        try:
            data = json.loads((report / "verdict.json").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            data = None
        verdict = data if isinstance(data, dict) and data.get("verdict") in ("pass", "fail") else None
    report_link = result_link = None
    if report is not None:
        if (report / "report.html").is_file():
            report_link = _link(report / "report.html", folder)
        if (report / RESULT_FILE).is_file():
            result_link = _link(report / RESULT_FILE, folder)
    readme = folder / README
    text = readme.read_text(encoding="utf-8") if readme.is_file() else ""
    body = section(result, report_link=report_link, result_link=result_link, verdict=verdict)
    atomic_write_text(readme, update_readme(text, body))
    return readme


def write_for_run(run: Any, artifact: Any) -> Path | None:
    """``--s2l-model-card``: the card of a launched / ``after_training`` run, in the artifact's folder,
    linking the run's report folder; None when the run has no saved result."""
    from s2l_plugin.integration import report_dir

    if run.state.get("result") is None:
        return None
    return write_model_card(Path(artifact.path), run.state["result"], report_dir=report_dir(run))
