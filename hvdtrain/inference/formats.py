"""How predictions are written, by the output's suffix: .npy, .csv or .jsonl. Rows are written per batch by each
rank (into its part file); the header, which needs the total row count, is written by rank 0 at the merge.

Fields (per task, see tasks.Task.output_fields): `class` (int), `name` (the class's name), `probs` (a float per
class), `labels` (0/1 per class, multilabel), `value` (regression outputs). Vector fields become columns
`<field>_<i>` in CSV and lists in JSONL; in .npy one field is a plain array, several a structured array.
"""
from __future__ import annotations

import io

import numpy as np

_FLOAT = "%.9g"   # enough digits to read back the exact float32
COLUMN = {"probs": "prob", "labels": "label", "value": "value"}   # CSV columns prob_0, prob_1, ...


class Format:
    def __init__(self, fields: tuple, widths: dict, name_width: int = 1):
        self.fields, self.widths, self.name_width = fields, widths, name_width   # widths: field -> values per row

    def header(self, total: int) -> bytes:
        return b""

    def _dtype(self, field):
        if field == "name":
            return np.dtype(f"<U{self.name_width}")
        return np.dtype("<i8") if field in ("class", "labels") else np.dtype("<f4")

    def _shape(self, field) -> tuple:
        return () if field in ("class", "name") else (self.widths[field],)


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

    def rows(self, first: int, values: dict) -> bytes:
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

    def rows(self, first, values):
        n = len(next(iter(values.values())))
        lines = []
        for i in range(n):
            cells = [str(first + i)]
            for f in self.fields:
                v = values[f][i]
                cells += [_cell(f, v)] if not self._shape(f) else [_cell(f, x) for x in v]
            lines.append(",".join(cells) + "\n")
        return "".join(lines).encode()


class Jsonl(Format):
    def rows(self, first, values):
        import json
        n = len(next(iter(values.values())))
        lines = []
        for i in range(n):
            cells = [f'"index": {first + i}']
            for f in self.fields:
                v = values[f][i]
                text = json.dumps(str(v)) if f == "name" else _cell(f, v) if not self._shape(f) else \
                    "[" + ", ".join(_cell(f, x) for x in v) + "]"
                cells.append(f'"{f}": {text}')
            lines.append("{" + ", ".join(cells) + "}\n")
        return "".join(lines).encode()


def _cell(field, value) -> str:
    if field == "name":
        return str(value).replace(",", " ")
    return str(int(value)) if field in ("class", "labels") else _FLOAT % float(value)


FORMATS = {".npy": Npy, ".csv": Csv, ".jsonl": Jsonl}
