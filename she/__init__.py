"""SHE: privacy-preserving neural-network inference on encrypted data.

Typical use::

    import she
    model = she.load("model.she.onnx")
    plan = she.compile(model, calibration=samples)
    server = she.Server(plan)                       # model owner / MLaaS side
    client = she.Client(plan.spec())                # holds the secret key
    keys = server.load_context(client.public_context())
    logits = client.decrypt(server.evaluate(keys, client.encrypt(images)))
"""

from .client import Client
from .errors import (
    DataError,
    FormatError,
    ModelError,
    ParameterError,
    SecurityError,
    SheError,
    UnsupportedOperatorError,
)
from .frontend.model import Model, load
from .plan.compiler import Plan, compile
from .server import EvaluationKeys, Server

__version__ = "0.1.0"

__all__ = [
    "Client", "DataError", "EvaluationKeys", "FormatError", "Model", "ModelError",
    "ParameterError", "Plan", "SecurityError", "Server", "SheError",
    "UnsupportedOperatorError", "compile", "load",
]
