"""`spin-ray serve` over real HTTP: the real CLI in a subprocess (its own local Ray cluster, Ray Serve, two in-process
vLLM CPU engines) answering the `openai` client on loopback; Ctrl-C (SIGINT) takes it down.

The run's storage is a hand-built layout (manifest.json naming the base model, iter_0/model + its completion marker)
of two tiny models with different random weights, so `base` and `iter_0` really are two models.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from spin_ray.data import records

pytestmark = pytest.mark.integration

KEY = "test-key-123"
MAX_TOKENS = 16
MAX_BODY = 4096


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def storage(tmp_path_factory, tiny_model):
    from spin_ray.models.builders import build_tiny_model

    root = tmp_path_factory.mktemp("served_run")
    theta1 = build_tiny_model(root / "iter_0" / "model", seed=1)
    (root / "iter_0" / "model" / "_SUCCESS.json").write_text("{}")
    # As the loop writes it: `model` is θ_0 (the run's config), a finished stage's `model` is θ_{t+1}.
    (root / "manifest.json").write_text(json.dumps(
        {"model": tiny_model, "stages": {"iter_0": {"status": "done", "model": theta1}}}))
    return root


@pytest.fixture(scope="module")
def server(storage, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("serve_log") / "serve.log"
    # No Ray settings: it starts a cluster of its own, never the private cluster of this test session.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [sys.executable, "-m", "spin_ray.cli", "serve", str(storage), "--port", str(port), "--api-key", KEY,
           "--max-tokens", str(MAX_TOKENS), "--max-body-bytes", str(MAX_BODY),
           "--max-prompt-tokens", "64"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 300
    while time.time() < deadline:
        assert proc.poll() is None, f"spin-ray serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}"
        try:
            status, body = _http("GET", f"{url}/models", key=KEY)
            # The ingress answers once it is up; the engines are ready when a generation goes through.
            if status == 200 and _http("POST", f"{url}/completions", {"model": "iter_0", "prompt": "hi",
                                                                       "max_tokens": 1}, key=KEY)[0] == 200:
                break
        except (OSError, ValueError):  # not listening yet, or Serve's proxy answering 503 in plain text meanwhile
            pass
        time.sleep(2)
    else:
        pytest.fail(f"spin-ray serve did not come up in 300 s:\n{log.read_text()[-4000:]}")
    yield {"url": url, "port": port, "proc": proc, "log": log}
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _http(method: str, url: str, body=None, *, key: str | None = None, raw: bytes | None = None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    if key is not None:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server["url"], api_key=KEY, max_retries=0, timeout=60)


def test_models_lists_both_iterates(client):
    assert sorted(m.id for m in client.models.list().data) == ["base", "iter_0"]


def test_each_iterate_answers_with_its_own_weights(client):
    messages = [{"role": "user", "content": "Reverse the letters: hello"}]
    answers = {}
    for name in ("base", "iter_0"):
        r = client.chat.completions.create(model=name, messages=messages, max_tokens=MAX_TOKENS, temperature=0)
        assert r.model == name and r.object == "chat.completion"
        assert r.choices[0].finish_reason in ("stop", "length")
        assert 1 <= r.usage.completion_tokens <= MAX_TOKENS and r.usage.prompt_tokens > 0
        answers[name] = r.choices[0].message.content
    # Two different random models: identical greedy answers would mean `model` routed both to one engine.
    assert answers["base"] != answers["iter_0"]


def test_chat_streaming_equals_the_whole_answer(client):
    messages = [{"role": "user", "content": "What is two plus two?"}]
    whole = client.chat.completions.create(model="iter_0", messages=messages, max_tokens=MAX_TOKENS, temperature=0)
    stream = client.chat.completions.create(model="iter_0", messages=messages, max_tokens=MAX_TOKENS, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len([c for c in chunks if c.choices]) > 2  # role chunk + several deltas, not one blob
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completions_plain_and_streamed(client):
    whole = client.completions.create(model="base", prompt="the quick brown", max_tokens=8, temperature=0)
    assert whole.object == "text_completion" and whole.usage.completion_tokens >= 1
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="base", prompt="the quick brown", max_tokens=8, temperature=0, stream=True))
    assert streamed == whole.choices[0].text


@pytest.fixture(scope="module")
def pair(storage):
    """A held-out prompt of the bundled tasks as iter_0's trainer sees it (token ids), with two answers."""
    from spin_ray.models.loading import load_tokenizer
    from spin_ray.training.template import prompt_ids, response_ids

    tok = load_tokenizer(str(storage / "iter_0" / "model"))
    messages = [{"role": "user", "content": "Reverse the letters: hello"}]
    return {"prompt_ids": prompt_ids(tok, messages), "real_ids": response_ids(tok, "olleh"),
            "generated_ids": response_ids(tok, "hello there")}


def test_echoed_log_probs_equal_the_trainers(client, storage, pair):
    """A log-likelihood request as lm-eval's local-completions sends it (token ids, echo, logprobs, max_tokens 0
    or 1): the answer's log-probs equal the trainer's own forward (step.pair_logps, fp32) for the same ids."""
    import torch

    from spin_ray.config import TrainConfig
    from spin_ray.training.step import frozen_model, pair_logps

    model = frozen_model(str(storage / "iter_0" / "model"), TrainConfig(), torch.device("cpu"))
    ((real, generated),) = pair_logps(model, [[pair]], torch.device("cpu"))
    n = len(pair["prompt_ids"])
    for answer, trainers in (("real_ids", real), ("generated_ids", generated)):
        for max_tokens in (0, 1):
            r = client.completions.create(model="iter_0", prompt=pair["prompt_ids"] + pair[answer], echo=True,
                                          logprobs=1, max_tokens=max_tokens, temperature=0)
            lp = r.choices[0].logprobs
            assert len(lp.token_logprobs) == n + len(pair[answer]) + max_tokens
            assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # no context for the first token
            assert sum(lp.token_logprobs[n:n + len(pair[answer])]) == pytest.approx(float(trainers[0]), abs=1e-4)
            assert r.usage.completion_tokens == max_tokens
            # The greedy token is the top one: lm-eval's is_greedy compares a token's log-prob with the top's.
            assert all(max(top.values()) >= t - 1e-6 for t, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:]))
    # Text in, text out: the prompt echoed in front of the answer.
    r = client.completions.create(model="iter_0", prompt="the quick brown", echo=True, max_tokens=4, temperature=0)
    plain = client.completions.create(model="iter_0", prompt="the quick brown", max_tokens=4, temperature=0)
    assert r.choices[0].text == "the quick brown" + plain.choices[0].text and r.choices[0].logprobs is None


def test_chat_log_probs_and_top_log_probs(client):
    messages = [{"role": "user", "content": "Sort the letters alphabetically: spin"}]
    r = client.chat.completions.create(model="iter_0", messages=messages, max_tokens=MAX_TOKENS, temperature=0,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for t in content:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0
        assert [x.logprob for x in t.top_logprobs] == sorted((x.logprob for x in t.top_logprobs), reverse=True)
        assert t.top_logprobs[0].logprob == t.logprob  # greedy: the chosen token is the most likely
        assert bytes(t.bytes).decode() == t.token
    # Special tokens (the end of turn) are counted but not part of the text.
    assert "".join(t.token for t in content).startswith(r.choices[0].message.content)
    plain = client.chat.completions.create(model="iter_0", messages=messages, max_tokens=MAX_TOKENS, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == r.choices[0].message.content


def test_n_answers_per_prompt_and_several_prompts(client, pair):
    messages = [{"role": "user", "content": "Count the letters: abc"}]
    r = client.chat.completions.create(model="iter_0", messages=messages, max_tokens=MAX_TOKENS, n=3, seed=7)
    assert [c.index for c in r.choices] == [0, 1, 2]
    again = client.chat.completions.create(model="iter_0", messages=messages, max_tokens=MAX_TOKENS, n=3, seed=7)
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]  # seeded
    assert len({c.message.content for c in r.choices}) > 1  # three samples of a random model, not one thrice
    # Two prompts of token ids (lm-eval's batches) x n = 2: choice 2k + j answers prompt k; greedy answers agree.
    prompts = [pair["prompt_ids"], pair["prompt_ids"][:-3]]
    both = client.completions.create(model="base", prompt=prompts, n=2, max_tokens=6, temperature=0)
    alone = [client.completions.create(model="base", prompt=p, max_tokens=6, temperature=0) for p in prompts]
    assert [c.text for c in both.choices] == [a.choices[0].text for a in alone for _ in range(2)]
    assert both.usage.prompt_tokens == sum(map(len, prompts))
    assert both.usage.completion_tokens == 2 * sum(a.usage.completion_tokens for a in alone)


def test_streaming_n_logprobs_echo_with_usage(client, pair):
    kwargs = dict(model="iter_0", prompt="Add the numbers: 2 + 2", max_tokens=8, n=2, seed=3, logprobs=2, echo=True)
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    texts, logprobs = ["", ""], [[], []]
    for c in chunks[:-1]:
        (choice,) = c.choices
        texts[choice.index] += choice.text
        logprobs[choice.index] += choice.logprobs.token_logprobs if choice.logprobs else []
    assert texts == [c.text for c in whole.choices] and all(t.startswith("Add the numbers: 2 + 2") for t in texts)
    assert logprobs == [c.logprobs.token_logprobs for c in whole.choices]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    messages = [{"role": "user", "content": "hi"}]
    chat = list(client.chat.completions.create(model="iter_0", messages=messages, max_tokens=8, n=2, seed=3,
                                               logprobs=True, stream=True, stream_options={"include_usage": True}))
    whole = client.chat.completions.create(model="iter_0", messages=messages, max_tokens=8, n=2, seed=3)
    for i in range(2):
        assert "".join(c.choices[0].delta.content or "" for c in chat
                       if c.choices and c.choices[0].index == i) == whole.choices[i].message.content
    assert chat[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_missing_or_wrong_api_key_is_401(server):
    from openai import AuthenticationError, OpenAI

    for key in (None, "wrong"):
        status, body = _http("GET", f"{server['url']}/models", key=key)
        assert status == 401 and body["error"]["type"] == "authentication_error"
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=server["url"], api_key="wrong", max_retries=0).chat.completions.create(
            model="base", messages=[{"role": "user", "content": "hi"}])


def test_limits_and_bad_requests_are_4xx_json(client, server):
    from openai import BadRequestError, NotFoundError

    msg = [{"role": "user", "content": "hi"}]
    with pytest.raises(BadRequestError, match="max_tokens"):
        client.chat.completions.create(model="base", messages=msg, max_tokens=MAX_TOKENS + 1)
    with pytest.raises(BadRequestError, match="more than this server's limit of 64"):  # prompt tokens
        client.chat.completions.create(model="base", messages=[{"role": "user", "content": "hello " * 100}])
    with pytest.raises(NotFoundError, match="not served here"):
        client.chat.completions.create(model="iter_7", messages=msg)
    oversize = {"model": "base", "messages": [{"role": "user", "content": "x" * MAX_BODY}]}
    cases = [(oversize, None, 413), (None, b"{not json", 400), (None, b"[1, 2]", 400),
             ({"model": "base", "messages": msg, "temperature": "hot"}, None, 400),
             ({"model": "base", "messages": msg, "n": 0}, None, 400),
             ({"model": "base", "messages": msg, "n": 129}, None, 400),  # more answers than one request may ask
             ({"model": "base", "messages": msg, "top_logprobs": 2}, None, 400),  # without logprobs: true
             ({"model": "base", "messages": msg, "logprobs": True, "top_logprobs": 21}, None, 400),
             ({"model": "base", "messages": msg, "max_tokens": 0}, None, 400),
             ({"model": "base", "messages": msg, "tools": []}, None, 400),  # unknown field
             ({"model": "base", "messages": []}, None, 400)]
    completions = [{"model": "base", "prompt": "hi", "max_tokens": 0},  # 0 tokens only with echo
                   {"model": "base", "prompt": [5, 100000], "max_tokens": 1},  # a token id beyond the vocabulary
                   {"model": "base", "prompt": [[5, 6], []], "max_tokens": 1},
                   {"model": "base", "prompt": "hi", "logprobs": 21}]
    cases += [(body, None, 400) for body in completions]
    for body, raw, status in cases:
        url = f"{server['url']}/{'chat/completions' if body is None or 'messages' in body else 'completions'}"
        got, answer = _http("POST", url, body, key=KEY, raw=raw)
        assert got == status, (body, raw, answer)
        assert set(answer["error"]) >= {"message", "type"} and "Traceback" not in answer["error"]["message"]


def test_killed_replica_is_restarted_and_later_requests_succeed(client, server):
    import concurrent.futures

    import psutil

    def replicas(name: str) -> list[psutil.Process]:
        procs = psutil.Process(server["proc"].pid).children(recursive=True)
        return [p for p in procs if f"ServeReplica:spin-ray-serve:model-{name}" in " ".join(p.cmdline())]

    def ask(name: str) -> str:
        return client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=MAX_TOKENS).choices[0].finish_reason

    (victim,) = replicas("iter_0")
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        load = [pool.submit(ask, ("iter_0", "base")[i % 2]) for i in range(16)]
        victim.kill()  # SIGKILL, mid-load
        for f in load:
            f.exception()  # requests on the killed replica may fail; none may hang
    deadline = time.time() + 240
    while time.time() < deadline:
        try:
            if ask("iter_0") in ("stop", "length"):
                break
        except Exception:
            time.sleep(2)
    else:
        pytest.fail(f"iter_0 never answered again after its replica was killed:\n{server['log'].read_text()[-4000:]}")
    (new,) = replicas("iter_0")
    assert new.pid != victim.pid
    assert ask("base") in ("stop", "length")


def _command(command, tiny_model, storage, rows):
    sets = [f"model={tiny_model}", f"storage={storage}", f"data.max_rows={rows}", "data.max_length=128",
            "data.max_prompt_length=64", "generate.max_tokens=8", "generate.batch_size=8",
            "generate.num_cpus_per_actor=0.5", "train.global_batch_size=8",
            "train.micro_batch_size=4", "train.epochs=1", "eval.enabled=false", "loop.iterations=1"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # no Ray settings, like the server's
    return subprocess.Popen([sys.executable, "-m", "spin_ray.cli", command, *sum((["--set", s] for s in sets), [])],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _finished_with_its_pairs(proc, command, storage, rows):
    import pyarrow.parquet as pq

    from spin_ray.cli.main import EMBEDDED
    from spin_ray.config import SpinConfig
    from spin_ray.data.sources import load_sft

    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert out.splitlines()[0].startswith(f"spin-ray {command}: a local Ray cluster of its own"), out[:500]
    expected = load_sft(SpinConfig.load(EMBEDDED, [f"data.max_rows={rows}"]).data).to_arrow().column("prompt_id")
    got = pq.read_table(storage / "iter_0" / "pairs", columns=["prompt_id"]).column(0).to_pylist()
    assert sorted(got) == sorted(expected.to_pylist())


def _answers(server) -> bool:
    body = {"model": "iter_0", "prompt": "hi", "max_tokens": 2}
    return _http("POST", f"{server['url']}/completions", body, key=KEY)[0] == 200


def test_the_terminal_shows_the_cluster_the_models_and_the_url_and_the_log_file_the_rest(server):
    # After the requests above (and a replica killed): still only spin_ray's lines on the terminal (the next test
    # stops the server).
    lines = server["log"].read_text().splitlines()
    assert lines[0].startswith("spin-ray serve: a local Ray cluster of its own"), lines[:5]
    assert lines[1].startswith("spin-ray serve: full log in ") and "--verbose" in lines[1]
    assert any(f"serving base, iter_0 at http://127.0.0.1:{server['port']}/v1" in line for line in lines), lines
    assert len(lines) == 3, "\n".join(lines)
    full = open(lines[1].split("full log in ")[1].split()[0]).read()
    assert "ServeReplica" in full and "/v1/completions" in full  # Serve's and the replicas' lines, one per request


def test_commands_beside_the_server_each_stop_on_their_own(server, tiny_model, tmp_path):
    # Two more commands on this machine, none with Ray settings: each must use a cluster of its own.
    first, second = tmp_path / "first", tmp_path / "second"
    one = _command("run", tiny_model, first, 16)
    assert _answers(server)
    # The second starts while the first works; the first ends (its cluster with it) while the second works.
    assert wait_logged(first, "wrote 16 pairs", one)
    two = _command("generate", tiny_model, second, 24)
    _finished_with_its_pairs(one, "run", first, 16)
    assert records.is_complete(str(first / "iter_0" / "model"))
    # Its own cluster runs the dashboard's state API, so Ray Train's placement-group cleaner can do its work.
    assert not [line for f in os.listdir(first / "logs") for line in open(first / "logs" / f)
                if "Failed to query Ray Train Controller actor state" in line]
    assert _answers(server)  # the first command's end did not take the server with it
    assert two.poll() is None, "the second command ended before the first: nothing was shown"

    # Ctrl-C stops the server while the second command works; the second finishes with its pairs.
    proc = server["proc"]
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 0, server["log"].read_text()[-4000:]
    assert server["log"].read_text().splitlines()[-1] == "stopped serving base, iter_0"
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server["port"]), timeout=5).close()
    _finished_with_its_pairs(two, "generate", second, 24)
    assert "Connecting to existing Ray cluster" not in server["log"].read_text()


def wait_logged(storage, text, proc, timeout=300) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        logs = storage / "logs"
        if logs.exists() and any(text in (logs / f).read_text(errors="replace") for f in os.listdir(logs)):
            return True
        time.sleep(0.2)
    return False


def test_beyond_loopback_without_a_key_is_refused(storage):
    out = subprocess.run([sys.executable, "-m", "spin_ray.cli", "serve", str(storage), "--host", "0.0.0.0"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--api-key" in out.stderr


def test_unknown_iteration_is_refused(storage):
    out = subprocess.run([sys.executable, "-m", "spin_ray.cli", "serve", str(storage), "--iterations", "base,3"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "iterations [0]" in out.stderr


def test_replica_resources_share_the_cluster_or_refuse():
    from spin_ray.config import ConfigError
    from spin_ray.tools.serve.app import replica_resources
    from spin_ray.tools.serve.config import ServeConfig

    cfg = ServeConfig("run", models={"base": "a", "iter_0": "b"})
    # 2 CPUs − 0.1 for the ingress, shared by 2 engines: 0.95 each (rounded down to 0.01); GPUs: 1 each if any.
    assert replica_resources(cfg, {"CPU": 2.0}) == (0.95, 0)
    assert replica_resources(cfg, {"CPU": 8.0, "GPU": 2.0}) == (1.0, 1)
    # `best` names a folder already served: it shares that engine, so the share is the same.
    assert replica_resources(ServeConfig("run", models={"base": "a", "iter_0": "b", "best": "b"}), {"CPU": 2.0}) == \
        (0.95, 0)
    cfg.num_cpus, cfg.replicas = 1.0, 2  # 2 models x 2 replicas x 1 CPU + 2 x 0.1 = 4.2 > 4
    with pytest.raises(ConfigError, match="need 4.2 CPUs"):
        replica_resources(cfg, {"CPU": 4.0})


def test_resolve_names_base_and_finished_iterations(storage, tiny_model):
    from spin_ray.tools.serve.config import ServeConfig, resolve

    assert resolve(ServeConfig(str(storage))) == {"base": tiny_model, "iter_0": str(storage / "iter_0" / "model")}
    assert resolve(ServeConfig(str(storage), iterations=["0"])) == {"iter_0": str(storage / "iter_0" / "model")}
    assert resolve(ServeConfig(tiny_model)) == {"tiny": tiny_model}


def test_engine_refuses_one_request_alone_and_frees_an_abandoned_one(tiny_model):
    """AsyncEngine in this process (real in-process vLLM): a request vLLM refuses fails on its own, the engine keeps
    answering, and a stream its consumer drops is aborted inside the engine."""
    import asyncio

    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    from spin_ray.stages.engine import AsyncEngine

    async def main():
        engine = AsyncEngine(tiny_model, dtype="auto", max_model_len=128, on_gpu=False)
        try:
            too_long = [5 + i % 100 for i in range(200)]  # 200 prompt tokens > the 128-token context
            with pytest.raises(RuntimeError, match="refused or failed"):
                async for _ in engine.generate(too_long, SamplingParams(max_tokens=4)):
                    pass
            outs = [o async for o in engine.generate([5, 6, 7], SamplingParams(max_tokens=4, temperature=0))]
            assert outs[-1].finished and 1 <= len(outs[-1].outputs[0].token_ids) <= 4
            steps, step = [0], engine.engine.step  # the real step, counted
            engine.engine.step = lambda: steps.__setitem__(0, steps[0] + 1) or step()
            dropped = engine.generate([5, 6, 7], SamplingParams(max_tokens=120, ignore_eos=True,
                                                                output_kind=RequestOutputKind.DELTA))
            await dropped.__anext__()
            assert engine.engine.has_unfinished_requests()
            await dropped.aclose()
            steps[0] = 0
            for _ in range(200):
                if not engine.engine.has_unfinished_requests():
                    break
                await asyncio.sleep(0.05)
            # Aborted at once: at most the step already running finishes, not the 100+ left of its 120 tokens.
            assert not engine.engine.has_unfinished_requests() and steps[0] <= 2
        finally:
            engine.shutdown()

    asyncio.run(main())
