"""What an uploaded training file must be: JSON Lines, one row per line in a format the job reads
(chat `messages`, `prompt` + `completion`, `question` + `answer`, or `text`), checked line by line
with the job's own rules (carryon_ray.data.parse_line and row_problem). A file over its caps
answers 413; one with too many bad lines answers 400 naming the first of them by line and field; a
file with a few bad lines is kept, and its record says which lines a job will skip."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from carryon_ray.data import detect_format, parse_line, row_problem

PURPOSES = ("fine-tune", "user_data")  # files a job may read; OpenAI's other purposes (batch, vision...) do not apply
SHOWN = 5  # bad lines named in a message


class FileRejected(ValueError):
    """Why an upload is refused: status (400 / 413), message, code."""

    def __init__(self, status: int, message: str, code: str = "invalid_training_file"):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


@dataclass
class FileCheck:
    rows: int = 0
    bad: list[tuple[int, str]] = field(default_factory=list)  # (line number, why)
    formats: Counter = field(default_factory=Counter)

    @property
    def bad_fraction(self) -> float:
        return len(self.bad) / self.rows if self.rows else 1.0

    def lines(self, n: int = SHOWN) -> str:
        shown = "; ".join(f"line {ln}: {why}" for ln, why in self.bad[:n])
        more = len(self.bad) - n
        return shown + (f"; and {more} more" if more > 0 else "")

    def info(self) -> dict:
        return {"rows": self.rows, "bad_rows": len(self.bad), "formats": dict(self.formats),
                "bad_lines": [[ln, why] for ln, why in self.bad[:20]]}


REASONS = {"bad_encoding": "not UTF-8", "bad_json": "not valid JSON", "not_an_object": "not a JSON object"}


def check_file(content: bytes, max_rows: int, max_bad_fraction: float) -> FileCheck:
    """Every line of `content` checked; FileRejected when the file cannot train a job."""
    check = FileCheck()
    for number, raw in enumerate(content.splitlines(), start=1):
        if not raw.strip():
            continue
        check.rows += 1
        if check.rows > max_rows:
            raise FileRejected(413, f"the file has more than {max_rows} rows (finetune.max_file_rows)",
                               "file_too_large")
        row, reason = parse_line(raw, text_file=False)
        why = REASONS.get(reason) if reason else row_problem(row)
        if why:
            check.bad.append((number, why))
        else:
            check.formats[detect_format(row)] += 1
    if not check.rows:
        raise FileRejected(400, "the file has no rows: give JSON Lines, one training example per line")
    if check.bad_fraction > max_bad_fraction:
        raise FileRejected(400, f"{len(check.bad)} of {check.rows} rows cannot train (over "
                           f"{max_bad_fraction:.0%}): {check.lines()}")
    if len(check.formats) > 1:
        raise FileRejected(400, f"rows mix formats {dict(check.formats)}: use one format per file")
    return check
