"""The ComfyUI sandbox answers as ComfyUI's own source says (Comfy-Org/ComfyUI: server.py, execution.py, main.py,
nodes.py): each test names the function whose rule it checks. Real loopback HTTP and websocket, no provider code."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from PIL import Image

from providers.sandbox import ComfyUISandbox, Fault
from providers.sandbox.comfyui import execution_error
from tests.conftest import png

ws_sync = pytest.importorskip("websockets.sync.client")

XL = "sd_xl_base_1.0.safetensors"


@pytest.fixture
def sb() -> Iterator[ComfyUISandbox]:
    with ComfyUISandbox() as server:
        yield server


@pytest.fixture
def http(sb: ComfyUISandbox) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sb.origin, timeout=10) as client:
        yield client


def txt2img(ckpt: str = XL, *, seed: int = 1, steps: int = 2, width: int = 64, height: int = 64,
            batch: int = 1) -> dict[str, Any]:
    """The default workflow's shape (ComfyUI's own txt2img example graph)."""
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": height, "batch_size": batch}},
        "3": {"class_type": "KSampler", "inputs": {"model": ["4", 0], "seed": seed, "steps": steps, "cfg": 7.0,
                                                   "sampler_name": "euler", "scheduler": "normal",
                                                   "positive": ["6", 0], "negative": ["7", 0],
                                                   "latent_image": ["5", 0], "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "ComfyUI"}},
    }


def queue(http: httpx.Client, prompt: Any, **extra: Any) -> httpx.Response:
    return http.post("/prompt", json={"prompt": prompt, **extra})


def until(condition: Callable[[], Any]) -> None:
    """Wait (polling, 10 s at most) until ``condition()`` holds."""
    for _ in range(2000):
        if condition():
            return
        time.sleep(0.005)
    raise AssertionError("the condition never held")


def errors_of(response: httpx.Response, node: str) -> list[dict[str, Any]]:
    errors: list[dict[str, Any]] = response.json()["node_errors"][node]["errors"]
    return errors


def receive_until(ws: Any, done: str, prompt_id: str) -> list[dict[str, Any]]:
    """Every message up to the first ``done`` message about ``prompt_id``."""
    out = []
    while True:
        message = json.loads(ws.recv(timeout=10))
        out.append(message)
        if message["type"] == done and message["data"].get("prompt_id") == prompt_id and (
                done != "executing" or message["data"]["node"] is None):
            return out


# --- GET /object_info: server.py node_info ----------------------------------------------------------------------


def test_object_info_describes_each_node_with_live_model_lists(sb: ComfyUISandbox, http: httpx.Client) -> None:
    info = http.get("/object_info").json()
    ckpt = info["CheckpointLoaderSimple"]
    assert set(ckpt) == {"input", "input_order", "output", "output_is_list", "output_name", "name", "display_name",
                         "description", "python_module", "category", "output_node"}
    assert ckpt["input"]["required"]["ckpt_name"][0] == sorted(sb.folders["checkpoints"])
    assert ckpt["output"] == ["MODEL", "CLIP", "VAE"] and ckpt["output_node"] is False
    assert info["SaveImage"]["output_node"] is True and info["SaveImage"]["input"]["hidden"]["prompt"] == "PROMPT"
    assert info["KSampler"]["input_order"]["required"][:3] == ["model", "seed", "steps"]
    sb.folders["checkpoints"].append("new.safetensors")  # folders are rescanned: the next read lists it
    assert "new.safetensors" in http.get("/object_info/CheckpointLoaderSimple").json()[
        "CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
    assert http.get("/object_info/NoSuchNode").json() == {}
    assert http.get("/api/object_info/KSampler").json()["KSampler"]["name"] == "KSampler"  # the /api prefix


# --- POST /prompt validation: execution.py validate_prompt / validate_inputs -------------------------------------


def test_a_body_without_a_prompt_is_no_prompt(http: httpx.Client) -> None:
    response = http.post("/prompt", json={"client_id": "x"})
    assert response.status_code == 400
    assert response.json() == {"error": {"type": "no_prompt", "message": "No prompt provided",
                                         "details": "No prompt provided", "extra_info": {}}, "node_errors": {}}


@pytest.mark.parametrize(("node", "message"), [
    ({"inputs": {}}, "Cannot execute because a node is missing the class_type property."),
    ({"class_type": "FancyCustomNode", "inputs": {}}, "Cannot execute because node FancyCustomNode does not exist."),
])
def test_a_node_without_a_known_class_is_an_invalid_prompt(http: httpx.Client, node: dict[str, Any],
                                                           message: str) -> None:
    graph = txt2img() | {"12": node}
    response = queue(http, graph)
    assert response.status_code == 400
    assert response.json() == {"error": {"type": "invalid_prompt", "message": message, "details": "Node ID '#12'",
                                         "extra_info": {}}, "node_errors": {}}


def test_a_graph_without_an_output_node_has_no_outputs(http: httpx.Client) -> None:
    graph = txt2img()
    del graph["9"]
    assert queue(http, graph).json()["error"]["type"] == "prompt_no_outputs"


def test_a_missing_required_input_fails_its_output_with_node_errors(http: httpx.Client) -> None:
    graph = txt2img()
    del graph["3"]["inputs"]["steps"]
    response = queue(http, graph)
    body = response.json()
    assert response.status_code == 400 and body["error"]["type"] == "prompt_outputs_failed_validation"
    assert body["error"]["details"] == ""  # it lists the outputs' own reasons only; SaveImage's inputs are fine
    assert body["node_errors"] == {"3": {"errors": [{"type": "required_input_missing",
                                                      "message": "Required input is missing", "details": "steps",
                                                      "extra_info": {"input_name": "steps"}}],
                                         "dependent_outputs": ["9"], "class_type": "KSampler"}}


def test_an_unknown_checkpoint_is_a_value_not_in_list(sb: ComfyUISandbox, http: httpx.Client) -> None:
    (error,) = errors_of(queue(http, txt2img("nope.safetensors")), "4")
    assert error["type"] == "value_not_in_list" and error["message"] == "Value not in list"
    assert error["details"] == f"ckpt_name: 'nope.safetensors' not in {sorted(sb.folders['checkpoints'])}"
    assert error["extra_info"]["received_value"] == "nope.safetensors"


def test_a_list_over_twenty_options_is_not_sent_back(sb: ComfyUISandbox, http: httpx.Client) -> None:
    sb.folders["checkpoints"] += [f"m{i}.safetensors" for i in range(25)]
    (error,) = errors_of(queue(http, txt2img("nope.safetensors")), "4")
    assert error["details"].endswith("not in (list of length 27)") and error["extra_info"]["input_config"] is None


@pytest.mark.parametrize(("node", "name", "value", "kind"), [
    ("3", "steps", "many", "invalid_input_type"),
    ("3", "steps", 0, "value_smaller_than_min"),
    ("3", "denoise", 1.5, "value_bigger_than_max"),
    ("3", "sampler_name", "warp_drive", "value_not_in_list"),
])
def test_widget_values_are_converted_then_checked_against_the_definition(http: httpx.Client, node: str, name: str,
                                                                         value: Any, kind: str) -> None:
    graph = txt2img()
    graph[node]["inputs"][name] = value
    (error,) = errors_of(queue(http, graph), node)
    assert error["type"] == kind and error["extra_info"]["input_name"] == name


def test_a_link_of_the_wrong_type_is_a_return_type_mismatch(http: httpx.Client) -> None:
    graph = txt2img()
    graph["3"]["inputs"]["positive"] = ["4", 1]  # CLIP where CONDITIONING is wanted
    (error,) = errors_of(queue(http, graph), "3")
    assert error["type"] == "return_type_mismatch"
    assert error["details"] == "positive, received_type(CLIP) mismatch input_type(CONDITIONING)"


def test_a_link_that_is_not_a_pair_is_a_bad_linked_input(http: httpx.Client) -> None:
    graph = txt2img()
    graph["3"]["inputs"]["model"] = ["4", 0, 1]
    assert errors_of(queue(http, graph), "3")[0]["type"] == "bad_linked_input"


def test_a_link_to_a_missing_node_is_an_exception_during_validation(http: httpx.Client) -> None:
    graph = txt2img()
    graph["9"]["inputs"]["images"] = ["99", 0]
    (error,) = errors_of(queue(http, graph), "9")
    assert error["type"] == "exception_during_validation" and error["details"] == "'99'"


def test_load_image_checks_its_file_by_its_own_validation(sb: ComfyUISandbox, http: httpx.Client) -> None:
    graph = {"1": {"class_type": "LoadImage", "inputs": {"image": "absent.png"}},
             "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}
    (error,) = errors_of(queue(http, graph), "1")
    assert error == {"type": "custom_validation_failed", "message": "Custom validation failed for node",
                     "details": "image - Invalid image file: absent.png", "extra_info": {"input_name": "image"}}


def test_one_good_output_queues_the_prompt_with_the_others_node_errors(http: httpx.Client) -> None:
    graph = txt2img() | {"10": {"class_type": "SaveImage", "inputs": {"images": ["11", 0]}},
                         "11": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0]}}}
    response = queue(http, graph)
    body = response.json()
    assert response.status_code == 200 and set(body) == {"prompt_id", "number", "node_errors"}
    assert body["node_errors"]["11"]["errors"][0]["type"] == "required_input_missing"
    assert body["node_errors"]["11"]["dependent_outputs"] == ["10"]


def test_a_body_that_is_not_json_is_a_plain_500(http: httpx.Client) -> None:
    response = http.post("/prompt", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 500 and response.text.startswith("500 Internal Server Error")


# --- the queue and history: server.py post_prompt / get_queue / post_queue, execution.py PromptQueue --------------


def test_prompts_are_numbered_in_order_and_front_goes_first(sb: ComfyUISandbox, http: httpx.Client) -> None:
    sb.hold()
    first = queue(http, txt2img(seed=1)).json()
    until(lambda: http.get("/queue").json()["queue_running"])
    second = queue(http, txt2img(seed=2), front=True).json()
    third = queue(http, txt2img(seed=3), prompt_id="my-own-id", number=7).json()
    assert (first["number"], second["number"], third["number"]) == (0, -1, 7)
    assert third["prompt_id"] == "my-own-id"
    sb.release()
    assert sb.wait_idle()
    assert list(sb.history) == [first["prompt_id"], second["prompt_id"], "my-own-id"]


def test_the_queue_lists_running_and_pending_and_deletes_pending(sb: ComfyUISandbox, http: httpx.Client) -> None:
    sb.hold()
    running = queue(http, txt2img(seed=1)).json()["prompt_id"]
    pending = queue(http, txt2img(seed=2)).json()["prompt_id"]
    until(lambda: http.get("/queue").json()["queue_running"])
    body = http.get("/queue").json()
    assert [item[1] for item in body["queue_running"]] == [running]
    assert [item[1] for item in body["queue_pending"]] == [pending]
    assert http.get("/prompt").json() == {"exec_info": {"queue_remaining": 2}}
    assert http.post("/queue", json={"delete": [pending]}).status_code == 200
    assert http.get("/queue").json()["queue_pending"] == []
    sb.release()
    assert sb.wait_idle() and pending not in sb.history


def test_a_finished_prompt_has_its_history_entry(sb: ComfyUISandbox, http: httpx.Client) -> None:
    pid = queue(http, txt2img(batch=2), client_id="c1", extra_data={"api_key_comfy_org": "secret"}).json()["prompt_id"]
    assert sb.wait_idle()
    entry = http.get(f"/history/{pid}").json()[pid]
    number, prompt_id, prompt, extra, outputs = entry["prompt"]
    assert (number, prompt_id, outputs, extra) == (0, pid, ["9"], {"client_id": "c1"})  # the API key is not kept
    assert prompt == txt2img(batch=2)
    assert entry["outputs"] == {"9": {"images": [
        {"filename": "ComfyUI_00001_.png", "subfolder": "", "type": "output"},
        {"filename": "ComfyUI_00002_.png", "subfolder": "", "type": "output"}]}}
    status = entry["status"]
    assert status["status_str"] == "success" and status["completed"] is True
    assert [m[0] for m in status["messages"]] == ["execution_start", "execution_cached", "execution_success"]
    assert all(isinstance(m[1]["timestamp"], int) for m in status["messages"])
    assert http.get("/history", params={"max_items": 1}).json().keys() == {pid}
    assert http.get("/history/unknown").json() == {}
    http.post("/history", json={"delete": [pid]})
    assert http.get("/history").json() == {}


# --- the websocket: server.py websocket_handler / send_json, execution.py execute, main.py prompt_worker -----------


def test_a_client_sees_its_prompt_run_message_by_message(sb: ComfyUISandbox, http: httpx.Client) -> None:
    with ws_sync.connect(sb.ws_url + "?clientId=me") as ws, ws_sync.connect(sb.ws_url + "?clientId=other") as other:
        hello = json.loads(ws.recv(timeout=5))
        assert hello == {"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": "me"}}
        pid = queue(http, txt2img(steps=3), client_id="me").json()["prompt_id"]
        messages = receive_until(ws, "executing", pid)
        kinds = [m["type"] for m in messages if m["type"] not in ("status", "progress_state")]
        assert kinds == ["execution_start", "execution_cached"] + ["executing"] * 5 + ["progress"] * 3 + [
            "executing", "executing", "executed", "execution_success", "executing"]
        executing = [m["data"]["node"] for m in messages if m["type"] == "executing"]
        assert executing == ["4", "6", "7", "5", "3", "8", "9", None]
        progress = [m["data"] for m in messages if m["type"] == "progress"]
        assert progress == [{"value": v, "max": 3, "prompt_id": pid, "node": "3"} for v in (1, 2, 3)]
        executed = next(m["data"] for m in messages if m["type"] == "executed")
        assert executed["node"] == "9" and executed["output"]["images"][0]["type"] == "output"
        seen_by_other = {json.loads(other.recv(timeout=5))["type"] for _ in range(3)}
        assert seen_by_other == {"status"}  # the queue's status is broadcast; the run goes to its client only


def test_an_identical_prompt_is_cached_and_reports_its_outputs_again(sb: ComfyUISandbox, http: httpx.Client) -> None:
    with ws_sync.connect(sb.ws_url + "?clientId=me") as ws:
        first = queue(http, txt2img(), client_id="me").json()["prompt_id"]
        receive_until(ws, "executing", first)
        second = queue(http, txt2img(), client_id="me").json()["prompt_id"]
        messages = receive_until(ws, "executing", second)
    cached = next(m["data"] for m in messages if m["type"] == "execution_cached")
    assert sorted(cached["nodes"]) == sorted(txt2img())
    assert [m["data"]["node"] for m in messages if m["type"] == "executing"] == [None]
    executed = next(m["data"] for m in messages if m["type"] == "executed")
    assert executed["output"] == sb.history[first]["outputs"]["9"]  # the cached node's ui, sent again


def test_a_failing_node_sends_execution_error_and_ends_in_error(sb: ComfyUISandbox, http: httpx.Client) -> None:
    sb.faults.push(execution_error("mat1 and mat2 shapes cannot be multiplied"), path="/prompt")
    with ws_sync.connect(sb.ws_url + "?clientId=me") as ws:
        pid = queue(http, txt2img(), client_id="me").json()["prompt_id"]
        messages = receive_until(ws, "executing", pid)
    error = next(m["data"] for m in messages if m["type"] == "execution_error")
    assert set(error) == {"prompt_id", "node_id", "node_type", "executed", "exception_message", "exception_type",
                          "traceback", "current_inputs", "current_outputs", "timestamp"}
    assert (error["node_id"], error["node_type"], error["exception_type"]) == ("3", "KSampler", "RuntimeError")
    assert "mat1 and mat2" in error["exception_message"] and "execution_success" not in [m["type"] for m in messages]
    assert sb.history[pid]["status"]["status_str"] == "error" and sb.history[pid]["status"]["completed"] is False


def test_feature_flags_are_negotiated_on_the_first_message(sb: ComfyUISandbox) -> None:
    with ws_sync.connect(sb.ws_url) as ws:
        sid = json.loads(ws.recv(timeout=5))["data"]["sid"]
        ws.send(json.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": True}}))
        reply = json.loads(ws.recv(timeout=5))
    assert len(sid) == 32 and reply["type"] == "feature_flags"
    assert reply["data"]["supports_preview_metadata"] is True


# --- interrupts: server.py post_interrupt, execution.py handle_execution_error -------------------------------------


def test_an_interrupt_for_another_prompt_is_ignored_and_for_this_one_stops_it(sb: ComfyUISandbox,
                                                                              http: httpx.Client) -> None:
    sb.hold()
    with ws_sync.connect(sb.ws_url + "?clientId=me") as ws:
        pid = queue(http, txt2img(), client_id="me").json()["prompt_id"]
        until(lambda: any(m["node"] == "3" for m in sb.messages_for_type("executing")))  # the sampler, held
        assert http.post("/interrupt", json={"prompt_id": "someone-else"}).status_code == 200
        assert http.post("/interrupt", json={"prompt_id": pid}).status_code == 200
        messages = receive_until(ws, "executing", pid)
    interrupted = next(m["data"] for m in messages if m["type"] == "execution_interrupted")
    assert set(interrupted) == {"prompt_id", "node_id", "node_type", "executed", "timestamp"}
    assert interrupted["node_type"] == "KSampler"
    assert sb.history[pid]["status"]["messages"][-1][0] == "execution_interrupted"


def test_an_interrupt_without_a_body_is_global(sb: ComfyUISandbox, http: httpx.Client) -> None:
    sb.hold()
    pid = queue(http, txt2img()).json()["prompt_id"]
    until(lambda: http.get("/queue").json()["queue_running"])
    assert http.post("/interrupt").status_code == 200  # wherever it is, it stops at its next node or step
    assert sb.wait_idle() and sb.history[pid]["status"]["status_str"] == "error"


# --- files: server.py image_upload / view_image, nodes.py SaveImage ------------------------------------------------


def test_uploads_keep_the_bytes_rename_on_conflict_and_overwrite_on_request(sb: ComfyUISandbox,
                                                                           http: httpx.Client) -> None:
    def upload(data: bytes, **fields: str) -> httpx.Response:
        return http.post("/upload/image", files={"image": ("cat.png", data, "image/png")}, data=fields)

    assert upload(png()).json() == {"name": "cat.png", "subfolder": "", "type": "input"}
    assert upload(png()).json()["name"] == "cat.png"  # the same bytes: not saved twice
    assert upload(png(color=(1, 2, 3))).json()["name"] == "cat (1).png"
    assert upload(png(color=(4, 5, 6)), overwrite="true").json()["name"] == "cat.png"
    assert sb.inputs["cat.png"] == png(color=(4, 5, 6))
    assert upload(png(), subfolder="../../etc").status_code == 400
    assert http.post("/upload/image", data={"type": "input"}).status_code == 400


def test_view_serves_outputs_and_refuses_paths_out_of_its_folders(sb: ComfyUISandbox, http: httpx.Client) -> None:
    pid = queue(http, txt2img(width=96, height=64)).json()["prompt_id"]
    assert sb.wait_idle()
    image = sb.history[pid]["outputs"]["9"]["images"][0]
    response = http.get("/view", params=image)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(response.content)).size == (96, 64)
    preview = http.get("/view", params=image | {"preview": "jpeg;80"})
    assert preview.headers["content-type"] == "image/jpeg"
    assert http.get("/view", params={"filename": "../secret.png"}).status_code == 400
    assert http.get("/view", params={"filename": "x.png", "subfolder": "../.."}).status_code == 403
    assert http.get("/view", params={"filename": "missing.png"}).status_code == 404


def test_generated_images_are_deterministic_and_of_the_requested_size(sb: ComfyUISandbox,
                                                                      http: httpx.Client) -> None:
    a = queue(http, txt2img(seed=5, width=100, height=72)).json()["prompt_id"]
    assert sb.wait_idle()
    sb.clear_requests()
    http.post("/history", json={"clear": True})
    graph = txt2img(seed=5, width=100, height=72)
    graph["9"]["inputs"]["filename_prefix"] = "again/x"
    b = queue(http, graph).json()["prompt_id"]
    assert sb.wait_idle()
    first = sb.files[("output", "", "ComfyUI_00001_.png")]
    again = sb.history[b]["outputs"]["9"]["images"][0]
    assert again["subfolder"] == "again"
    assert sb.files[("output", "again", again["filename"])] == first
    assert Image.open(io.BytesIO(first)).size == (96, 72)  # EmptyLatentImage floors each side to a multiple of 8
    assert a != b


# --- faults -------------------------------------------------------------------------------------------------------


def test_fault_switches_answer_in_the_servers_own_shapes(sb: ComfyUISandbox, http: httpx.Client) -> None:
    sb.faults.push(Fault.server_error(), path="/object_info")
    sb.faults.push(Fault.invalid_request(message="bad graph"), path="/prompt")
    sb.faults.push(Fault.disconnect(), path="/ws")
    failed = http.get("/object_info")
    assert failed.status_code == 500 and failed.text.startswith("500 Internal Server Error")
    refused = queue(http, txt2img())
    assert refused.status_code == 400 and refused.json()["error"]["message"] == "bad graph"
    with pytest.raises(Exception):  # noqa: B017 — the connection is dropped before the handshake answers
        ws_sync.connect(sb.ws_url, open_timeout=5)
    with pytest.raises(ValueError, match="does not serve"):
        sb.faults.push(Fault.rate_limit())
