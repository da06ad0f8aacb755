"""The OpenAPI description of the public API, generated from the same pydantic models that validate requests
(so the published schema and the validation cannot drift apart). Served at GET /openapi.json."""

from __future__ import annotations

from neurond.api.schemas import ChatCompletionRequest, CompletionRequest

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["message", "type", "param", "code"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}},
}


def _error(description: str) -> dict:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _generation(operation_id: str, summary: str, schema: str, bad: str) -> dict:
    """A POST that generates (chat or completions): the same engine, so the same responses."""
    return {
        "post": {
            "operationId": operation_id,
            "summary": summary,
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{schema}"}}}},
            "responses": {
                "200": {"description": "the completion (JSON), or an event stream when stream is true",
                        "content": {"application/json": {"schema": {"type": "object"}},
                                    "text/event-stream": {"schema": {"type": "string"}}}},
                "400": _error(bad),
                "401": _error("missing or wrong API token"),
                "408": _error("the request body did not arrive in time"),
                "413": _error("request body too large"),
                "415": _error("content type is not application/json"),
                "429": _error("too many concurrent requests"),
                "500": _error("a rank failed while serving this request (retriable)"),
                "503": _error("model not ready, recovering, or overloaded; or too many open connections "
                              "(Retry-After)"),
                "504": _error("a rank stopped answering while serving this request (retriable)"),
            },
        }
    }


def openapi_spec(model_name: str, with_auth: bool) -> dict:
    components: dict = {}
    for model in (ChatCompletionRequest, CompletionRequest):
        request_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(request_schema.pop("$defs", {}))
        request_schema["properties"]["model"]["enum"] = [model_name]
        components[model.__name__] = request_schema
    components["Error"] = _ERROR
    chat = _generation("createChatCompletion",
                       "Create a chat completion (stream: true for server-sent events ending in [DONE])",
                       "ChatCompletionRequest", "invalid request: schema, unknown model, context window, memory")
    completions = _generation(
        "createCompletion",
        "Create a completion of a raw prompt, string or token ids, no chat template (legacy completions API; "
        "stream: true for server-sent events ending in [DONE])",
        "CompletionRequest", "invalid request: schema, unknown model, context window, a token id outside the "
        "vocabulary; suffix, best_of > 1 or a batch of prompts (not supported)")

    def simple(description: str) -> dict:
        return {"description": description, "content": {"application/json": {"schema": {"type": "object"}}}}

    spec: dict = {
        "openapi": "3.1.0",
        "info": {"title": "neurond", "version": "1",
                 "description": "OpenAI-compatible chat completions and (legacy) completions"},
        "paths": {
            "/v1/chat/completions": chat,
            "/v1/completions": completions,
            "/v1/models": {"get": {"operationId": "listModels", "summary": "The one served model",
                                   "responses": {"200": simple("a list holding the served model"),
                                                 "401": _error("missing or wrong API token")}}},
            "/health": {"get": {"operationId": "health", "summary": "Liveness: the leader process answers",
                                "responses": {"200": simple('{"status": "ok"} while the leader is alive')}}},
            "/ready": {"get": {"operationId": "ready", "summary": "Readiness: the model can serve now",
                               "responses": {"200": simple("ready: state healthy and the model's name"),
                                             "503": simple("not ready: the lifecycle `state` and its `cause` "
                                                           "(`reason`: the cause again, kept for clients that "
                                                           "read it), with Retry-After; the cause's detail only "
                                                           "in the journal and the admin status")}}},
            "/metrics": {"get": {"operationId": "metrics", "summary": "Prometheus metrics (text exposition format)",
                                 "responses": {"200": {"description": "every metric (docs/operator-guide.md)",
                                                       "content": {"text/plain": {"schema": {"type": "string"}}}},
                                               "401": _error("missing or wrong API token")}}},
            "/openapi.json": {"get": {"operationId": "openapi", "summary": "This description",
                                      "responses": {"200": simple("the OpenAPI 3.1 description"),
                                                    "401": _error("missing or wrong API token")}}},
        },
        "components": {"schemas": components},
    }
    if with_auth:
        spec["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        for path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/metrics", "/openapi.json"):
            for op in spec["paths"][path].values():
                op["security"] = [{"bearer": []}]
    return spec
