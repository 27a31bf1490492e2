"""The OpenAPI 3.1 document of the server's API, served at ``/openapi.json``.

Written by hand, next to the code it describes, because the handlers parse JSON themselves
(:mod:`protocol`) rather than through a schema library. It is kept honest by tests: a unit test
validates it as OpenAPI 3.1, and schemathesis sends thousands of generated requests to a live
server and checks every status, header and body against it. The request schema names the
served model(s), so generated requests reach the model rather than stopping at a 404.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mlx_stack import __version__

from .apierror import ErrorKind
from .protocol import MAX_INPUTS, MAX_TOKEN_ID

Schema = dict[str, Any]

_SCHEMAS: dict[str, Schema] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type", "param", "code"],
                "properties": {
                    "message": {"type": "string", "description": "what happened, what to do"},
                    "type": {"type": "string", "enum": sorted({k.error_type for k in ErrorKind})},
                    "param": {"type": ["string", "null"], "description": "the field at fault"},
                    "code": {"type": ["string", "null"]},
                },
            }
        },
    },
    "Embedding": {
        "type": "object",
        "required": ["object", "index", "embedding"],
        "properties": {
            "object": {"const": "embedding"},
            "index": {"type": "integer", "minimum": 0},
            "embedding": {
                "oneOf": [
                    {"type": "array", "items": {"type": "number"}, "minItems": 1},
                    {
                        "type": "string",
                        "contentEncoding": "base64",
                        "description": "little-endian float32 bytes",
                    },
                ]
            },
        },
    },
    "EmbeddingResponse": {
        "type": "object",
        "required": ["object", "data", "model", "usage"],
        "properties": {
            "object": {"const": "list"},
            "data": {"type": "array", "items": {"$ref": "#/components/schemas/Embedding"}},
            "model": {"type": "string"},
            "usage": {
                "type": "object",
                "required": ["prompt_tokens", "total_tokens"],
                "properties": {
                    "prompt_tokens": {"type": "integer", "minimum": 0},
                    "total_tokens": {"type": "integer", "minimum": 0},
                },
            },
        },
    },
    "Model": {
        "type": "object",
        "required": ["id", "object", "created", "owned_by"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "model"},
            "created": {"type": "integer"},
            "owned_by": {"type": "string"},
            "aliases": {"type": "array", "items": {"type": "string"}},
            "ready": {"type": "boolean", "description": "whether /health is 200"},
            "architecture": {"type": "string"},
            "dimensions": {"type": "integer"},
            "matryoshka_dimensions": {"type": "array", "items": {"type": "integer"}},
            "max_seq_length": {"type": "integer"},
            "truncation": {"type": "boolean"},
            "pooling": {"enum": ["mean", "cls", "last"]},
            "normalize": {"type": "boolean"},
            "query_prefix": {"type": ["string", "null"]},
            "document_prefix": {"type": ["string", "null"]},
            "revision": {"type": ["string", "null"]},
            "content_sha256": {
                "type": ["string", "null"],
                "description": "SHA-256 over the weights, config.json and tokenizer.json",
            },
            "hashed_files": {"type": "array", "items": {"type": "string"}},
            "blas": {"type": "string", "description": "the BLAS the engine's products use"},
            "engine": {
                "enum": ["mlx", "onnx", None],
                "description": "what runs the encoder (null while loading)",
            },
            "engine_choice": {
                "type": ["object", "null"],
                "description": "why this engine: forced, Apple Silicon, unsupported by ONNX "
                "Runtime, or measured (short-query and batch ms per engine; cached per model, "
                "CPU and library versions)",
                "properties": {
                    "engine": {"enum": ["mlx", "onnx"]},
                    "reason": {"type": "string"},
                    "measured_ms": {"type": "object"},
                    "from_cache": {"type": "boolean"},
                    "key": {"type": ["string", "null"]},
                },
            },
            "blas_choice": {
                "type": ["object", "null"],
                "description": "why MLX got this BLAS library: MLX_STACK_BLAS set, only one found, "
                "or measured (each library's sgemm on this model's products: short-query and "
                "batch ms; cached per CPU, libraries and shapes); null on macOS",
                "properties": {
                    "library": {"type": "string"},
                    "path": {"type": ["string", "null"]},
                    "reason": {"type": "string"},
                    "measured_ms": {"type": "object"},
                    "skipped": {"type": "object"},
                    "shapes": {"type": "string"},
                    "from_cache": {"type": "boolean"},
                    "key": {"type": ["string", "null"]},
                },
            },
            "max_batch_tokens": {"type": "integer"},
            "batch_timeout_ms": {"type": "number"},
            "max_concurrent": {"type": "integer"},
        },
    },
    "ModelList": {
        "type": "object",
        "required": ["object", "data"],
        "properties": {
            "object": {"const": "list"},
            "data": {"type": "array", "items": {"$ref": "#/components/schemas/Model"}},
        },
    },
    "Health": {
        "type": "object",
        "required": ["status"],
        "properties": {
            "status": {"enum": ["ok", "loading", "failed"]},
            "reason": {"type": "string"},
        },
    },
}

_RETRY_AFTER = {
    "Retry-After": {
        "required": True,
        "description": "seconds to wait before retrying",
        "schema": {"type": "string", "pattern": "^[0-9]+$"},
    }
}

_ERRORS: dict[str, tuple[str, bool]] = {
    "400": ("malformed: not HTTP/1.1, not JSON, or a field out of range (the message names "
            "it and its limit)", False),
    "401": ("no or a wrong 'Authorization: Bearer' backend key, when the server was given one "
            "(as in a stack: MLX_STACK_BACKEND_KEY); every route but /health", False),
    "403": ("a Host that is not loopback nor in --allowed-hosts, or a web page's Origin not in "
            "--allowed-origins (no CORS headers)", False),
    "404": ("unknown model (code model_not_found) or route", False),
    "408": ("the request head (--header-timeout) or body (--body-timeout) came too slowly; "
            "the connection is closed", False),
    "413": ("body over the size limit (checked before it is read whole)", False),
    "429": ("more than --max-concurrent requests in progress (code overloaded)", True),
    "500": ("the model failed on this request", False),
    "503": ("the model is loading or failed to load (code loading), or more than "
            "--max-connections connections are open", True),
}


@dataclass(frozen=True)
class ModelLimits:
    """What the served model accepts, so that every request the document allows is served."""

    dimensions: tuple[int, int]
    """The smallest and largest ``dimensions`` (equal without Matryoshka sizes)."""
    vocab_size: int | None = None
    """Known once the model has loaded; until then any id up to ``MAX_TOKEN_ID``."""


def openapi_document(
    model_names: Sequence[str], max_body_bytes: int, limits: ModelLimits, task: str = "embed"
) -> dict[str, Any]:
    """The whole document; ``model_names`` are the served name and its aliases. A reranker
    (``task`` rerank) serves ``/v1/rerank`` instead of ``/v1/embeddings``."""
    top_id = MAX_TOKEN_ID if limits.vocab_size is None else limits.vocab_size - 1
    token_ids = {
        "type": "array",
        "minItems": 1,
        "items": {"type": "integer", "minimum": 0, "maximum": top_id},
        "description": "token ids of the served model's tokenizer, taken as given (no special "
        "tokens added); ids outside its vocabulary are a 400",
    }
    text = {"type": "string", "minLength": 1}
    texts = {"type": "array", "minItems": 1, "maxItems": MAX_INPUTS, "items": text}
    smallest, full = limits.dimensions
    request = {
        "type": "object",
        "required": ["model", "input"],
        "properties": {
            "model": {"enum": list(model_names), "description": "the served name or an alias"},
            "input": {
                "oneOf": [
                    text,
                    texts,
                    token_ids,
                    {"type": "array", "minItems": 1, "maxItems": MAX_INPUTS, "items": token_ids},
                ],
                "description": "a text, texts, one token array, or token arrays; text must be "
                "valid Unicode (no unpaired surrogates). Inputs longer than the model's maximum "
                "are cut (reported in x-mlx-stack-truncated-inputs), or refused with "
                "--no-truncate",
            },
            "encoding_format": {
                "enum": ["float", "base64", None],
                "default": "float",
                "description": "base64: little-endian float32 bytes, as OpenAI",
            },
            "dimensions": {
                "type": ["integer", "null"],
                "minimum": smallest,
                "maximum": full,
                "description": "a shorter vector, for Matryoshka models: from the smallest "
                "trained size to the full one (a model without Matryoshka sizes takes only its "
                "full size)",
            },
            "embedding_type": {
                "enum": ["float", "int8", "uint8", "binary", "ubinary", None],
                "default": "float",
                "description": "extension: quantised vectors for a fast first pass (int8/uint8 "
                "by a fixed calibration, binary/ubinary as packed sign bits: ceil(d/8) values); "
                "integers in JSON, their float32 values in base64",
            },
            "input_type": {
                "enum": ["query", "document", None],
                "description": "extension: prepend the model's query or document prefix",
            },
            "user": {"description": "accepted and ignored"},
        },
        "additionalProperties": True,
    }
    embed = {
        "summary": "Create embeddings (OpenAI-compatible)",
        "requestBody": {
            "required": True,
            "description": f"JSON, at most {max_body_bytes} bytes; any Content-Type is read as "
            "JSON (curl -d sends a form type)",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Request"}}},
        },
        "responses": {
            "200": {
                "description": "one vector per input, in input order",
                "headers": {
                    "x-mlx-stack-truncated-inputs": {
                        "description": "how many inputs were cut to the model's maximum "
                        "length (absent when none were)",
                        "schema": {"type": "string", "pattern": "^[0-9]+$"},
                    }
                },
                "content": _json("EmbeddingResponse"),
            },
            **_errors("400", "401", "403", "404", "408", "413", "429", "500", "503"),
        },
    }
    paths: dict[str, Any] = {
        path: {"post": {**embed, "operationId": f"createEmbedding{i or ''}"}}
        for i, path in enumerate(("/v1/embeddings", "/embeddings"))
    }
    schemas: dict[str, Schema] = {**_SCHEMAS, "Request": request}
    if task == "rerank":
        paths = _rerank_paths(max_body_bytes)
        schemas = {**_SCHEMAS, **_rerank_schemas(model_names)}
    paths["/v1/models"] = {
        "get": _get("listModels", "The served model", _json("ModelList")),
    }
    paths["/v1/models/{model_id}"] = {
        "parameters": [
            {"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}
        ],
        "get": _get("retrieveModel", "The served model by name or alias", _json("Model"), "404"),
    }
    paths["/health"] = {
        "get": {
            **_get("health", "200 only after a real forward pass succeeded", _json("Health")),
            "responses": {
                "200": {"description": "ready", "content": _json("Health")},
                "503": {
                    "description": "loading, or failed to load (the process then exits); or "
                    "more than --max-connections connections are open (an error body)",
                    "headers": _RETRY_AFTER,
                    "content": {
                        "application/json": {
                            "schema": {
                                "anyOf": [
                                    {"$ref": "#/components/schemas/Health"},
                                    {"$ref": "#/components/schemas/Error"},
                                ]
                            }
                        }
                    },
                },
                **_errors("400", "403", "408"),
            },
        }
    }
    paths["/metrics"] = {
        "get": _get(
            "metrics",
            "Prometheus text format 0.0.4",
            {"text/plain": {"schema": {"type": "string"}}},
        )
    }
    paths["/openapi.json"] = {
        "get": _get("openapi", "This document", {"application/json": {"schema": {}}})
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "mlx-stack embeddings server",
            "version": __version__,
            "description": "OpenAI-compatible embeddings for one local model. Every error "
            "has OpenAI's shape. Before any route: a Host that is not a loopback name or "
            "address (any port) nor in --allowed-hosts is a 403; a request carrying an Origin "
            "is a 403 (with no CORS headers) unless the origin is in --allowed-origins. Allowed "
            "origins get Access-Control-Allow-Origin on every answer, and their CORS preflight "
            "(OPTIONS with Origin and Access-Control-Request-Method, on any path) is a 204 "
            "allowing GET and POST and the headers asked for, cached 600 s. OPTIONS without "
            "an Origin is a 405, like any method a path does not take.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "responses": {
                code: {
                    "description": text,
                    **({"headers": _RETRY_AFTER} if retry else {}),
                    "content": _json("Error"),
                }
                for code, (text, retry) in _ERRORS.items()
            },
        },
    }


def _json(name: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}


def _errors(*codes: str) -> dict[str, Any]:
    return {code: {"$ref": f"#/components/responses/{code}"} for code in codes}


def _get(operation: str, summary: str, content: dict[str, Any], *codes: str) -> dict[str, Any]:
    return {
        "operationId": operation,
        "summary": summary,
        "responses": {
            "200": {"description": summary, "content": content},
            **_errors("400", "403", *codes, "408", "503"),
        },
    }


RERANK_PATHS = ("/v1/rerank", "/rerank", "/v2/rerank")


def _rerank_paths(max_body_bytes: int) -> dict[str, Any]:
    operation = {
        "summary": "Rerank documents for a query (Cohere-compatible)",
        "requestBody": {
            "required": True,
            "description": f"JSON, at most {max_body_bytes} bytes",
            "content": _json("RerankRequest"),
        },
        "responses": {
            "200": {
                "description": "results best first, each with its document's index",
                "headers": {
                    "x-mlx-stack-truncated-inputs": {
                        "description": "how many (query, document) pairs were cut to the "
                        "model's maximum length (documents first)",
                        "schema": {"type": "string", "pattern": "^[0-9]+$"},
                    }
                },
                "content": _json("RerankResponse"),
            },
            **_errors("400", "401", "403", "404", "408", "413", "429", "500", "503"),
        },
    }
    return {path: {"post": {**operation, "operationId": f"rerank{i or ''}"}}
            for i, path in enumerate(RERANK_PATHS)}  # fmt: skip


def _rerank_schemas(model_names: Sequence[str]) -> dict[str, Schema]:
    from .rerank import MAX_DOCUMENTS

    text = {"type": "string"}
    document = {"oneOf": [text, {"type": "object", "required": ["text"],
                                 "properties": {"text": text}}]}  # fmt: skip
    positive = {"type": ["integer", "null"], "minimum": 1}
    flag = {"type": ["boolean", "null"]}
    return {
        "RerankRequest": {
            "type": "object",
            "required": ["model", "query", "documents"],
            "properties": {
                "model": {"enum": list(model_names), "description": "the served name or an alias"},
                "query": {"type": "string", "minLength": 1},
                "documents": {"type": "array", "minItems": 1, "maxItems": MAX_DOCUMENTS,
                              "items": document,
                              "description": "texts must be valid Unicode"},
                "top_n": {**positive, "description": "return only the best n"},
                "return_documents": {**flag, "description": "echo each document (default false)"},
                "max_tokens_per_doc": {**positive, "description": "cut each document to this "
                                       "many tokens"},
                "raw_scores": {**flag, "description": "extension: the logit instead of the "
                               "relevance probability (its sigmoid)"},
            },
            "additionalProperties": True,
        },
        "RerankResponse": {
            "type": "object",
            "required": ["id", "results", "meta"],
            "properties": {
                "id": {"type": "string"},
                "model": {"type": "string"},
                "results": {"type": "array", "items": {
                    "type": "object",
                    "required": ["index", "relevance_score"],
                    "properties": {
                        "index": {"type": "integer", "minimum": 0},
                        "relevance_score": {"type": "number"},
                        "document": {"type": "object", "properties": {"text": text}},
                    },
                }},
                "meta": {"type": "object"},
                "usage": {"type": "object"},
            },
        },
    }  # fmt: skip
