"""`distgen serve` for text: a real server on loopback with real gloo ranks, driven by the `openai`
package and by `distgen.client`; results compared with the one-shot `distgen generate text` on
the same checkpoint (a tiny random Llama with a trained byte-level tokenizer, fp32, greedy).
"""

import concurrent.futures
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from distgen.models.tiny_llm import save_chat_llama
from tests.serving import Server, metric

pytestmark = [pytest.mark.serve, pytest.mark.timeout(600)]

PROMPTS = ["What is two plus two?", "Name a colour.", "hello world", "tensor parallelism splits"]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return str(save_chat_llama(tmp_path_factory.mktemp("serve") / "tiny-chat-llama"))


def one_shot(model: str, prompt: str, chat: bool, max_tokens: int, parallel: str = "") -> str:
    """What `distgen generate text` prints for the prompt (its own process, its own ranks)."""
    args = [sys.executable, "-m", "distgen", "generate", "text", "--model", model, "--prompt", prompt,
            "--max-new-tokens", str(max_tokens), "--chat", "on" if chat else "off"]
    if parallel:
        args += ["--parallel", parallel]
    out = subprocess.run(args, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.endswith("\n")
    return out.stdout[:-1]  # print() adds one newline


@pytest.fixture(scope="module")
def tp2(llama):
    with Server(["--model", llama, "--parallel", "tp=2", "--served-model-name", "tiny"]) as server:
        yield server


def test_chat_and_completions_equal_one_shot_greedy(llama, tp2):
    from openai import OpenAI

    from distgen.client import Client

    client = OpenAI(base_url=tp2.url + "/v1", api_key="unused", max_retries=0)
    ours = Client(tp2.url)
    assert [m.id for m in client.models.list()] == ["tiny"]
    for prompt in PROMPTS[:2]:
        expected_chat = one_shot(llama, prompt, chat=True, max_tokens=12, parallel="tp=2")
        reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompt}],
                                               max_tokens=12, temperature=0)
        assert reply.choices[0].message.content == expected_chat
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert reply.usage.completion_tokens >= 1 and reply.usage.prompt_tokens > 5
        streamed = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompt}],
                                                  max_tokens=12, temperature=0, stream=True,
                                                  stream_options={"include_usage": True})
        pieces, finishes, usage = [], [], None
        for chunk in streamed:
            if chunk.usage is not None:
                usage = chunk.usage
                assert chunk.choices == []
                continue
            pieces.append(chunk.choices[0].delta.content or "")
            finishes.append(chunk.choices[0].finish_reason)
        assert "".join(pieces) == expected_chat
        assert [f for f in finishes if f is not None] == [reply.choices[0].finish_reason]  # exactly one
        assert usage is not None and usage.completion_tokens == reply.usage.completion_tokens
        assert "".join(ours.chat(prompt, model="tiny", stream=True, max_tokens=12, temperature=0)) == expected_chat

        expected_completion = one_shot(llama, prompt, chat=False, max_tokens=10)  # one rank: tp must not matter
        completion = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0)
        assert completion.choices[0].text == expected_completion
        assert ours.complete(prompt, model="tiny", max_tokens=10, temperature=0) == expected_completion


@pytest.mark.parametrize("family,model_args", [
    ("qwen2", None),  # tied embeddings, q/k/v biases; one rank
    # the embedded SmolLM2-135M-Instruct: minutes on 2 cores, so `-m "serve and slow"`
    pytest.param("smollm2", ["--model", "smollm2"], marks=pytest.mark.slow),
])
def test_chat_equals_one_shot_on_more_checkpoints(tmp_path, family, model_args):
    from openai import OpenAI

    model = str(save_chat_llama(tmp_path / family, family=family)) if model_args is None else "smollm2"
    with Server(["--model", model, "--served-model-name", "m"]) as server:
        client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=600)
        for prompt in PROMPTS[:2]:
            expected = one_shot(model, prompt, chat=True, max_tokens=12)
            reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": prompt}],
                                                   max_tokens=12, temperature=0)
            assert reply.choices[0].message.content == expected


def test_seeded_sampling_is_reproducible_and_stop_strings_cut(tp2):
    from openai import OpenAI

    client = OpenAI(base_url=tp2.url + "/v1", api_key="unused", max_retries=0)
    args = dict(model="tiny", prompt="hello", max_tokens=16, temperature=0.9, top_p=0.95, seed=7, extra_body={"ignore_eos": True})
    a = client.completions.create(**args).choices[0].text
    b = client.completions.create(**args).choices[0].text
    assert a == b and a
    greedy = client.completions.create(model="tiny", prompt="hello", max_tokens=16, temperature=0,
                                       extra_body={"ignore_eos": True})
    text = greedy.choices[0].text
    assert greedy.choices[0].finish_reason == "length" and greedy.usage.completion_tokens == 16
    if len(text) > 4:
        stop = text[2:4]
        cut = client.completions.create(model="tiny", prompt="hello", max_tokens=16, temperature=0, stop=[stop],
                                        extra_body={"ignore_eos": True})
        assert cut.choices[0].text == text[: text.find(stop)]
        assert cut.choices[0].finish_reason == "stop"


def test_concurrent_requests_each_get_their_own_answer(llama, tp2):
    from openai import OpenAI

    client = OpenAI(base_url=tp2.url + "/v1", api_key="unused", max_retries=0, timeout=300)
    expected = {p: client.completions.create(model="tiny", prompt=p, max_tokens=8, temperature=0).choices[0].text
                for p in PROMPTS}
    expected |= {"chat:" + p: client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": p}], max_tokens=8, temperature=0).choices[0].message.content
        for p in PROMPTS}

    def ask(i: int) -> tuple[str, str]:
        prompt = PROMPTS[i % len(PROMPTS)]
        if i % 2:  # chat and completions mixed
            reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompt}],
                                                   max_tokens=8, temperature=0)
            return "chat:" + prompt, reply.choices[0].message.content
        reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0)
        return prompt, reply.choices[0].text

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(ask, range(32)))
    assert len(answers) == 32
    for prompt, text in answers:
        assert text == expected[prompt]


def test_disconnected_stream_stops_within_a_step(tp2):
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 200, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", tp2.url + "/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        for _ in range(3):
            next(lines)
        assert metric(tp2.url, "distgen_running_requests") == 1
    # the client went away: the group must be free again (running back to 0) within 5 s
    deadline = time.monotonic() + 5
    while metric(tp2.url, "distgen_running_requests") != 0:
        assert time.monotonic() < deadline, "the abandoned request kept running"
        time.sleep(0.1)
    assert tp2.health()[0] == 200


BAD_TEXT = [
    ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, 400, "model"),
    ("/v1/chat/completions", {"model": "tiny", "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0]"),
    ("/v1/chat/completions", {"model": "tiny", "messages": "hi"}, 422, "messages"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000},
     400, "max_tokens"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0},
     422, "max_tokens"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"},
     422, "max_tokens"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": 5},
     400, "temperature"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "top_p": 0},
     400, "top_p"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "n": 99}, 400, "n"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stop": [1, 2]},
     422, "stop"),
    ("/v1/completions", {"model": "tiny", "prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": "word " * 400}, 400, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": ["a", "b"]}, 400, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "seed": "x"}, 422, "seed"),
    ("/v1/images/generations", {"prompt": "a lighthouse"}, 404, "model"),
    ("/v1/videos", {"prompt": "a boat"}, 404, "model"),
]


@pytest.mark.parametrize("path,body,status,param", BAD_TEXT, ids=[f"{p}-{s}-{q}" for p, _, s, q in BAD_TEXT])
def test_bad_text_parameters_are_refused_before_queueing(tp2, path, body, status, param):
    admitted = metric(tp2.url, 'distgen_requests_admitted_total{kind="text"}') if _has_admitted(tp2) else 0.0
    response = httpx.post(tp2.url + path, json=body, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] is not None and error["param"].startswith(param), error
    after = metric(tp2.url, 'distgen_requests_admitted_total{kind="text"}') if _has_admitted(tp2) else 0.0
    assert after == admitted  # nothing was queued


def _has_admitted(server) -> bool:
    return 'distgen_requests_admitted_total{kind="text"}' in httpx.get(server.url + "/metrics").text


def test_huge_body_is_refused(tp2):
    response = httpx.post(tp2.url + "/v1/completions", content=b"{" + b" " * (2 << 20) + b"}",
                          headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


def test_overload_gets_429_with_retry_after(llama):
    from openai import OpenAI

    with Server(["--model", llama, "--served-model-name", "tiny", "--max-queued", "2"]) as server:
        expected = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "hello",
                              "max_tokens": 24, "temperature": 0, "ignore_eos": True}, timeout=120).json()
        expected_text = expected["choices"][0]["text"]

        def ask(_):
            return httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "hello",
                              "max_tokens": 24, "temperature": 0, "ignore_eos": True}, timeout=300)

        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            responses = list(pool.map(ask, range(20)))
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 429} and 429 in codes and 200 in codes, codes
        for r in responses:
            if r.status_code == 200:
                assert r.json()["choices"][0]["text"] == expected_text
            else:
                assert int(r.headers["retry-after"]) >= 1
                assert r.json()["error"]["code"] == "queue_full"
        assert server.health()[0] == 200
        client = OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        assert client.completions.create(model="tiny", prompt="hello", max_tokens=24, temperature=0,
                                         extra_body={"ignore_eos": True}).choices[0].text == expected_text


def test_exposed_host_needs_a_key_and_requests_need_it(llama, tmp_path):
    refused = subprocess.run([sys.executable, "-m", "distgen", "serve", "--model", llama, "--host", "0.0.0.0"],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2
    assert "--host 0.0.0.0" in refused.stderr and "API key" in refused.stderr and "--api-key-file" in refused.stderr
    key_file = tmp_path / "key.txt"
    key_file.write_text("s3cret-key\n")
    with Server(["--model", llama, "--served-model-name", "tiny", "--api-key-file", str(key_file)]) as server:
        body = {"model": "tiny", "prompt": "hello", "max_tokens": 2}
        assert httpx.post(server.url + "/v1/completions", json=body).status_code == 401
        wrong = httpx.post(server.url + "/v1/completions", json=body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(server.url + "/v1/models").status_code == 401
        auth = {"Authorization": "Bearer s3cret-key"}
        ok = httpx.post(server.url + "/v1/completions", json=body, headers=auth)
        assert ok.status_code == 200
        assert httpx.get(server.url + "/health").status_code == 200  # open
        assert httpx.get(server.url + "/metrics").status_code == 200  # open

        # SIGTERM while a request runs: it is finished (drain), then a clean exit
        long = {"model": "tiny", "prompt": "hello", "max_tokens": 250, "temperature": 0, "ignore_eos": True}
        result = {}
        thread = threading.Thread(target=lambda: result.update(
            response=httpx.post(server.url + "/v1/completions", json=long, headers=auth, timeout=120)))
        thread.start()
        deadline = time.monotonic() + 30
        while metric(server.url, "distgen_running_requests") < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert server.stop() == 0
        thread.join(30)
        assert result["response"].status_code == 200
        assert result["response"].json()["usage"]["completion_tokens"] == 250


def _kill_rank_mid_request(server, rank: int) -> None:
    """Start a long request, kill -9 one worker rank while it runs; check the 503 and the rebuild."""
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 200, "temperature": 0, "ignore_eos": True}
    expected = httpx.post(server.url + "/v1/completions", json=dict(body, max_tokens=6), timeout=120).json()
    result = {}

    def ask():
        result["response"] = httpx.post(server.url + "/v1/completions", json=body, timeout=120)

    thread = threading.Thread(target=ask)
    thread.start()
    deadline = time.monotonic() + 30
    while metric(server.url, "distgen_running_requests") < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    pid = server.health()[1]["pids"][rank]
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    thread.join(60)
    response = result["response"]
    assert response.status_code == 503, response.text
    message = response.json()["error"]["message"]
    assert f"rank {rank}" in message and ("SIGKILL" in message or "died" in message), message
    assert time.monotonic() - killed < 30
    status, report = server.health()
    assert status == 503 and report["status"] != "ok"
    report = server.wait_ready(180)
    assert report["restarts"] == 1
    again = httpx.post(server.url + "/v1/completions", json=dict(body, max_tokens=6), timeout=120)
    assert again.status_code == 200
    assert again.json()["choices"][0]["text"] == expected["choices"][0]["text"]
    assert server.stop() == 0  # SIGTERM after a rebuild: still a clean exit


def test_killed_rank_fails_the_request_then_the_group_is_rebuilt(tp2):
    _kill_rank_mid_request(tp2, rank=1)  # last user of the module's tp=2 server


@pytest.mark.ray
def test_killed_ray_actor_fails_the_request_then_the_group_is_rebuilt(llama):
    with Server(["--model", llama, "--served-model-name", "tiny", "--parallel", "tp=2", "--launcher", "ray"],
                env={"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}) as server:
        _kill_rank_mid_request(server, rank=1)


