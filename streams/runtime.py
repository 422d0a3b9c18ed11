"""Builds a render worker from the settings: model, object store, serde, metrics endpoint."""
from __future__ import annotations

import logging
import time

from connectors.redis_store import RedisStore
from connectors.storage import open_object_store
from processors.renderer import ModelOptions, Renderer
from schemas.serde import AvroSerde
from streams import metrics
from streams.cancellation import Cancellations
from streams.settings import Settings
from streams.worker import RenderWorker

log = logging.getLogger(__name__)


def model_options(s: Settings) -> ModelOptions:
    return ModelOptions(source=s.model_source, revision=s.model_revision, dtype=s.dtype, device=s.device,
                        compile=s.compile, cpu_offload=s.cpu_offload, attention_backend=s.attention_backend,
                        tiny_cache_dir=s.tiny_cache_dir, batch_invariant=s.batch_invariant)


def build_worker(s: Settings) -> RenderWorker:
    options = model_options(s)
    options.validate()  # bad options stop the worker here, before any weights load
    metrics.serve(s.metrics_port)
    start = time.monotonic()
    renderer = Renderer(options)
    renderer.warmup()
    log.info("model %s (%s) loaded and warmed up in %.1fs", renderer.model_id, renderer.model_version,
             time.monotonic() - start)
    store = open_object_store(s.storage_url, s.s3_endpoint_url)
    return RenderWorker(s, renderer, store, AvroSerde(registry_url=s.schema_registry_url),
                        cancellations=Cancellations(RedisStore(s.redis_url), s.topic_prefix))
