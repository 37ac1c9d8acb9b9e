"""The TensorFlow Serving REST API, as plain functions of JSON and numpy (no Ray, no TensorFlow): which endpoint a
path names, a predict request read into one float32 batch or a `BadRequest` saying what is wrong, and the bodies of
the answers (predict, model status, metadata, errors), in TF Serving's format so that its clients work unchanged.

  POST /v1/models/<name>[/versions/1]:predict   {"instances": [...]} -> {"predictions": [...]}  (row format)
                                                {"inputs": ...}      -> {"outputs": [...]}      (columnar format)
  GET  /v1/models/<name>[/versions/1]           status
  GET  /v1/models/<name>[/versions/1]/metadata  the signature: input and output names, dtypes, shapes

An instance is one example in the shape the model takes ([8, 8, 1] for digits) or its values flat, in row-major
order (the 64 values of a digit); with a single input it may also be an object {"<input name>": example}.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

import numpy as np

VERSION = "1"   # one model per server: TF Serving's version number of it
SIGNATURE = "serving_default"
_MODEL_PATH = re.compile(r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>[^/:]+))?"
                         r"(?:(?P<metadata>/metadata)|:(?P<verb>[a-z]+))?/?$")


class BadRequest(Exception):
    """A request the server refuses: HTTP `status` with {"error": message}."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple     # one example's shape (the batch dimension left out)
    dtype: str = "float32"

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def describe(self) -> str:
        return f"{self.name!r} {self.dtype} {list((-1, *self.shape))}"


@dataclass(frozen=True)
class Signature:
    """What the served model takes and gives (the first stage's input, the last stage's output)."""
    input: Tensor
    output: Tensor

    def to_dict(self) -> dict:
        return {"input": vars(self.input), "output": vars(self.output)}

    @classmethod
    def from_dict(cls, d: dict) -> "Signature":
        return cls(*(Tensor(t["name"], tuple(t["shape"]), t["dtype"]) for t in (d["input"], d["output"])))


@dataclass(frozen=True)
class Endpoint:
    kind: str        # predict | status | metadata
    name: str


def endpoint(method: str, path: str, served: str) -> Endpoint:
    """The TF Serving endpoint a request names, or BadRequest (404 for an unknown model or path, 405 for a method)."""
    m = _MODEL_PATH.match(path)
    if not m:
        raise BadRequest(f"no endpoint {path}; use POST /v1/models/{served}:predict, GET /v1/models/{served}, "
                         f"GET /v1/models/{served}/metadata, GET /healthz, /readyz or /stages", 404)
    if m["name"] != served:
        raise BadRequest(f"Servable not found for request: Latest({m['name']}); this server serves {served!r}", 404)
    if m["version"] not in (None, VERSION):
        raise BadRequest(f"Servable not found for request: Specific({m['name']}, {m['version']}); version {VERSION} "
                         "is the one served", 404)
    if m["verb"]:
        if m["verb"] != "predict":
            raise BadRequest(f"only :predict is served (the model's signature is predict), not :{m['verb']}", 404)
        kind, allowed = "predict", "POST"
    else:
        kind, allowed = ("metadata" if m["metadata"] else "status"), "GET"
    if method != allowed:
        raise BadRequest(f"{path} takes {allowed}, not {method}", 405)
    return Endpoint(kind, m["name"])


@dataclass
class Batch:
    examples: np.ndarray    # float32 [n, *input shape]
    columnar: bool          # the request used "inputs": the answer is {"outputs": ...}


def parse_predict(body: bytes, signature: Signature, limit: int) -> Batch:
    """A predict request's examples, checked against the model's signature; BadRequest names what is wrong."""
    try:
        request = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f'the request body is not JSON ({exc}); send {{"instances": [...]}}') from None
    if not isinstance(request, dict):
        raise BadRequest(f'the request body must be a JSON object such as {{"instances": [...]}}, got '
                         f"{type(request).__name__}")
    unknown = sorted(set(request) - {"instances", "inputs", "signature_name"})
    if unknown or ("instances" in request) == ("inputs" in request):
        got = ", ".join(map(repr, request)) or "none"
        raise BadRequest(f'the request body needs exactly one of "instances" (row format) or "inputs" (columnar '
                         f'format), and optionally "signature_name"; got keys {got}')
    if request.get("signature_name", SIGNATURE) != SIGNATURE:
        raise BadRequest(f"signature_name {request['signature_name']!r} is not served; use {SIGNATURE!r} or leave it out")
    columnar = "inputs" in request
    values = request["inputs"] if columnar else request["instances"]
    examples = _examples(_unnamed(values, signature.input, columnar), signature.input,
                         "inputs" if columnar else "instances")
    if len(examples) > limit:
        raise BadRequest(f"{len(examples)} instances in one request, more than serve.max_request_instances={limit}; "
                         "send them in several requests")
    return Batch(examples, columnar)


def _unnamed(values, tensor: Tensor, columnar: bool):
    """Values given by input name ({"<name>": ...}, per instance or for the whole batch) without the name."""
    named = [values] if columnar else values if isinstance(values, list) else []
    if not any(isinstance(v, dict) for v in named):
        return values
    if not all(isinstance(v, dict) and set(v) == {tensor.name} for v in named):
        keys = sorted({k for v in named if isinstance(v, dict) for k in v})
        raise BadRequest(f"named inputs must use the model's one input name {tensor.name!r}, got {keys}")
    return values[tensor.name] if columnar else [v[tensor.name] for v in values]


def _examples(values, tensor: Tensor, key: str) -> np.ndarray:
    expected = f"each instance is {list(tensor.shape)} (or its {tensor.size} values flat); the model's input is " \
               f"{tensor.describe()}"
    if not isinstance(values, list):
        raise BadRequest(f'"{key}" must be a list of instances, got {type(values).__name__}; {expected}')
    if not values:
        raise BadRequest(f'"{key}" is empty: send at least one instance; {expected}')
    try:
        array = np.array(values)
    except ValueError:
        raise BadRequest(f'"{key}" are not a regular array (instances of different shapes); {expected}') from None
    if array.dtype.kind not in "iuf":
        found = "true/false" if array.dtype.kind == "b" else "strings" if array.dtype.kind == "U" else "non-numbers"
        raise BadRequest(f'"{key}" hold {found}; the model takes {tensor.dtype} numbers: {expected}')
    if array.shape[1:] == (tensor.size,):
        array = array.reshape((len(array), *tensor.shape))
    if array.shape[1:] != tensor.shape:
        raise BadRequest(f"an instance has shape {list(array.shape[1:])}; {expected}")
    return array.astype(tensor.dtype)


def predict_body(outputs: np.ndarray, columnar: bool) -> dict:
    """float32 values become JSON numbers that read back to the same float32 (Python floats are exact for them)."""
    return {"outputs" if columnar else "predictions": outputs.tolist()}


def status_body() -> dict:
    return {"model_version_status": [{"version": VERSION, "state": "AVAILABLE",
                                      "status": {"error_code": "OK", "error_message": ""}}]}


def metadata_body(name: str, signature: Signature) -> dict:
    def spec(t: Tensor) -> dict:
        dims = [{"size": str(d), "name": ""} for d in (-1, *t.shape)]
        return {t.name: {"dtype": _DT.get(t.dtype, "DT_" + t.dtype.upper()), "tensor_shape": {"dim": dims, "unknown_rank": False},
                         "name": f"{SIGNATURE}_{t.name}:0"}}
    definition = {"inputs": spec(signature.input), "outputs": spec(signature.output),
                  "method_name": "tensorflow/serving/predict"}
    return {"model_spec": {"name": name, "signature_name": "", "version": VERSION},
            "metadata": {"signature_def": {"signature_def": {SIGNATURE: definition}}}}


_DT = {"float32": "DT_FLOAT", "float64": "DT_DOUBLE", "float16": "DT_HALF", "bfloat16": "DT_BFLOAT16"}   # TF's names


def error_body(message: str) -> dict:
    return {"error": message}
