"""`leukoscope models`: the architectures that can be trained, the shipped models and their cards."""

from __future__ import annotations

from typing import Any, Iterator, Optional

import typer
from rich.markup import escape

from leukoscope.cli._common import call_or_exit, flag
from leukoscope.pretrained import list_pretrained, model_card, pretrained_root
from leukoscope.progress import console


def models(
    pretrained: bool = flag(False, "--pretrained", help="List the trained models shipped in the package "
                            "(use them as pretrained:NAME)."),
    card: Optional[str] = typer.Option(None, "--card", metavar="NAME", help="Print the model card of shipped model "
                                       "NAME."),
) -> None:
    """List the models that can be trained (or, with --pretrained, the shipped trained ones)."""
    from rich.console import Console

    listing = Console(soft_wrap=True)  # the answer goes to stdout (to a pipe or a file), messages to stderr
    if card is not None:
        text = call_or_exit(model_card, card)
        # wrapped, not soft-wrapped: rich crops each Markdown bullet and table cell of a soft-wrapping
        # console to one line (the card's "research use only" never reached the reader)
        Console().print(_card_markdown(text))
        return
    if pretrained:
        shipped = call_or_exit(list_pretrained)
        if not shipped:
            console.print(f"no shipped models in this install ({pretrained_root()} holds none); train your own "
                          f"with `leukoscope train`, or retrain them with python bench/zoo.py")
            return
        listing.print(f"{'name':<20} {'task':<9} {'classes':>7} {'size':>9}  summary")
        for model in shipped:
            listing.print(f"{model.name:<20} {model.task:<9} {len(model.classes):>7} "
                          f"{model.size_bytes / 1e6:>6.1f} MB  {escape(model.summary)}")
        return
    from leukoscope.models import list_models, model_entry

    names = list_models()
    width = max(len(name) for name in names) + 1  # one column, however long the longest name
    for name in names:
        entry = model_entry(name)
        listing.print(f"{name:<{width}} {entry.kind:<11} {escape(entry.description)}")


def _card_markdown(text: str) -> Any:
    """A model card as rich Markdown whose tables never cut a cell: rich's tables end a cell that does not fit
    with "…", and at 80 columns the card's sources read "taleqani-b…" and "cnmc-all-o…". Each column gets at
    least its longest word, the room left goes to the columns with more to say, and cells wrap at spaces."""
    from rich.markdown import Markdown, TableElement

    class WholeWordsTable(TableElement):
        def __rich_console__(self, console: Any, options: Any) -> Iterator[Any]:
            for table in super().__rich_console__(console, options):
                _fit_columns(table, console, options)
                yield table

    class CardMarkdown(Markdown):
        elements = {**Markdown.elements, "table_open": WholeWordsTable}

    return CardMarkdown(text)


def _fit_columns(table: Any, console: Any, options: Any) -> None:
    """Set the widths of ``table``'s columns to fit ``options.max_width`` without breaking a word where the
    longest words of the columns fit side by side; else leave rich its widths, folding words (never "…")."""
    from rich.measure import Measurement

    for column in table.columns:
        column.overflow = "fold"  # a word wider than its column is broken over lines, not cut
    wide = options.update_width(10_000)  # natural widths, not yet clipped to the terminal's
    measured = [[Measurement.get(console, wide, cell) for cell in (column.header, *column.cells)]
                for column in table.columns]
    low = [max(m.minimum for m in cells) for cells in measured]  # the longest word of the column
    high = [max(m.maximum for m in cells) for cells in measured]  # its longest cell on one line
    room = options.max_width - (Measurement.get(console, wide, table).minimum - sum(low))  # less padding, rules
    if sum(low) > room:
        return
    # the room beyond the longest words, shared fairly: the columns that lack least get all of it first (a
    # number's header on one line), and the rest is split among the others (the long verdicts wrap)
    spare, widths = room - sum(low), list(low)
    order = sorted(range(len(low)), key=lambda i: high[i] - low[i])
    for done, index in enumerate(order):
        given = min(high[index] - low[index], spare // (len(order) - done))
        widths[index] += given
        spare -= given
    for column, width in zip(table.columns, widths):
        column.width = width
