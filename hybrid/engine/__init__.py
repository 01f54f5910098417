"""Requests, continuous batching, the paged latent KV cache with its prefix cache, sampling."""

from hybrid.settings import EngineConfig
from hybrid.engine.engine import Engine, PromptTooLong
from hybrid.engine.engine_thread import EngineThread
from hybrid.engine.request_output import RequestOutput
from hybrid.engine.sampling_params import SamplingParams

__all__ = ["Engine", "EngineConfig", "EngineThread", "PromptTooLong", "RequestOutput", "SamplingParams"]
