"""The markdown table every benchmark prints its results as.

BENCHMARKS.md quotes each script's table as printed, so the scripts share one printer
and print the same shape: a header line, a separator, one line per row. Cells are
printed with str(); the callers format their numbers themselves (f'{x:.1f}'), each
table its own way.

Defines no flags: the benchmark scripts import one another, and absl flags defined twice
clash.
"""
from typing import Iterable, Sequence


def print_header(columns: Sequence[str]) -> None:
  """Prints the table's header line and its separator.

  Args:
    columns: the column titles, left to right.
  """
  print('| ' + ' | '.join(columns) + ' |')
  print('|' + '---|' * len(columns))


def print_row(cells: Sequence) -> None:
  """Prints one row, flushed at once: rows measured minutes apart show as they come.

  Args:
    cells: the row's cells, left to right, as many as the header's columns; each is
      printed with str().
  """
  print('| ' + ' | '.join(str(c) for c in cells) + ' |', flush=True)


def print_table(columns: Sequence[str], rows: Iterable[Sequence]) -> None:
  """Prints the header, the separator and one line per row.

  Args:
    columns: the column titles, left to right.
    rows: the rows' cells (print_row); a generator's rows print as it yields them.
  """
  print_header(columns)
  for row in rows:
    print_row(row)
