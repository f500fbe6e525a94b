//! `GET /openapi.json`: an OpenAPI 3.1 description of every route the node serves (public ones,
//! and the internal ones between members, tagged `internal`). A test keeps its paths and methods
//! equal to the router's.

use serde_json::{Value, json};

fn error_response(what: &str) -> Value {
    json!({
        "description": what,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    })
}

fn json_response(what: &str, schema: Value) -> Value {
    json!({"description": what, "content": {"application/json": {"schema": schema}}})
}

fn id_param(name: &str, what: &str) -> Value {
    json!({"name": name, "in": "path", "required": true, "description": what, "schema": {"type": "string"}})
}

fn eval_id() -> Value {
    id_param("id", "evaluation id (an integer)")
}

fn internal(summary: &str, method_body: Option<&str>) -> Value {
    let mut op = json!({
        "tags": ["internal"],
        "summary": summary,
        "security": [{"memberMac": []}],
        "responses": {
            "200": {"description": "accepted"},
            "403": error_response("not signed by a live member, stale, replayed or addressed to another node"),
        }
    });
    if let Some(what) = method_body {
        op["requestBody"] =
            json!({"required": true, "description": what, "content": {"application/json": {}}});
    }
    op
}

fn submit() -> Value {
    json!({
        "summary": "Submit projects for evaluation",
        "requestBody": {"required": true, "content": {
            "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
                "file": {"type": "string", "format": "binary", "description": "zip, one top-level folder per project"}}}},
            "application/json": {"schema": {"$ref": "#/components/schemas/Submission"}}
        }},
        "responses": {
            "200": json_response("submitted", json!({"type": "object", "properties": {
                "status": {"const": "submitted"}, "eval_id": {"type": "integer"}}})),
            "400": error_response("malformed body, invalid zip or URL"),
            "408": error_response("the upload stalled"),
            "413": error_response("body over the node's cap"),
            "415": error_response("missing or unsupported Content-Type"),
            "422": error_response("a git URL could not be cloned"),
            "429": error_response("the client has intake.max_pending_per_client unfinished evaluations"),
            "503": error_response("every clone or upload slot is busy"),
        }
    })
}

fn public_paths() -> Value {
    let not_found = error_response("unknown evaluation");
    json!({
        "/": {"get": {"summary": "The dashboard (HTML)", "responses": {"200": {"description": "page", "content": {"text/html": {}}}}}},
        "/assets/{file}": {"get": {"summary": "The dashboard's script and style sheet",
            "parameters": [id_param("file", "dashboard.js or dashboard.css")],
            "responses": {"200": {"description": "asset"}, "404": error_response("no such asset")}}},
        "/evaluation": {
            "post": submit(),
            "get": {"summary": "Ids of every evaluation, oldest first (then those owned by nodes of the earlier implementation, as strings)",
                "responses": {"200": json_response("ids", json!({"type": "array", "items": {"oneOf": [{"type": "integer"}, {"type": "string"}]}}))}}
        },
        "/evaluation/{id}": {"get": {"summary": "Progress and results of one evaluation",
            "parameters": [eval_id(), {"name": "tests", "in": "query", "required": false,
                "description": "false leaves the per-test results out", "schema": {"type": "boolean"}}],
            "responses": {"200": json_response("report (an evaluation owned by a node of the earlier implementation: that implementation's report)", json!({"$ref": "#/components/schemas/Report"})), "404": not_found}}},
        "/evaluation/{id}/grades.csv": {"get": {"summary": "Grades of one evaluation as CSV",
            "parameters": [eval_id()],
            "responses": {"200": {"description": "project,grade,passed,failed,errors,skipped,status,url,flaky", "content": {"text/csv": {}}},
                "404": not_found}}},
        "/evaluation/{id}/events": {"get": {"summary": "Live progress as server-sent events (report, network, end)",
            "parameters": [eval_id()],
            "responses": {"200": {"description": "event stream", "content": {"text/event-stream": {}}},
                "404": not_found, "429": error_response("the client holds intake.max_streams_per_client streams"),
                "503": error_response("too many open streams")}}},
        "/evaluation/{id}/rerun": {"post": {"summary": "A new evaluation running only some modules of a finished one",
            "parameters": [eval_id()],
            "requestBody": {"required": false, "content": {"application/json": {"schema": {"type": "object", "properties": {
                "only": {"oneOf": [{"const": "failed"}, {"type": "array", "items": {"type": "string"}}],
                    "description": "\"failed\" (default) or test node ids / module paths"}}}}}},
            "responses": {"200": json_response("submitted", json!({"type": "object", "properties": {
                    "status": {"const": "submitted"}, "eval_id": {"type": "integer"}, "rerun_of": {"type": "integer"},
                    "modules": {"type": "object"}}})),
                "400": error_response("still running, nothing selected, or a malformed body"),
                "404": not_found, "415": error_response("the body is not declared application/json"),
                "429": error_response("the client has intake.max_pending_per_client unfinished evaluations"),
                "503": error_response("a project's archive is not on this node")}}},
        "/history/{project}": {"get": {"summary": "Recent runs of each test across evaluations of projects of this name",
            "parameters": [id_param("project", "project name")],
            "responses": {"200": json_response("history", json!({"$ref": "#/components/schemas/History"})),
                "400": error_response("invalid project name")}}},
        "/stats": {"get": {"summary": "Test totals of the network and per connected node",
            "responses": {"200": json_response("stats", json!({"type": "object", "required": ["all", "nodes"]}))}}},
        "/network": {"get": {"summary": "Each live node and the nodes it communicates with",
            "responses": {"200": json_response("adjacency", json!({"type": "object",
                "additionalProperties": {"type": "array", "items": {"type": "string"}}}))}}},
        "/metrics": {"get": {"summary": "Metrics in the Prometheus text format",
            "responses": {"200": {"description": "metrics", "content": {"text/plain": {}}}}}},
        "/openapi.json": {"get": {"summary": "This description",
            "responses": {"200": json_response("OpenAPI document", json!({"type": "object"}))}}},
    })
}

fn internal_paths() -> Value {
    json!({
        "/file/{project_id}": {"get": {
            "tags": ["internal"], "summary": "A project's archive (header x-content-sha256); without the x-cdtester-node header, in the earlier implementation's layout (entries under <project_id>/)",
            "parameters": [id_param("project_id", "project id")],
            "responses": {"200": {"description": "zip", "content": {"application/zip": {}}},
                "403": error_response("not a member"), "404": error_response("unknown project")}}},
        "/task": {"post": internal("A module's result, from the worker it was handed to", Some("task result"))},
        "/internal/replicate": {"post": internal("Evaluation records pushed by a member", Some("records"))},
        "/internal/results": {"post": internal("Results delivered together by a worker; each checked as a POST /task", Some("task results"))},
        "/internal/propose": {"post": internal("A responsible member's proposal (record delta); answered by this node's copy", Some("record"))},
        "/internal/sync": {"post": internal("Record fingerprints to reconcile", Some("fingerprints"))},
        "/internal/evaluation/{id}": {"get": {
            "parameters": [eval_id()],
            "tags": ["internal"], "summary": "An evaluation's full record", "security": [{"memberMac": []}],
            "responses": {"200": {"description": "record"}, "403": error_response("not a member"), "404": error_response("unknown evaluation")}}},
    })
}

/// Schemas of per-test results and their history.
fn result_schemas() -> Value {
    json!({
            "Outcome": {"enum": ["passed", "failed", "error", "skipped", "xfailed", "xpassed", "timeout", "oom", "crashed", "infra-error", "flaky"],
                "description": "flaky: failed (or errored), then passed when its module ran again (runner.retries); graded as grading.flaky says"},
            "Attempt": {"type": "object", "required": ["outcome", "duration"], "properties": {
                "outcome": {"$ref": "#/components/schemas/Outcome"}, "duration": {"type": "number"}, "message": {"type": "string"}}},
            "TestResult": {"type": "object", "required": ["nodeid", "outcome", "duration"], "properties": {
                "nodeid": {"type": "string"}, "outcome": {"$ref": "#/components/schemas/Outcome"},
                "duration": {"type": "number", "description": "seconds, all attempts together"}, "message": {"type": "string"},
                "attempts": {"type": "array", "maxItems": 6, "items": {"$ref": "#/components/schemas/Attempt"},
                    "description": "every run, oldest first, when the test ran more than once (absent when it ran once)"}}},
            "History": {"type": "object", "required": ["project", "keep", "tests"], "properties": {
                "project": {"type": "string"}, "keep": {"type": "integer", "description": "runs kept per test"},
                "tests": {"type": "object", "additionalProperties": {"type": "array", "items": {"type": "object",
                    "required": ["eval", "outcome", "duration", "at"], "properties": {
                        "eval": {"type": "integer"}, "outcome": {"$ref": "#/components/schemas/Outcome"},
                        "duration": {"type": "number"}, "at": {"type": "number", "description": "seconds since the Unix epoch"}}}}}}}
    })
}

fn components() -> Value {
    let mut doc = json!({
        "schemas": {
            "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
            "Submission": {"type": "object", "required": ["projects"], "properties": {
                "auth_token": {"type": "string", "description": "token for https clones (alias token)"},
                "projects": {"type": "array", "description": "git URLs (alias urls)", "items": {"type": "string"}}}},
            "Counts": {"type": "object", "additionalProperties": {"type": "integer"},
                "description": "tests per outcome: passed, failed, error, skipped, xfailed, xpassed, timeout, oom, crashed, infra_error, flaky"},
            "Report": {"type": "object", "required": ["id", "status", "node", "start_time", "time_elapsed", "summary", "projects"],
                "properties": {
                    "id": {"type": "integer"}, "status": {"enum": ["running", "finished"]}, "node": {"type": "string"},
                    "start_time": {"type": "number"}, "end_time": {"type": ["number", "null"]}, "time_elapsed": {"type": "number"},
                    "rerun_of": {"type": "integer", "description": "the evaluation this one reruns modules of"},
                    "reruns": {"type": "array", "items": {"type": "integer"}, "description": "reruns of this evaluation"},
                    "summary": {"type": "object"},
                    "projects": {"type": "object", "additionalProperties": {"type": "object", "properties": {
                        "status": {"enum": ["preparing", "running", "finished", "failed"]},
                        "grade": {"type": ["number", "null"]}, "tests": {"$ref": "#/components/schemas/Counts"},
                        "flaky": {"type": "array", "items": {"type": "string"}, "description": "node ids of the flaky tests"},
                        "modules": {"type": "object", "additionalProperties": {"type": "object", "properties": {
                            "tests": {"type": "array", "items": {"$ref": "#/components/schemas/TestResult"}}}}}}}}}}
        },
        "securitySchemes": {"memberMac": {"type": "apiKey", "in": "header", "name": "x-cdtester-mac",
            "description": "HMAC-SHA256 under the cluster secret with x-cdtester-node, x-cdtester-time and x-cdtester-nonce (README, HTTP API)"}}
    });
    if let (Some(all), Value::Object(more)) = (doc["schemas"].as_object_mut(), result_schemas()) {
        all.extend(more);
    }
    doc
}

/// The document.
pub fn document() -> Value {
    let mut paths = public_paths();
    if let (Some(all), Value::Object(more)) = (paths.as_object_mut(), internal_paths()) {
        all.extend(more);
    }
    json!({
        "openapi": "3.1.0",
        "info": {"title": "cdtester node API", "version": env!("CARGO_PKG_VERSION"),
            "description": "Every node of a cdtester network serves this API. Errors are {\"error\": \"...\"} with a 4xx status."},
        "tags": [{"name": "internal", "description": "between members of the network only"}],
        "paths": paths,
        "components": components(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refs<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
        match v {
            Value::Object(map) => {
                for (k, item) in map {
                    match (k.as_str(), item) {
                        ("$ref", Value::String(r)) => out.push(r),
                        _ => refs(item, out),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|i| refs(i, out)),
            _ => {}
        }
    }

    #[test]
    fn every_reference_resolves_and_every_operation_answers() {
        let doc = document();
        let mut found = Vec::new();
        refs(&doc, &mut found);
        assert!(!found.is_empty());
        for r in found {
            let pointer = r.strip_prefix('#').unwrap_or_else(|| panic!("external reference {r}"));
            assert!(doc.pointer(pointer).is_some(), "{r} does not resolve");
        }
        for (path, ops) in doc["paths"].as_object().unwrap() {
            for (method, op) in ops.as_object().unwrap() {
                assert!(op["responses"]["200"].is_object(), "{method} {path} has no 200 answer");
                assert!(op["summary"].is_string(), "{method} {path} has no summary");
            }
        }
    }
}
