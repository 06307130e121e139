"""The human-readable report of a course run, as Markdown and as HTML with the same content.

Both formats are rendered from one list of blocks (headings, paragraphs, tables, images, code), so they cannot
drift apart. Paths in the report are relative to the run folder, which keeps the folder movable.
"""

from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union
from urllib.parse import quote


@dataclass(frozen=True)
class Heading:
    text: str
    level: int


@dataclass(frozen=True)
class Link:
    text: str
    href: str


@dataclass(frozen=True)
class Paragraph:
    parts: tuple[str | Link, ...]


@dataclass(frozen=True)
class Table:
    headers: tuple[str, ...]
    rows: tuple[tuple[str | Link, ...], ...]


@dataclass(frozen=True)
class Image:
    path: str
    alt: str


@dataclass(frozen=True)
class Code:
    text: str


Block = Union[Heading, Paragraph, Table, Image, Code]

HTML_STYLE = """body { font-family: sans-serif; max-width: 64em; margin: 2em auto; padding: 0 1em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
pre { background: #f4f4f4; padding: 0.6em; overflow-x: auto; white-space: pre-wrap; }
img { max-width: 100%; }"""


def write_reports(results: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """Write `report.md` and `report.html` for `results` (the content of results.json) into `out_dir`."""
    return write_blocks(build_blocks(results), out_dir / "report", title=f"Course run: {results['status']}")


def write_blocks(blocks: list[Block], stem: Path, title: str) -> tuple[Path, Path]:
    """Write `blocks` as `<stem>.md` and `<stem>.html`, each file replaced atomically, and return both paths.

    A reader, or a run killed while writing, never leaves half a report: each file is written beside its target
    and then renamed over it.
    """
    markdown_path = stem.with_suffix(".md")
    html_path = stem.with_suffix(".html")
    _write_atomically(markdown_path, render_markdown(blocks))
    _write_atomically(html_path, render_html(blocks, title=title))
    return markdown_path, html_path


def _write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(text, encoding="utf-8")
    partial.replace(path)


def build_blocks(results: dict[str, Any]) -> list[Block]:
    """Lay out the report: run header, one summary table, then a section per notebook."""
    blocks: list[Block] = [Heading(f"Course run: {results['status']}", 1), *_header(results)]
    blocks.append(Heading("Notebooks", 2))
    rows = tuple((entry["notebook"], entry["status"], f"{entry['seconds']:.1f}", _claims_held(entry["claims"]),
                  page_link(entry)) for entry in results["notebooks"])
    blocks.append(Table(("Notebook", "Status", "Seconds", "Claims held", "Executed notebook"), rows))
    for entry in results["notebooks"]:
        blocks.extend(_notebook_section(entry))
    return blocks


def _header(results: dict[str, Any]) -> list[Block]:
    env = results["environment"]
    cuda = env["cuda_device"] if env["cuda_available"] else "not available"
    finished = results["finished"] or "not finished"
    return [
        Paragraph((f"Profile {results['profile']}, dataset {results['dataset']}, device {results['device']}, "
                   f"seed {results['seed']}.",)),
        Paragraph((f"Started {results['started']}, finished {finished}, total time {results['seconds']:.1f} s.",)),
        Paragraph((f"Python {env['python']}, PyTorch {env['torch']}, torchvision {env['torchvision']}, "
                   f"NumPy {env['numpy']}, scikit-learn {env['sklearn']}, papermill {env['papermill']}. "
                   f"{env['torch_threads']} PyTorch threads on {env['cpu_count']} CPUs, CUDA: {cuda}. "
                   f"Platform {env['platform']}.",)),
    ]


def page_link(entry: dict[str, Any]) -> Link:
    """Link to a notebook's HTML rendering, or to the executed .ipynb when it has none."""
    target = entry.get("html") or entry["executed"]
    return Link(target, target)


def _notebook_section(entry: dict[str, Any]) -> list[Block]:
    executed: tuple[str | Link, ...] = (f"{entry['seconds']:.1f} s. Executed notebook: ",
                                        Link(entry["executed"], entry["executed"]))
    if entry.get("html"):
        executed += (", rendered as HTML: ", Link(entry["html"], entry["html"]))
    blocks: list[Block] = [Heading(f"{entry['notebook']}: {entry['status']}", 2), Paragraph(executed + (".",))]
    if entry["error"]:
        blocks += [Paragraph(("Error:",)), Code(entry["error"])]
    if entry["metrics"]:
        rows = tuple((m["name"], format_value(m["value"]), m["claim"]) for m in entry["metrics"])
        blocks += [Heading("Metrics", 3), Table(("Metric", "Value", "Description"), rows)]
    if entry["claims"]:
        # The name comes first because several checks can share one sentence, such as both bounds of a range.
        rows = tuple((c["name"], c["claim"], format_value(c["value"]), c["op"], format_value(c["threshold"]),
                      _holds_text(c)) for c in entry["claims"])
        blocks += [Heading("Claims", 3), Table(("Name", "Claim", "Value", "Op", "Threshold", "Holds"), rows)]
    if not entry["metrics"] and not entry["claims"]:
        blocks.append(Paragraph(("The notebook recorded no metrics and no claims.",)))
    if entry["figures"]:
        blocks.append(Heading("Figures", 3))
        blocks += [Image(path, Path(path).stem) for path in entry["figures"]]
    return blocks


def format_value(value: float) -> str:
    """Format a metric value with 4 significant digits. NaN and infinities read as `nan`, `inf` and `-inf`."""
    if math.isnan(value) or math.isinf(value):
        return str(value)
    return f"{value:.4g}"


def _claims_held(claims: list[dict[str, Any]]) -> str:
    if not claims:
        return "no claims"
    claims_held = sum(1 for claim in claims if claim["holds"])
    return f"{claims_held}/{len(claims)}"


def _holds_text(claim: dict[str, Any]) -> str:
    if claim["holds"]:
        return "yes"
    # The smoke profile records claims without enforcing them, so a false one there is not a failure.
    return "no" if claim["enforced"] else "no (not enforced)"


def render_markdown(blocks: list[Block]) -> str:
    """Render blocks as GitHub-flavoured Markdown."""
    return "\n\n".join(_markdown_block(block) for block in blocks) + "\n"


def _markdown_block(block: Block) -> str:
    if isinstance(block, Heading):
        return "#" * block.level + " " + block.text
    if isinstance(block, Paragraph):
        return "".join(f"[{part.text}](<{part.href}>)" if isinstance(part, Link) else part
                       for part in block.parts)
    if isinstance(block, Table):
        lines = [_markdown_row(block.headers), "|" + "---|" * len(block.headers)]
        return "\n".join(lines + [_markdown_row(row) for row in block.rows])
    if isinstance(block, Image):
        return f"![{block.alt}](<{block.path}>)"
    # A fence longer than any run of backticks in the text cannot be closed by the text itself.
    longest = max((len(run) for run in re.findall(r"`+", block.text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{block.text}\n{fence}"


def _markdown_row(cells: tuple[str | Link, ...]) -> str:
    escaped = (_markdown_cell(cell).replace("|", "\\|").replace("\n", " ") for cell in cells)
    return "| " + " | ".join(escaped) + " |"


def _markdown_cell(cell: str | Link) -> str:
    return f"[{cell.text}](<{cell.href}>)" if isinstance(cell, Link) else cell


def render_html(blocks: list[Block], title: str) -> str:
    """Render blocks as one self-contained HTML page (images stay separate files, linked relatively)."""
    body = "\n".join(_html_block(block) for block in blocks)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>{html.escape(title)}</title>\n<style>\n{HTML_STYLE}\n</style>\n</head>\n"
            f"<body>\n{body}\n</body>\n</html>\n")


def _html_block(block: Block) -> str:
    if isinstance(block, Heading):
        return f"<h{block.level}>{html.escape(block.text)}</h{block.level}>"
    if isinstance(block, Paragraph):
        parts = (f'<a href="{quote(part.href)}">{html.escape(part.text)}</a>' if isinstance(part, Link)
                 else html.escape(part) for part in block.parts)
        return f"<p>{''.join(parts)}</p>"
    if isinstance(block, Table):
        header = "".join(f"<th>{html.escape(cell)}</th>" for cell in block.headers)
        rows = ["<tr>" + "".join(f"<td>{_html_cell(cell)}</td>" for cell in row) + "</tr>" for row in block.rows]
        return "<table>\n<tr>" + header + "</tr>\n" + "\n".join(rows) + "\n</table>"
    if isinstance(block, Image):
        return f'<p><img src="{quote(block.path)}" alt="{html.escape(block.alt)}"></p>'
    return f"<pre>{html.escape(block.text)}</pre>"


def _html_cell(cell: str | Link) -> str:
    if isinstance(cell, Link):
        return f'<a href="{quote(cell.href)}">{html.escape(cell.text)}</a>'
    return html.escape(cell)
