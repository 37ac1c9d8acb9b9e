"""How predictions are written, by the output's suffix: .npy, .csv or .jsonl. Rows are written per batch by each
rank (into its part file); the header, which needs the total row count, is written by rank 0 at the merge.

Fields (per task, see tasks.Task.output_fields): `class` (int), `name` (the class's name), `probs` (a float per
class), `labels` (0/1 per class, multilabel), `value` (regression outputs); for image inputs also `path` (the
image's file). Vector fields become columns `<field>_<i>` in CSV and lists in JSONL; in .npy one field is a plain
array, several a structured array. CSV and JSONL rows start with `index`, the input's position among the listed
inputs (a file left out by data.bad_files=skip keeps its number and has no row).
"""
from __future__ import annotations

import io

import numpy as np

_FLOAT = "%.9g"   # enough digits to read back the exact float32
COLUMN = {"probs": "prob", "labels": "label", "value": "value"}   # CSV columns prob_0, prob_1, ...


TEXT = ("name", "path")


class Format:
    def __init__(self, fields: tuple, widths: dict):
        self.fields, self.widths = fields, widths   # widths: values per row, or characters of a text field

    def header(self, total: int) -> bytes:
        return b""

    def _dtype(self, field):
        if field in TEXT:
            return np.dtype(f"<U{self.widths[field]}")
        return np.dtype("<i8") if field in ("class", "labels") else np.dtype("<f4")

    def _shape(self, field) -> tuple:
        return () if field in ("class", *TEXT) else (self.widths[field],)


class Npy(Format):
    def _array_dtype(self):
        if len(self.fields) == 1:
            return self._dtype(self.fields[0]), self._shape(self.fields[0])
        return np.dtype([(f, self._dtype(f), self._shape(f)) for f in self.fields]), ()

    def header(self, total):
        dtype, inner = self._array_dtype()
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                                                   "shape": (total, *inner)})
        return buf.getvalue()

    def rows(self, index, values: dict) -> bytes:
        dtype, _ = self._array_dtype()
        if dtype.names is None:
            return np.ascontiguousarray(values[self.fields[0]], dtype=dtype).tobytes()
        n = len(next(iter(values.values())))
        out = np.empty(n, dtype)
        for f in self.fields:
            out[f] = values[f]
        return out.tobytes()


class Csv(Format):
    def header(self, total):
        columns = ["index"]
        for f in self.fields:
            columns += [f] if not self._shape(f) else [f"{COLUMN[f]}_{i}" for i in range(self.widths[f])]
        return (",".join(columns) + "\n").encode()

    def rows(self, index, values):
        lines = []
        for i, position in enumerate(index):
            cells = [str(position)]
            for f in self.fields:
                v = values[f][i]
                cells += [_cell(f, v)] if not self._shape(f) else [_cell(f, x) for x in v]
            lines.append(",".join(cells) + "\n")
        return "".join(lines).encode()


class Jsonl(Format):
    def rows(self, index, values):
        import json
        lines = []
        for i, position in enumerate(index):
            cells = [f'"index": {position}']
            for f in self.fields:
                v = values[f][i]
                text = json.dumps(str(v)) if f in TEXT else _cell(f, v) if not self._shape(f) else \
                    "[" + ", ".join(_cell(f, x) for x in v) + "]"
                cells.append(f'"{f}": {text}')
            lines.append("{" + ", ".join(cells) + "}\n")
        return "".join(lines).encode()


def _cell(field, value) -> str:
    if field in TEXT:   # quoted as CSV readers expect when it holds a comma, quote or line break
        text = str(value)
        return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\n\r') else text
    return str(int(value)) if field in ("class", "labels") else _FLOAT % float(value)


FORMATS = {".npy": Npy, ".csv": Csv, ".jsonl": Jsonl}
