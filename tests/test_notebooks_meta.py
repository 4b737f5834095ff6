"""Checks on how the tutorial's notebooks are stored and shaped.

nbval (configured in pyproject.toml) runs every notebook and compares each
cell's output with the stored one. These checks cover what a run cannot
see: that each notebook was stored from one clean top-to-bottom run, and
that each keeps the tutorial's shape: a title that says what it teaches,
an exercise with a solution, an ending that closes what it opened and
says what to read next, and errors stored only where they are meant.
"""

import pathlib
import re

import nbformat
import pytest

FOLDER = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(FOLDER.glob("*.ipynb"))

# Calls that start something a notebook must stop before it ends.
OPENS = re.compile(r"\b(LocalCluster|SSHCluster|Client|Popen)\(")
# Ways of stopping it: close(), terminate(), dropping the names, or a
# `with` block, which closes on leaving it.
CLOSES = re.compile(r"\.close\(\)|\.terminate\(\)|^\s*del |^\s*with ",
                    re.MULTILINE)


@pytest.fixture(params=NOTEBOOKS, ids=[path.name for path in NOTEBOOKS])
def notebook(request):
    return nbformat.read(request.param, as_version=4)


def code_cells(notebook):
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def tags(cell):
    return cell.metadata.get("tags", [])


def headings(cell):
    return [line for line in cell.source.splitlines() if line.startswith("#")]


def test_the_tutorial_has_its_first_notebooks():
    names = [path.name for path in NOTEBOOKS]
    for name in ["01-local-clusters.ipynb", "02-clients-and-discovery.ipynb",
                 "03-logs.ipynb"]:
        assert name in names


def test_names_are_numbered_in_reading_order():
    numbers = []
    for path in NOTEBOOKS:
        match = re.fullmatch(r"(\d\d)-[a-z0-9-]+\.ipynb", path.name)
        assert match, f"{path.name}: name it NN-words-with-dashes.ipynb"
        numbers.append(match.group(1))
    assert len(numbers) == len(set(numbers)), "two notebooks share a number"


def test_stored_from_one_clean_run(notebook):
    cells = code_cells(notebook)
    counts = [cell.execution_count for cell in cells]
    assert counts == list(range(1, len(cells) + 1)), (
        "execution counts must be 1, 2, 3, ... with no gaps: run the "
        "notebook top to bottom in a fresh kernel and store that run")
    for cell in cells:
        for output in cell.outputs:
            if output.output_type == "execute_result":
                assert output.execution_count == cell.execution_count


def test_opens_with_a_title_and_what_it_teaches(notebook):
    first = notebook.cells[0]
    assert first.cell_type == "markdown"
    lines = first.source.strip().splitlines()
    assert lines[0].startswith("# "), "the first line is the title"
    assert len(" ".join(lines[1:]).split()) >= 20, (
        "under the title, say what the notebook teaches")


def test_has_an_exercise_with_a_solution_that_runs(notebook):
    cells = notebook.cells
    starts = [i for i, cell in enumerate(cells) if cell.cell_type == "markdown"
              and any("Exercise" in line for line in headings(cell))]
    assert starts, "no markdown heading names an exercise"
    rest = cells[starts[0] + 1:]

    blank = next((i for i, cell in enumerate(rest) if cell.cell_type == "code"
                  and "your code here" in cell.source), None)
    assert blank is not None, "no '# your code here' cell after the exercise"
    assert rest[blank].source.strip().startswith("#"), (
        "the exercise cell holds only a '# your code here' comment")
    assert not rest[blank].outputs

    solution = next((i for i, cell in enumerate(rest) if i > blank
                     and cell.cell_type == "markdown"
                     and any("Solution" in line for line in headings(cell))),
                    None)
    assert solution is not None, "no 'Solution' heading after the exercise"
    answer = next((cell for cell in rest[solution + 1:]
                   if cell.cell_type == "code"), None)
    assert answer is not None and answer.source.strip(), "no solution cell"
    assert answer.execution_count is not None, "the solution was not run"


def test_ends_by_closing_what_it_opened(notebook):
    cells = code_cells(notebook)
    if not any(OPENS.search(cell.source) for cell in cells):
        return
    assert any(CLOSES.search(cell.source) for cell in cells[-3:]), (
        "one of the last three code cells should close the clients and "
        "clusters (or stop the processes) the notebook started")


def test_ends_with_what_to_read_next(notebook):
    last = notebook.cells[-1]
    assert last.cell_type == "markdown"
    assert re.search(r"\bnext\b", last.source, re.IGNORECASE)


def test_errors_are_stored_only_where_they_are_meant(notebook):
    for cell in code_cells(notebook):
        failed = any(o.output_type == "error" for o in cell.outputs)
        expected = "raises-exception" in tags(cell)
        assert failed == expected, (
            f"cell {cell.execution_count}: an error is stored only in a "
            f"cell tagged raises-exception, and such a cell stores one\n"
            f"{cell.source}")


def test_outputs_left_uncompared_say_why(notebook):
    for cell in code_cells(notebook):
        if "nbval-ignore-output" in tags(cell):
            assert cell.source.lstrip().startswith("#"), (
                f"cell {cell.execution_count} is tagged nbval-ignore-output:"
                f" open it with a comment that says why\n{cell.source}")
