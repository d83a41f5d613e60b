"""A small, dependency-free static HTML page writer for reports (inspect-memory's index.html).

A page is a title plus sections; a section has paragraphs, optional tables and figures (an image
with a caption). Image links are written relative to the page's folder, so the report folder can
be moved or zipped as a whole. Every text is HTML-escaped; the page is written atomically.
"""
from __future__ import annotations

import html
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from allspark_cli.fileio import atomic_write_text

# Figures wider than this are scaled down by the browser (click opens the full picture).
MAX_FIGURE_WIDTH_PX = 1400

_STYLE = f"""
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }}
h1 {{ font-size: 1.5em; }} h2 {{ font-size: 1.2em; border-bottom: 1px solid #ccc; padding-bottom: .2em; }}
figure {{ margin: 1em 0; }} figure img {{ max-width: min(100%, {MAX_FIGURE_WIDTH_PX}px); border: 1px solid #ddd; }}
figcaption {{ font-size: .9em; color: #555; max-width: {MAX_FIGURE_WIDTH_PX}px; }}
table {{ border-collapse: collapse; font-size: .85em; margin: .5em 0; }}
td, th {{ border: 1px solid #ccc; padding: .15em .5em; text-align: right; }}
th {{ background: #f3f3f3; }} td.text, th.text {{ text-align: left; }}
p.note {{ background: #fff7e0; border-left: 4px solid #e0a800; padding: .4em .8em; }}
"""


@dataclass(frozen=True)
class Figure:
    """A picture of the report (absolute path or path relative to the page) and its caption."""

    path: Path
    caption: str


@dataclass(frozen=True)
class Table:
    """A table: column headers and rows of cells (str/int/float; None prints as an empty cell)."""

    headers: Sequence[str]
    rows: Sequence[Sequence[object]]


@dataclass
class Section:
    """One heading of the page with its content, drawn in the order: notes, text, tables, figures."""

    title: str
    paragraphs: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    anchor: str = ""


def relative_link(target: Path, page_dir: Path) -> str:
    """URL of `target` relative to the folder of the page (POSIX separators, percent-quoted)."""
    relative = os.path.relpath(Path(target).resolve(), Path(page_dir).resolve())
    return quote(Path(relative).as_posix())


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def _table(table: Table) -> str:
    def css(value: object) -> str:
        return "" if isinstance(value, (int, float)) or value is None else ' class="text"'

    head = "".join(f"<th>{html.escape(h)}</th>" for h in table.headers)
    body = "\n".join(
        "<tr>" + "".join(f"<td{css(cell)}>{_cell(cell)}</td>" for cell in row) + "</tr>" for row in table.rows
    )
    return f"<table>\n<tr>{head}</tr>\n{body}\n</table>"


def render_page(title: str, sections: Sequence[Section], page_dir: Path) -> str:
    """The full HTML text; figure paths become links relative to `page_dir`."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    toc = [s for s in sections if s.anchor]
    if toc:
        links = " | ".join(f'<a href="#{quote(s.anchor)}">{html.escape(s.title)}</a>' for s in toc)
        parts.append(f"<p>{links}</p>")
    for section in sections:
        anchor = f' id="{html.escape(section.anchor)}"' if section.anchor else ""
        parts.append(f"<h2{anchor}>{html.escape(section.title)}</h2>")
        parts.extend(f'<p class="note">{html.escape(note)}</p>' for note in section.notes)
        parts.extend(f"<p>{html.escape(text)}</p>" for text in section.paragraphs)
        parts.extend(_table(table) for table in section.tables)
        for figure in section.figures:
            link = relative_link(figure.path, page_dir)
            caption = html.escape(figure.caption)
            parts.append(
                f'<figure><a href="{link}"><img src="{link}" alt="{caption}" loading="lazy"></a>'
                f"<figcaption>{caption}</figcaption></figure>"
            )
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_page(path: Path, title: str, sections: Sequence[Section]) -> Path:
    """Atomically writes the page to `path`; returns `path`."""
    path = Path(path)
    atomic_write_text(path, render_page(title, sections, path.parent))
    return path


def _memory_overview(summary: dict) -> Section:
    grid = "{} x {}".format(*summary["token_grid"])
    section = Section("Checkpoint", anchor="checkpoint", paragraphs=[
        f"{summary['checkpoint']} ({summary['source']} checkpoint): method {summary['method']}, backbone "
        f"{summary['backbone']}, {summary['slots_per_class']} memory slots per class, token grid {grid}."])
    if summary["provenance_available"]:
        section.paragraphs.append(
            f"Provenance: {summary['provenance_note']}; every written slot's source is listed in provenance.csv.")
    else:
        section.notes.append(f"No provenance ({summary['provenance_note']}).")
    return section


def _memory_fill(summary: dict, page_dir: Path) -> Section:
    section = Section("Fill level and grouping", anchor="fill")
    if summary["source"] == "reference":
        section.notes.append("Reference checkpoints record neither which slots were written nor the grouping counts.")
        return section
    section.tables.append(Table(
        ["class id", "class", "slots", "filled", "assigned channels", "provenance rows", "sources resolved"],
        [[c["class_id"], c["name"], c["slots"], c["filled_slots"], c["assigned_count"], c["provenance_rows"],
          c["resolved_images"]] for c in summary["classes"]],
    ))
    section.figures += [
        Figure(page_dir / "fill_level.png", "Slots of each class written since training started (blue) versus "
               "slots still holding the initial random noise (grey)."),
        Figure(page_dir / "assigned_count.png", "Channels the Channel-wise Semantic Grouping sent to each class "
               "since training started (paper figure 6)."),
    ]
    return section


def _memory_slots(summary: dict, page_dir: Path) -> Section:
    grid = "{} x {}".format(*summary["token_grid"])
    section = Section("Stored channels per class slot", anchor="memory", paragraphs=[
        f"Each tile is one stored channel (an N-vector reshaped to the {grid} token grid, bilinearly upsampled, "
        "min-max normalised per channel, jet colour map: red high, blue low), above the unlabeled image it was "
        "taken from when known (paper figure 7). Labels: s = slot, it = training iteration, c = channel index in "
        "the source image's stage-4 tokens; written slots come first, most recent first."])
    for item in summary["classes"]:
        filled = "" if item["filled_slots"] is None else f": {item['filled_slots']} of {item['slots']} slots written"
        section.figures.append(Figure(page_dir / item["picture"], f"class {item['class_id']} '{item['name']}'{filled}"))
    return section


def _memory_image(item: dict, page_dir: Path) -> Section:
    section = Section(f"Image {Path(item['image']).name}", paragraphs=[
        "Top: stage-4 channels before the AllSpark module; bottom: the same channel indices after it (inference "
        "path, paper figure 5). Shown: the channels whose maps vary most before the module."])
    section.figures += [
        Figure(page_dir / item["features_picture"], f"{item['image']}: channels before / after AllSpark"),
        Figure(page_dir / item["attention_picture"], "Labeled-branch attention mass of each query channel on each "
               "class slot of the memory (training-time path, image resized to the training crop); rows sum to 1 "
               "over all classes."),
        Figure(page_dir / item["attention_bars_picture"],
               "Mean attention mass per class slot over all query channels."),
    ]
    return section


def write_memory_report(path: Path, summary: dict) -> Path:
    """Writes inspect-memory's index.html from its summary (the dict written to summary.json).

    Picture paths in `summary` are relative to the page's folder.
    """
    path = Path(path)
    page_dir = path.parent
    sections = [_memory_overview(summary), _memory_fill(summary, page_dir), _memory_slots(summary, page_dir)]
    sections += [_memory_image(item, page_dir) for item in summary["images"]]
    return write_page(path, f"Semantic Memory of {Path(summary['checkpoint']).name}", sections)
